"""ChatML -> MindRecord: rows equal the original algorithm, read back with MindDataset, reproducible bytes."""

import json

import numpy as np
import pytest

from qwenbuild.data.alpaca import convert_alpaca
from qwenbuild.data.chatml import render
from qwenbuild.data.instructions import make_instructions, tokenizer_corpus, write_instruction_dataset
from qwenbuild.data.preprocess import preprocess
from qwenbuild.errors import UserError
from qwenbuild.tokenizer import train_tokenizer

SEQ = 40
EDGE_ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Translate to English.", "input": "今天天气很好，我们去公园散步吧。" * 3, "output": "The weather is nice."},
    {"instruction": "What does this mean", "input": "🙂👍🏽", "output": "Approval 😀"},
    {"instruction": "Write a long story about a dragon who learns to code in Python.", "input": "",
     "output": "Once upon a time " * 30},
    {"instruction": "Quote the token.", "input": "<|endoftext|>", "output": "It is <|im_end|> text."},
    {"instruction": "x", "input": "", "output": ""},
    # not in NFC: this chunk is tokenized through the tokenizer's NFC normalizer
    {"instruction": "Spell cafe\u0301 with one accent.", "input": "A\u030a", "output": "café, Å"},
]
COLUMNS = ["input_ids", "target_ids", "attention_mask"]


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    train, _ = make_instructions(seed=0, num_train=4000, num_heldout=400)
    return train_tokenizer(tokenizer_corpus(train), 500, tmp_path_factory.mktemp("small") / "tok")


@pytest.fixture(scope="module")
def edge_chatml(tmp_path_factory):
    d = tmp_path_factory.mktemp("edge")
    (d / "alpaca.json").write_text(json.dumps(EDGE_ROWS, ensure_ascii=False), encoding="utf-8")
    convert_alpaca(d / "alpaca.json", d / "chatml.jsonl")
    return d / "chatml.jsonl"


@pytest.fixture(scope="module")
def dataset_chatml(tmp_path_factory):
    d = tmp_path_factory.mktemp("instructions")
    train, _ = write_instruction_dataset(d, seed=1, num_train=600, num_heldout=10)
    convert_alpaca(train, d / "chatml.jsonl")
    return d / "chatml.jsonl"


def run(chatml, tok_dir, out, **kw):
    return preprocess(str(chatml), tok_dir / "vocab.json", tok_dir / "merges.txt", kw.pop("seq_length", SEQ), out,
                      **kw)


def read_back(path):
    import mindspore.dataset as ds

    data = ds.MindDataset(str(path), columns_list=COLUMNS, shuffle=False)
    rows = list(data.create_dict_iterator(output_numpy=True))
    return {c: np.stack([r[c] for r in rows]) for c in COLUMNS}


def original_rows(chatml, tok_dir, seq_length):
    """The original algorithm: slow Qwen2Tokenizer + apply_chat_template padded/truncated to seq_length + 1."""
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer.from_pretrained(str(tok_dir))
    messages = [json.loads(line)["messages"] for line in chatml.read_text(encoding="utf-8").splitlines()]
    ids = np.array([tok.apply_chat_template(m, tokenize=True, add_generation_prompt=False, padding="max_length",
                                            max_length=seq_length + 1, truncation=True) for m in messages],
                   dtype=np.int32)
    target = ids.copy()
    target[ids == tok.pad_token_id] = -100
    return {"input_ids": ids, "target_ids": target,
            "attention_mask": np.where(ids == tok.pad_token_id, 0, 1).astype(np.int32)}, messages, tok


