"""RANK_TABLE_FILE JSON in the hccl_tools / merge_hccl format: per-node tables, their merge, device IP discovery."""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import subprocess
from pathlib import Path

from qwenbuild.errors import UserError
from qwenbuild.jsonfile import read_bytes, read_json
from qwenbuild.processes import run_child
from qwenbuild.store import atomic_path

_RANGE_RE = re.compile(r"^\s*\[\s*(\d+)\s*,\s*(\d+)\s*[\)\]]\s*$")
_HCCN_CONF = "/etc/hccn.conf"


def parse_device_range(text: str, device_num_per_node: int = 8) -> range:
    """Logical device indices of "[a,b)" or "[a,b]"; both mean a..b-1, as hccl_tools and run_multinode.sh read them."""
    m = _RANGE_RE.match(str(text))
    if not m:
        raise UserError(f"--device_num {text!r} is not a device range",
                        hint='write it as "[0,8)" (half-open, quoted so the shell leaves the brackets alone)')
    start, end = int(m.group(1)), int(m.group(2))
    if start >= end:
        raise UserError(f"--device_num {text!r} is empty: start {start} must be below end {end}")
    if end > device_num_per_node:
        raise UserError(f"--device_num {text!r} ends at {end}, beyond the {device_num_per_node} devices of a node",
                        hint="raise --device_num_per_node or shrink the range")
    return range(start, end)


def parse_visible_devices(text: str) -> list[int]:
    try:
        ids = [int(x) for x in str(text).split(",") if x.strip() != ""]
    except ValueError:
        raise UserError(f"--visible_devices {text!r} must be comma-separated device ids, like 0,1,2,3")
    if not ids or len(set(ids)) != len(ids):
        raise UserError(f"--visible_devices {text!r} must list distinct device ids")
    return ids


def physical_devices(device_range: range, visible_devices: list[int]) -> list[int]:
    """Map logical indices to physical device ids (containers expose a subset of the NPUs)."""
    if device_range.stop > len(visible_devices):
        raise UserError(f"device range [{device_range.start},{device_range.stop}) needs {device_range.stop} visible "
                        f"devices but --visible_devices lists {len(visible_devices)}")
    return [visible_devices[i] for i in device_range]


def check_ip(value: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(str(value).strip()))
    except ValueError:
        raise UserError(f"{what} {value!r} is not an IP address")


def detect_server_ip() -> str:
    """This host's address as hccl_tools finds it, refusing the loopback address many hosts resolve to."""
    try:
        ip = socket.gethostbyname(socket.gethostname())
    except OSError as exc:
        raise UserError(f"cannot resolve this host's name to an address ({exc})",
                        hint="pass --server_ip with the node's cluster IP")
    if ipaddress.ip_address(ip).is_loopback:
        raise UserError(f"this host's name resolves to the loopback address {ip}, which other nodes cannot reach",
                        hint="pass --server_ip with the node's cluster IP (or list it in qwen.toml hardware.nodes)")
    return ip


