"""User-given JSON files: each way one can be wrong is a UserError naming the file and where."""

import pytest

from qwenbuild.errors import UserError
from qwenbuild.jsonfile import read_json


@pytest.mark.parametrize("content,message", [
    (None, "rank table {p} does not exist"),
    (b'{"a": 1,\n "b": }', "rank table {p} is not valid JSON: line 2 column 7: Expecting value"),
    (b'{"a": "\xff"}', "rank table {p} is not valid JSON: not UTF-8 text (byte 7)"),
    (b"", "rank table {p} is not valid JSON: line 1 column 1"),
])
def test_each_problem_names_the_file_and_the_place(tmp_path, content, message):
    path = tmp_path / "t.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError) as exc:
        read_json(path, "rank table", missing_hint="run hccl_tools")
    assert message.format(p=path) in str(exc.value)
    if content is None:
        assert exc.value.hint == "run hccl_tools"


def test_a_directory_or_an_unreadable_file(tmp_path):
    with pytest.raises(UserError, match="is a directory, not a JSON file"):
        read_json(tmp_path, "vocab file")
    assert read_json(_write(tmp_path / "ok.json", '{"x": [1, 2]}'), "vocab file") == {"x": [1, 2]}


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path