def test_rows_equal_the_original_algorithm_with_the_real_tokenizer(edge_chatml, qwen_dir, tmp_path):
    stats = run(edge_chatml, qwen_dir, tmp_path / "out.mindrecord", processes=1)
    got = read_back(tmp_path / "out.mindrecord")
    expected, messages, tok = original_rows(edge_chatml, qwen_dir, SEQ)
    for c in COLUMNS:
        assert got[c].dtype == np.int32 and got[c].shape == (len(EDGE_ROWS), SEQ + 1)
        np.testing.assert_array_equal(got[c], expected[c])
    first = tok.decode(got["input_ids"][0])
    assert first == render(messages[0]) + "<|endoftext|>" * (SEQ + 1 - len(tok(render(messages[0])).input_ids))
    assert first.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                            "Name a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n<|endoftext|>")
    lengths = [len(tok(render(m)).input_ids) for m in messages]
    assert stats.rows == len(EDGE_ROWS)
    assert stats.truncated_rows == sum(n > SEQ + 1 for n in lengths) >= 2
    assert stats.tokens == sum(min(n, SEQ + 1) for n in lengths)
    assert stats.padding == len(EDGE_ROWS) * (SEQ + 1) - stats.tokens


def test_small_tokenizer_rows_equal_the_original_and_use_its_pad_id(dataset_chatml, small_dir, tmp_path):
    run(dataset_chatml, small_dir, tmp_path / "out.mindrecord", seq_length=63)
    got = read_back(tmp_path / "out.mindrecord")
    expected, _, _ = original_rows(dataset_chatml, small_dir, 63)
    for c in COLUMNS:
        np.testing.assert_array_equal(got[c], expected[c])
    assert got["input_ids"].max() == 499 and (got["input_ids"][:, -1] == 497).all()
    assert not (got["input_ids"] == 151643).any()


def test_bytes_identical_across_runs_and_process_counts(dataset_chatml, small_dir, tmp_path):
    outputs = []
    for i, processes in enumerate((0, 1, 2)):
        out = tmp_path / f"run{i}" / "data.mindrecord"
        run(dataset_chatml, small_dir, out, processes=processes)
        outputs.append((out.read_bytes(), (out.parent / "data.mindrecord.db").read_bytes()))
        assert sorted(p.name for p in out.parent.iterdir()) == ["data.mindrecord", "data.mindrecord.db"]
    assert outputs[0] == outputs[1] == outputs[2]
    assert len(outputs[0][0]) < 1_000_000  # the page size fits the rows: no 32 MiB padding


def test_mask_prompt_trains_only_assistant_replies(dataset_chatml, small_dir, tmp_path):
    from qwenbuild.tokenizer import load_tokenizer

    run(dataset_chatml, small_dir, tmp_path / "plain.mindrecord", processes=0)
    run(dataset_chatml, small_dir, tmp_path / "masked.mindrecord", processes=2, mask_prompt=True)
    plain, masked = read_back(tmp_path / "plain.mindrecord"), read_back(tmp_path / "masked.mindrecord")
    np.testing.assert_array_equal(plain["input_ids"], masked["input_ids"])
    np.testing.assert_array_equal(plain["attention_mask"], masked["attention_mask"])
    tok = load_tokenizer(small_dir)
    rows = [json.loads(line)["messages"] for line in dataset_chatml.read_text(encoding="utf-8").splitlines()]
    for target, messages in zip(masked["target_ids"], rows):
        trained = target[target != -100]
        assert tok.decode(trained) == messages[2]["content"] + "<|im_end|>\n"
        assert np.all(np.flatnonzero(target != -100) >= len(tok(render(messages[:2]) + "<|im_start|>assistant\n")
                                                            .input_ids))


