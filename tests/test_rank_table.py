"""Rank tables in the hccl_tools / merge_hccl format, field by field, and where device IPs come from."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from qwenbuild.cli import main as cli
from qwenbuild.errors import UserError
from qwenbuild.parallel import rank_table as rt

SERVERS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]


def npu_ip(node: int, device: int) -> str:
    return f"192.168.{node}.{100 + device}"


def node_table(node: int) -> dict:
    return rt.node_rank_table(SERVERS[node], [(d, npu_ip(node, d)) for d in range(8)])


def expected_node(node: int, first_rank: int = 0) -> dict:
    return {
        "server_id": SERVERS[node],
        "device": [{"device_id": str(d), "device_ip": npu_ip(node, d), "rank_id": str(first_rank + d)}
                   for d in range(8)],
        "host_nic_ip": "reserve",
    }


@pytest.mark.parametrize("text, expected", [
    ("[0,8)", range(0, 8)), ("[0,8]", range(0, 8)), (" [ 2 , 6 ) ", range(2, 6)), ("[10,16)", range(10, 16)),
])
def test_device_range_accepts_both_brackets_and_multi_digit(text, expected):
    assert rt.parse_device_range(text, device_num_per_node=16) == expected


@pytest.mark.parametrize("text", ["0,8", "[8,0)", "[0,9)", "[a,8)", "[0,8"])
def test_device_range_rejects_bad_ranges(text):
    with pytest.raises(UserError, match="--device_num"):
        rt.parse_device_range(text)


def test_one_node_of_eight_matches_hccl_tools_format():
    table = node_table(0)
    assert table == {"version": "1.0", "server_count": "1", "server_list": [expected_node(0)],
                     "status": "completed"}
    assert list(table) == ["version", "server_count", "server_list", "status"]
    assert list(table["server_list"][0]) == ["server_id", "device", "host_nic_ip"]
    assert list(table["server_list"][0]["device"][0]) == ["device_id", "device_ip", "rank_id"]
    text = rt.dumps(table)
    assert text.startswith('{\n    "version": "1.0",\n    "server_count": "1",\n    "server_list": [\n')
    assert not text.endswith("\n")
    assert rt.node_file_name(table) == "hccl_8p_01234567_10.0.0.1.json"


def test_four_nodes_merge_in_file_order_with_global_ranks():
    merged = rt.merge_rank_tables([node_table(n) for n in range(4)])
    assert merged == {"version": "1.0", "server_count": "4",
                      "server_list": [expected_node(n, 8 * n) for n in range(4)], "status": "completed"}
    assert all(isinstance(v, str) for s in merged["server_list"] for d in s["device"] for v in d.values())
    assert rt.merged_file_name(merged) == "hccl_4s_32p.json"
    # file order is rank order: node 3 first takes ranks 0..7
    swapped = rt.merge_rank_tables([node_table(3), node_table(0)])
    assert swapped["server_list"][0] == expected_node(3, 0)
    assert swapped["server_list"][1] == expected_node(0, 8)


def test_rank_table_for_nodes_uses_listed_ips():
    nodes = [{"ip": SERVERS[n], "device_ids": list(range(8)), "device_ips": [npu_ip(n, d) for d in range(8)]}
             for n in range(4)]
    tables, merged = rt.rank_table_for_nodes(nodes)
    assert tables[2] == node_table(2)
    assert merged == rt.merge_rank_tables([node_table(n) for n in range(4)])


def test_device_ip_from_hccn_conf_and_clear_error(tmp_path):
    conf = tmp_path / "hccn.conf"
    conf.write_text("address_0=192.98.92.100\nnetmask_0=255.255.255.0\naddress_1=192.98.93.101\n")
    assert rt.discover_device_ip(1, conf) == "192.98.93.101"
    with pytest.raises(UserError) as err:
        rt.discover_device_ip(3, conf)
    assert "device 3" in str(err.value) and "address_3" in str(err.value)
    with pytest.raises(UserError, match="does not exist"):
        rt.discover_device_ip(0, tmp_path / "missing.conf")


def test_device_ip_from_hccn_tool_output(tmp_path, monkeypatch):
    # hccn_tool is the Ascend driver's tool; this stand-in prints its documented output shape
    tool = tmp_path / "bin" / "hccn_tool"
    tool.parent.mkdir()
    tool.write_text('#!/bin/sh\necho "ipaddr:192.98.92.$2"\necho "netmask:255.255.255.0"\n')
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}{os.pathsep}{os.environ['PATH']}")
    assert rt.discover_device_ip(7, tmp_path / "missing.conf") == "192.98.92.7"


def test_hccl_tools_and_merge_hccl_commands(tmp_path, capsys):
    paths = []
    for n in range(4):
        conf = tmp_path / f"hccn{n}.conf"
        conf.write_text("".join(f"address_{d}={npu_ip(n, d)}\n" for d in range(8)))
        assert cli(["hccl_tools", "--device_num", "[0,8]", "--server_ip", SERVERS[n], "--hccn_conf", str(conf)]) == 0
        paths.append(Path("hccl_8p_01234567_" + SERVERS[n] + ".json"))
        assert paths[-1].read_text() == rt.dumps(node_table(n))
    assert cli(["merge_hccl", *map(str, paths), "--output", "merged.json"]) == 0
    assert json.loads(Path("merged.json").read_text()) == rt.merge_rank_tables([node_table(n) for n in range(4)])


def test_visible_devices_map_logical_to_physical(tmp_path):
    conf = tmp_path / "hccn.conf"
    conf.write_text("".join(f"address_{d}=10.1.1.{d}\n" for d in range(8)))
    assert cli(["hccl_tools", "--device_num", "[0,2)", "--visible_devices", "4,5", "--server_ip", "10.0.0.9",
                "--hccn_conf", str(conf), "--output", "t.json"]) == 0
    devices = json.loads(Path("t.json").read_text())["server_list"][0]["device"]
    assert devices == [{"device_id": "4", "device_ip": "10.1.1.4", "rank_id": "0"},
                       {"device_id": "5", "device_ip": "10.1.1.5", "rank_id": "1"}]


def test_server_id_is_never_silently_loopback(tmp_path, capsys):
    conf = tmp_path / "hccn.conf"
    conf.write_text("address_0=10.1.1.1\n")
    args = ["hccl_tools", "--device_num", "[0,1)", "--hccn_conf", str(conf)]
    if socket.gethostbyname(socket.gethostname()).startswith("127."):
        assert cli(args) == 2
        assert "loopback" in capsys.readouterr().err
        assert not list(Path(".").glob("hccl_*.json"))
    assert cli(args + ["--server_ip", "127.0.0.1", "--output", "lo.json"]) == 0  # explicit is allowed
    with pytest.raises(UserError):
        rt.node_rank_table("not-an-ip", [(0, "10.1.1.1")])


def test_merge_hccl_names_the_bad_file(tmp_path, capsys):
    Path("bad.json").write_text('{"version": "1.0", "server_list": [{"server_id": "1.2.3.4", "device": [{}]}]}')
    assert cli(["merge_hccl", "bad.json"]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "device_id" in err


def test_each_nodes_ips_come_from_that_node(tmp_path):
    """Listed IPs, or the table hccl_tools wrote on the node; the build host's own config describes it alone."""
    written = tmp_path / "node1.json"
    rt.write_rank_table(node_table(1), written)
    conf = tmp_path / "hccn.conf"
    conf.write_text("".join(f"address_{d}={npu_ip(2, d)}\n" for d in range(8)))
    nodes = [{"ip": SERVERS[0], "host": "a", "device_ids": list(range(8)), "device_ips": [npu_ip(0, d) for d in range(8)]},
             {"ip": SERVERS[1], "host": "b", "device_ids": list(range(8)), "rank_table": str(written)},
             {"ip": SERVERS[2], "host": "c", "device_ids": list(range(8))}]
    tables, merged = rt.rank_table_for_nodes(nodes, "hccn_conf", conf, this_host={SERVERS[2]})
    assert tables == [node_table(0), node_table(1), node_table(2)]
    assert merged == rt.merge_rank_tables(tables)
    with pytest.raises(UserError) as err:
        rt.rank_table_for_nodes(nodes, "hccn_conf", conf, this_host={"10.9.9.9"})
    assert "hardware.nodes[2] (c, " in str(err.value) and "device IPs are unknown" in str(err.value)
    nodes[1]["rank_table"] = str(tmp_path / "other.json")
    rt.write_rank_table(node_table(3), nodes[1]["rank_table"])
    with pytest.raises(UserError, match="is not the table of hardware.nodes\\[1\\]"):
        rt.rank_table_for_nodes(nodes, "hccn_conf", conf, this_host={SERVERS[2]})
