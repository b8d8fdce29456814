"""lite.ini: the original's keys, the rank table for several ranks, overrides, and stable bytes."""

from __future__ import annotations

import pytest

from qwenbuild.errors import UserError
from qwenbuild.export.lite_ini import write_lite_ini

ONE_RANK = (b"[ascend_context]\n"
            b"provider=ge\n"
            b"\n"
            b"[ge_session_options]\n"
            b"ge.externalWeight=1\n"
            b"ge.exec.atomicCleanPolicy=1\n"
            b"ge.event=notify\n"
            b"ge.exec.staticMemoryPolicy=2\n"
            b"ge.exec.formatMode=1\n"
            b"ge.exec.precision_mode=must_keep_origin_dtype\n")


def test_one_rank_bytes(tmp_path):
    path = write_lite_ini(tmp_path / "lite.ini")
    assert path.read_bytes() == ONE_RANK


def test_several_ranks_name_the_rank_table(tmp_path):
    data = write_lite_ini(tmp_path / "lite.ini", rank_table_file="/data/hccl_4p_0123_127.0.0.1.json").read_bytes()
    assert data == ONE_RANK.replace(b"provider=ge\n",
                                    b"provider=ge\nrank_table_file=/data/hccl_4p_0123_127.0.0.1.json\n")


def test_overrides_replace_drop_and_add_sorted(tmp_path):
    overrides = {
        "graph_kernel_param": {"opt_level": 2, "enable_cce_lib": True, "disable_cce_lib_ops": "MatMul"},
        "ge_session_options": {"ge.externalWeight": None, "ge.exec.formatMode": 0},
    }
    data = write_lite_ini(tmp_path / "lite.ini", overrides=overrides).read_text()
    assert data == ("[ascend_context]\nprovider=ge\n\n"
                    "[ge_session_options]\n"
                    "ge.exec.atomicCleanPolicy=1\nge.event=notify\nge.exec.staticMemoryPolicy=2\n"
                    "ge.exec.formatMode=0\nge.exec.precision_mode=must_keep_origin_dtype\n\n"
                    "[graph_kernel_param]\ndisable_cce_lib_ops=MatMul\nenable_cce_lib=true\nopt_level=2\n")


def test_same_arguments_same_bytes_whatever_the_order(tmp_path):
    a = write_lite_ini(tmp_path / "a.ini", "rt.json", {"x": {"b": 1, "a": 2}, "ascend_context": {"p": "q"}})
    b = write_lite_ini(tmp_path / "b.ini", "rt.json", {"ascend_context": {"p": "q"}, "x": {"a": 2, "b": 1}})
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("overrides, fragment", [
    ({"bad]section": {"k": 1}}, "section name"),
    ({"s": {"k=v": 1}}, "key name"),
    ({"s": {"k": "two\nlines"}}, "spans several lines"),
    ({"s": {"k": [1, 2]}}, "is a list"),
    ({"s": "not a table"}, "must be a table"),
])
def test_bad_overrides_are_user_errors_and_write_nothing(tmp_path, overrides, fragment):
    with pytest.raises(UserError, match=fragment):
        write_lite_ini(tmp_path / "lite.ini", overrides=overrides)
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_whole_file(tmp_path):
    path = tmp_path / "lite.ini"
    write_lite_ini(path, "rank_table.json")
    write_lite_ini(path)
    assert path.read_bytes() == ONE_RANK
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lite.ini"]
