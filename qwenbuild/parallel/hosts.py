"""Is this machine the node qwen.toml names? Its host name, and whether an address is one of its own."""

from __future__ import annotations

import socket


def host_names() -> set[str]:
    """This machine's names, lower case: as it calls itself, fully qualified, and the short form."""
    names = {socket.gethostname(), socket.getfqdn()}
    return {n.lower() for n in names} | {n.split(".")[0].lower() for n in names}


def is_local_address(ip: str) -> bool:
    """True when `ip` is an address of this machine (a socket can be bound to it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True


def is_this_host(host: str) -> bool:
    """True when `host` is this machine's name (full or short), or a name that resolves to one of its addresses
    (`localhost`)."""
    if host.lower() in host_names() or host.split(".")[0].lower() in host_names():
        return True
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, socket.AF_INET)}
    except OSError:
        return False
    return any(is_local_address(a) for a in addresses)


def identity_problem(host: str, ip: str) -> str | None:
    """Why this machine is not the node qwen.toml gives as `host` at `ip`, naming both sides; None when it is."""
    wrong = []
    if not is_this_host(host):
        wrong.append(f"its host name is {socket.gethostname()}, not {host}")
    if not is_local_address(ip):
        wrong.append(f"it has no address {ip}")
    return "; ".join(wrong) or None