def test_shards_hold_all_rows(dataset_chatml, small_dir, tmp_path):
    run(dataset_chatml, small_dir, tmp_path / "sharded.mindrecord", file_partition=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["sharded.mindrecord0", "sharded.mindrecord0.db", "sharded.mindrecord1",
                     "sharded.mindrecord1.db"]
    run(dataset_chatml, small_dir, tmp_path / "single.mindrecord")
    sharded, single = read_back(tmp_path / "sharded.mindrecord0"), read_back(tmp_path / "single.mindrecord")
    assert sorted(map(bytes, sharded["input_ids"])) == sorted(map(bytes, single["input_ids"]))


GOOD = json.dumps({"type": "chatml", "messages": [{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "yo"}]}).encode()
BAD_LINES = [
    (b'{"messages": [', "not valid JSON"),
    (b'{"type": "chatml"}', 'expected an object with a "messages" list'),
    (b'{"messages": []}', '"messages" must be a non-empty list, found a list'),
    (b'{"messages": [{"role": "user"}]}', 'messages[0]["content"] must be a string, found nothing'),
    (b'{"messages": [{"role": "user", "content": 5}]}', 'messages[0]["content"] must be a string, found a number'),
    (b'{"messages": ["hi"]}', "messages[0] must be an object with role and content, found a string"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "not valid UTF-8"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_each_bad_line_is_named_and_nothing_is_written(small_dir, tmp_path, line, message):
    processes = 1 if message == "not valid JSON" else 0  # one case through the worker processes
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join([GOOD] * 300 + [line] + [GOOD] * 5) + b"\n")
    with pytest.raises(UserError) as exc:
        run(src, small_dir, tmp_path / "out" / "data.mindrecord", processes=processes)
    assert f"{src} line 301: {message}" in str(exc.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_cli_names_and_errors(dataset_chatml, small_dir, tmp_path, capsys):
    from qwenbuild.cli import main

    args = ["--input_glob", str(dataset_chatml.parent / "*.jsonl"), "--vocab_file", str(small_dir / "vocab.json"),
            "--merges_file", str(small_dir / "merges.txt"), "--seq_length", "32"]
    assert main(["qwen1_5_preprocess", *args, "--output_file", str(tmp_path / "a.mindrecord")]) == 0
    assert "600 rows of 33 tokens" in capsys.readouterr().err
    assert main(["preprocess", *args[:1], str(tmp_path / "none*.jsonl"), *args[2:],
                 "--output_file", str(tmp_path / "b.mindrecord")]) == 2
    err = capsys.readouterr().err
    assert "no input file matches" in err and "Traceback" not in err


def test_quiet_and_verbose(dataset_chatml, small_dir, tmp_path, capsys):
    from qwenbuild.cli import main

    args = ["--input_glob", str(dataset_chatml), "--vocab_file", str(small_dir / "vocab.json"),
            "--merges_file", str(small_dir / "merges.txt"), "--seq_length", "32", "--processes", "0"]
    summary = "preprocess: 600 rows of 33 tokens"
    debug = "preprocess: 1 input file(s), 0 tokenizing process(es), rows of 33 tokens\n"
    assert main(["preprocess", *args, "--output_file", str(tmp_path / "a.mindrecord")]) == 0
    default = capsys.readouterr()
    assert default.err.startswith(summary) and debug not in default.err and default.out == ""
    for i, flags in enumerate((["-q", "preprocess"], ["preprocess", "--quiet"])):
        assert main([*flags, *args, "--output_file", str(tmp_path / f"q{i}.mindrecord")]) == 0
        assert capsys.readouterr() == ("", "")
    assert main(["-v", "preprocess", *args, "--output_file", str(tmp_path / "v.mindrecord")]) == 0
    err = capsys.readouterr().err
    assert err.startswith(debug) and err[len(debug):].startswith(summary)
    # a bad row is an error, shown also under -q
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n")
    assert main(["preprocess", "-q", *args[2:], "--input_glob", str(bad), "--output_file",
                 str(tmp_path / "b.mindrecord")]) == 2
    assert f"{bad} line 1: " in capsys.readouterr().err


def test_no_more_processes_start_than_there_are_chunks_of_rows(edge_chatml, small_dir, tmp_path, monkeypatch):
    """--processes 200 for a handful of rows starts one process (a chunk is 256 lines), and the bytes are the same."""
    from qwenbuild.data import preprocess as module

    started = []
    real_pool = module.worker_pool

    def counting_pool(processes, *args, **kwargs):
        started.append(processes)
        return real_pool(processes, *args, **kwargs)

    monkeypatch.setattr(module, "worker_pool", counting_pool)
    run(edge_chatml, small_dir, tmp_path / "many" / "d.mindrecord", processes=200, seq_length=512)
    run(edge_chatml, small_dir, tmp_path / "none" / "d.mindrecord", processes=0, seq_length=512)
    assert started == [1]
    assert (tmp_path / "many" / "d.mindrecord").read_bytes() == (tmp_path / "none" / "d.mindrecord").read_bytes()