def _ip_from_hccn_tool(device_id: int) -> str | None:
    try:
        out = run_child(["hccn_tool", "-i", str(device_id), "-ip", "-g"], capture_output=True, text=True,
                        timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.stdout.splitlines():
        if line.strip().startswith("ipaddr") and ":" in line:
            return line.split(":", 1)[1].strip() or None
    return None


def _ip_from_hccn_conf(device_id: int, hccn_conf: str | Path) -> str | None:
    try:
        text = read_bytes(hccn_conf, "hccn.conf", limit=1 << 20).decode("utf-8", errors="replace")
    except OSError:
        return None
    for lineno, line in enumerate(text.splitlines(), start=1):
        key, _, value = line.strip().partition("=")
        if key.strip() == f"address_{device_id}" and value.strip():
            return check_ip(value, f"{hccn_conf} line {lineno}: address_{device_id}")
    return None


def discover_device_ip(device_id: int, hccn_conf: str | Path = _HCCN_CONF, use_hccn_tool: bool = True) -> str:
    """NPU IP of one device: `hccn_tool -i N -ip -g`, then address_N in /etc/hccn.conf."""
    ip = _ip_from_hccn_tool(device_id) if use_hccn_tool else None
    if ip is None:
        ip = _ip_from_hccn_conf(device_id, hccn_conf)
    if ip is None:
        tried = f"`hccn_tool -i {device_id} -ip -g` gave no ipaddr line and " if use_hccn_tool else ""
        conf = f"{hccn_conf} has no address_{device_id} line" if Path(hccn_conf).is_file() else \
            f"{hccn_conf} does not exist"
        raise UserError(f"no IP found for device {device_id}: {tried}{conf}",
                        hint=f"list the NPU IPs in qwen.toml (hardware.nodes[].device_ips), or add "
                             f"address_{device_id}=<ip> to {hccn_conf}, or install the Ascend driver tools")
    return check_ip(ip, f"IP of device {device_id}")


def node_rank_table(server_id: str, devices: list[tuple[int, str]]) -> dict:
    """One node's table; rank_id counts from 0 in device order, as hccl_tools writes it."""
    if not devices:
        raise UserError(f"node {server_id} has no devices")
    return {
        "version": "1.0",
        "server_count": "1",
        "server_list": [{
            "server_id": check_ip(server_id, "server_id"),
            "device": [{"device_id": str(int(d)), "device_ip": check_ip(ip, f"IP of device {d}"), "rank_id": str(r)}
                       for r, (d, ip) in enumerate(devices)],
            "host_nic_ip": "reserve",
        }],
        "status": "completed",
    }


def merge_rank_tables(tables: list[dict], sources: list[str] | None = None) -> dict:
    """Concatenate servers in the given order and renumber rank_id 0..N-1, as merge_hccl does; `sources` name
    the tables in messages."""
    _refuse_repeats(tables, sources or [f"table {i + 1}" for i in range(len(tables))])
    servers, rank = [], 0
    for table in tables:
        for server in table["server_list"]:
            devices = []
            for device in server["device"]:
                devices.append({**device, "rank_id": str(rank)})
                rank += 1
            servers.append({**server, "device": devices})
    return {"version": "1.0", "server_count": str(len(servers)), "server_list": servers, "status": "completed"}


def _refuse_repeats(tables: list[dict], sources: list[str]) -> None:
    """A server or an NPU IP listed twice (the same node file given twice) would make HCCL hang, not fail."""
    servers: dict[str, str] = {}
    ips: dict[str, str] = {}
    for source, table in zip(sources, tables):
        for server in table["server_list"]:
            sid = server["server_id"]
            if sid in servers:
                raise UserError(f"server {sid} is in both {servers[sid]} and {source}",
                                hint="give each node's table once, in node order")
            servers[sid] = source
            for device in server["device"]:
                ip = device["device_ip"]
                if ip in ips:
                    raise UserError(f"device IP {ip} is in both {ips[ip]} and {source}: every NPU has its own IP",
                                    hint="check each node's hccn.conf / hardware.nodes[].device_ips")
                ips[ip] = source


def node_file_name(table: dict) -> str:
    server = table["server_list"][0]
    ids = "".join(d["device_id"] for d in server["device"])
    return f"hccl_{len(server['device'])}p_{ids}_{server['server_id']}.json"


def merged_name(server_count: int, rank_count: int) -> str:
    """merge_hccl's name for the merged table: hccl_<servers>s_<ranks>p.json."""
    return f"hccl_{server_count}s_{rank_count}p.json"


def merged_file_name(table: dict) -> str:
    return merged_name(int(table["server_count"]), sum(len(s["device"]) for s in table["server_list"]))


def first_devices(table: dict, count: int) -> dict:
    """The table of one node's first `count` devices (ranks 0..count-1): a topology of its own on that node, as the
    original exports and serves on the first cards of one server."""
    server = table["server_list"][0]
    if len(server["device"]) < count:
        raise UserError(f"the first server of the rank table has {len(server['device'])} devices, fewer than {count}")
    devices = [dict(d, rank_id=str(i)) for i, d in enumerate(server["device"][:count])]
    return dict(table, server_count="1", server_list=[dict(server, device=devices)])


def dumps(table: dict) -> str:
    return json.dumps(table, indent=4)


def write_rank_table(table: dict, path: str | Path, inputs=()) -> Path:
    path = Path(path)
    with atomic_path(path, inputs=inputs) as tmp:
        tmp.write_text(dumps(table), encoding="utf-8")
    return path


def read_rank_table(path: str | Path) -> dict:
    """Load and check a per-node or merged table, naming the file and field that is wrong."""
    path = Path(path)
    table = read_json(path, "rank table", hint="pass files written by hccl_tools")
    if not isinstance(table, dict) or not isinstance(table.get("server_list"), list) or not table["server_list"]:
        raise UserError(f"rank table {path} has no server_list", hint="pass files written by hccl_tools")
    for i, server in enumerate(table["server_list"]):
        where = f"rank table {path}: server_list[{i}]"
        if not isinstance(server, dict):
            raise UserError(f"{where} is not an object with server_id and device")
        for key in ("server_id", "device"):
            if key not in server:
                raise UserError(f"{where} lacks {key!r}")
        _check_text(server["server_id"], f"{where}.server_id", ip=True)
        if not isinstance(server["device"], list):
            raise UserError(f"{where}.device is not a list of devices")
        for j, device in enumerate(server["device"]):
            if not isinstance(device, dict):
                raise UserError(f"{where}.device[{j}] is not an object with device_id, device_ip and rank_id")
            missing = {"device_id", "device_ip", "rank_id"} - set(device)
            if missing:
                raise UserError(f"{where}.device[{j}] lacks {', '.join(sorted(missing))}")
            _check_text(device["device_ip"], f"{where}.device[{j}].device_ip", ip=True)
            for key in ("device_id", "rank_id"):
                _check_text(device[key], f"{where}.device[{j}].{key}", ip=False)
    return table


def _check_text(value, where: str, ip: bool) -> None:
    """hccl_tools writes every value as a string: an IP address, or a number in digits."""
    if not isinstance(value, str):
        raise UserError(f"{where} is {json.dumps(value)}, not a string", hint="pass files written by hccl_tools")
    if ip:
        check_ip(value, where)
    elif not value.isdigit() or not value.isascii():
        raise UserError(f"{where} {value!r} is not a number in digits", hint="pass files written by hccl_tools")


def this_host_addresses() -> set[str]:
    """The IPv4 addresses of this machine's interfaces (what `hostname -I` lists), plus its name's address."""
    found = set()
    try:
        found.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    try:
        out = run_child(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout
        found.update(a for a in out.split() if "." in a)
    except (OSError, subprocess.TimeoutExpired):
        pass
    return found


def _node_devices(node: dict, n: int, device_ip_source: str, hccn_conf, here: set[str]) -> list[tuple[int, str]]:
    """(device id, device IP) of one node: listed in qwen.toml, read from the table hccl_tools wrote on that node,
    or, for this machine only, discovered with hccn_tool / hccn.conf."""
    ids = [int(d) for d in node["device_ids"]]
    name = f"hardware.nodes[{n}] ({node.get('host') or node['ip']}, {node['ip']})"
    if node.get("device_ips"):
        ips = list(node["device_ips"])
        if len(ips) != len(ids):
            raise UserError(f"{name} lists {len(ips)} device IPs for {len(ids)} devices")
        return list(zip(ids, ips))
    if node.get("rank_table"):
        table = read_rank_table(node["rank_table"])
        servers = table["server_list"]
        if len(servers) != 1 or servers[0]["server_id"] != node["ip"]:
            raise UserError(f"{node['rank_table']} is not the table of {name}: it describes "
                            f"{', '.join(s['server_id'] for s in servers)}",
                            hint=f"run `qwenbuild hccl_tools --server_ip {node['ip']}` on that node")
        listed = {int(d["device_id"]): d["device_ip"] for d in servers[0]["device"]}
        missing = [d for d in ids if d not in listed]
        if missing:
            raise UserError(f"{node['rank_table']} lists no device {missing[0]} of {name}",
                            hint="write it with --device_num covering every device the node uses")
        return [(d, listed[d]) for d in ids]
    if node["ip"] in here:
        return [(d, discover_device_ip(d, hccn_conf, device_ip_source == "hccn_tool")) for d in ids]
    raise UserError(f"{name}: its device IPs are unknown, and this machine's hccn_tool or {hccn_conf} only describe "
                    "this machine",
                    hint=f"list them in qwen.toml (hardware.nodes[{n}].device_ips), or run `qwenbuild hccl_tools "
                         f"--server_ip {node['ip']}` on that node and set hardware.nodes[{n}].rank_table to the "
                         "file it writes")


def rank_table_for_nodes(nodes: list[dict], device_ip_source: str = "hccn_tool", hccn_conf: str | Path = _HCCN_CONF,
                         this_host: set[str] | None = None) -> tuple[list[dict], dict]:
    """Per-node tables and the merged one from [{"ip", "device_ids", "device_ips"? | "rank_table"?}, ...] in rank
    order; this_host: the addresses of the machine running this (default: its interfaces)."""
    here = this_host_addresses() if this_host is None else this_host
    tables = [node_rank_table(node["ip"], _node_devices(node, n, device_ip_source, hccn_conf, here))
              for n, node in enumerate(nodes)]
    return tables, merge_rank_tables(tables, [f"hardware.nodes[{n}]" for n in range(len(nodes))])
