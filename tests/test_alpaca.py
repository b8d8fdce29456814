"""alpaca -> ChatML: the original converter's text rules, JSON array or JSONL input, bad rows named, no partial output."""

import json

import pytest

from qwenbuild.data.alpaca import convert_alpaca, user_text
from qwenbuild.errors import UserError

ROWS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well."},
    {"instruction": "Translate the sentence.", "input": "你好，世界", "output": "Hello, world"},
    {"instruction": "Classify the emoji", "input": "😀", "output": "happy"},
    {"instruction": "No input key at all.", "output": "fine"},
    {"instruction": "Ends with two dots..", "input": "x", "output": "y"},
    {"instruction": "Spaces are input", "input": " ", "output": "kept"},
]


def original_converter(rows):
    """The MindFormers script's logic, re-stated: exact text and record layout, ASCII-escaped JSON Lines."""
    lines = []
    for example in rows:
        if example.get("input", "") == "":
            source = example["instruction"]
        else:
            instruction = example["instruction"]
            if instruction[-1] == ".":
                instruction = instruction[:-1]
            source = instruction + ": " + example["input"]
        lines.append(json.dumps({"type": "chatml", "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": source},
            {"role": "assistant", "content": example["output"]}]}))
    return lines


def test_user_text_rules():
    assert user_text("Do it.", "") == "Do it."
    assert user_text("Do it.", "now") == "Do it: now"
    assert user_text("Do it..", "now") == "Do it.: now"
    assert user_text("Do it", "now") == "Do it: now"
    assert user_text("把下面的字倒过来", "山 水") == "把下面的字倒过来: 山 水"


@pytest.mark.parametrize("layout", ["array", "jsonl"])
def test_output_equals_the_original_and_is_unescaped_utf8(tmp_path, layout):
    src = tmp_path / "in.json"
    if layout == "array":
        src.write_text(json.dumps(ROWS, ensure_ascii=False, indent=2), encoding="utf-8")
    else:
        src.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n", encoding="utf-8")
    stats = convert_alpaca(src, tmp_path / "out.jsonl")
    text = (tmp_path / "out.jsonl").read_text(encoding="utf-8")
    lines = text.split("\n")
    assert lines[-1] == "" and len(lines) == len(ROWS) + 1 and stats.rows == len(ROWS)
    assert [json.loads(a) for a in lines[:-1]] == [json.loads(b) for b in original_converter(ROWS)]
    assert "你好，世界" in text and "😀" in text and "\\u" not in text
    assert lines[1] == ('{"type": "chatml", "messages": [{"role": "system", "content": "You are a helpful '
                        'assistant."}, {"role": "user", "content": "Translate the sentence: 你好，世界"}, '
                        '{"role": "assistant", "content": "Hello, world"}]}')


BAD = [
    ({"input": "x", "output": "y"}, 'missing "instruction"'),
    ({"instruction": "a", "input": "x"}, 'missing "output"'),
    ({"instruction": 3, "output": "y"}, '"instruction" must be a string, found a number'),
    ({"instruction": "a", "input": None, "output": "y"}, '"input" must be a string, found null'),
    ({"instruction": "  ", "input": "x", "output": "y"}, 'empty "instruction"'),
    (["not", "an", "object"], "expected an object with instruction/input/output, found a list"),
]


@pytest.mark.parametrize("row,message", BAD)
def test_each_bad_row_is_named_and_nothing_is_written(tmp_path, row, message):
    src = tmp_path / "in.json"
    src.write_text(json.dumps([ROWS[0], ROWS[1], row, ROWS[2]]), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    with pytest.raises(UserError) as exc:
        convert_alpaca(src, out)
    assert f"row 2: {message}" in str(exc.value) and "--skip_bad_rows" in str(exc.value)
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.json", "out.jsonl"]


def test_invalid_utf8_and_invalid_json_lines_are_named(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(json.dumps(ROWS[0]).encode() + b"\n"
                    + b'{"instruction": "bad \xff byte", "output": "y"}\n'
                    + b"{not json\n"
                    + json.dumps(ROWS[1], ensure_ascii=False).encode() + b"\n")
    with pytest.raises(UserError) as exc:
        convert_alpaca(src, tmp_path / "out.jsonl")
    assert 'row 1 (line 2): "instruction" is not valid UTF-8 text' in str(exc.value)
    assert "row 2 (line 3): not valid JSON" in str(exc.value)
    assert not (tmp_path / "out.jsonl").exists()


def test_skip_bad_rows_converts_the_rest_and_counts(tmp_path, capsys):
    src = tmp_path / "in.json"
    src.write_text(json.dumps([ROWS[0], BAD[0][0], ROWS[1], BAD[1][0]]), encoding="utf-8")
    stats = convert_alpaca(src, tmp_path / "out.jsonl", skip_bad_rows=True)
    assert (stats.rows, stats.skipped) == (2, 2)
    lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == [json.loads(x) for x in original_converter([ROWS[0], ROWS[1]])]
    err = capsys.readouterr().err
    assert "2 bad row(s) skipped" in err and "row 1:" in err and "row 3:" in err


def test_broken_array_and_empty_input_are_user_errors(tmp_path):
    src = tmp_path / "in.json"
    src.write_text('[{"instruction": "a", "output": "b"},\n  {oops}]')
    with pytest.raises(UserError, match="line 2 column"):
        convert_alpaca(src, tmp_path / "out.jsonl")
    src.write_text("[]")
    with pytest.raises(UserError, match="no convertible rows"):
        convert_alpaca(src, tmp_path / "out.jsonl")
    with pytest.raises(UserError, match="does not exist"):
        convert_alpaca(tmp_path / "missing.json", tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_reports_without_traceback(tmp_path, capsys):
    from qwenbuild.cli import main

    src = tmp_path / "in.json"
    src.write_text(json.dumps([BAD[0][0]]))
    assert main(["alpaca_converter", "--data_path", str(src), "--output_path", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "row 0: missing" in err and "Traceback" not in err
    src.write_text(json.dumps(ROWS))
    assert main(["alpaca_converter", "--data_path", str(src), "--output_path", str(tmp_path / "o.jsonl")]) == 0
    assert len((tmp_path / "o.jsonl").read_text(encoding="utf-8").splitlines()) == len(ROWS)
