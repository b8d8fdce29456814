"""Atomic promotion of outputs and sealed directories: a killed build never leaves a half artifact that looks complete."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from qwenbuild.digests import content_digest, json_digest
from qwenbuild.errors import UserError

SEAL = ".qwenbuild-seal.json"
_CHUNK = 1 << 20
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def tmp_sibling(final: Path, kind: str) -> Path:
    return final.parent / f".{final.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _fsync_tree(path: Path) -> None:
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def promote(tmp: Path, final: Path) -> None:
    """Move a finished temporary file or directory onto its final path in one step."""
    _fsync_tree(tmp)
    if tmp.is_dir() and final.exists():
        # os.replace cannot overwrite a non-empty directory: swap atomically, then drop the old one
        if _exchange(tmp, final):
            remove(tmp)
            return
        old = tmp_sibling(final, "old")
        os.replace(final, old)
        os.replace(tmp, final)
        remove(old)
        return
    os.replace(tmp, final)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_SUFFIX = re.compile(r"\.[a-z]+-(\d+)-[0-9a-f]{8}")


def sweep_stale(final: Path) -> None:
    """Remove temporaries of `final` left by killed processes, and temporaries of those temporaries (a writer that
    promotes its own output atomically, given a temporary directory to write into)."""
    for leftover in final.parent.glob(f".*{glob_escape(final.name)}.*-*-*"):
        dots = len(leftover.name) - len(leftover.name.lstrip("."))
        rest = leftover.name[dots:]
        if not rest.startswith(final.name + "."):
            continue
        suffixes = _SUFFIX.findall(rest[len(final.name):])
        if len(suffixes) == dots and _SUFFIX.sub("", rest[len(final.name):]) == "" and \
                not all(_pid_alive(int(pid)) for pid in suffixes):
            remove(leftover)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; promote it when the block succeeds, delete it when it fails."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create directory {final.parent}: {exc.strerror}",
                        hint="choose an output path in a writable directory") from exc
    if not os.access(final.parent, os.W_OK):
        raise UserError(f"{final.parent} is not writable", hint="choose an output path in a writable directory")
    # a symbolic link (to a directory too) is replaced like a file
    is_dir = final.is_dir() and not final.is_symlink()
    if is_dir != directory and final.exists():
        # checked before the work: promotion would fail only after it
        found, wanted = ("a directory", "a file") if is_dir else ("a file", "a directory")
        raise UserError(f"{final} is {found}, but the output is {wanted}",
                        hint="remove it or choose another output path")
    sweep_stale(final)
    tmp = tmp_sibling(final, "tmp")
    try:
        if directory:  # inside the try: a signal handled just after mkdir returns must still remove it
            tmp.mkdir()
        yield tmp
        promote(tmp, final)
    except OSError as exc:
        remove(tmp)
        if exc.errno in _DISK_ERRNOS:
            raise UserError(f"no space left while writing {final} ({exc.strerror}); nothing was changed there",
                            hint="free disk space or point the output elsewhere, then run again") from exc
        if _names_temporary(exc, tmp):  # the user knows the path they asked for, not our temporary sibling
            raise UserError(f"cannot write {final}: {exc.strerror}; nothing was changed there",
                            hint="check the permissions of its directory, or choose another output path") from exc
        raise
    except BaseException:
        remove(tmp)
        raise


def _names_temporary(exc: OSError, tmp: Path) -> bool:
    return any(f is not None and (Path(f) == tmp or tmp in Path(f).parents) for f in (exc.filename, exc.filename2))


def member_digests(directory: str | os.PathLike) -> dict[str, str]:
    """Digest of every file below a directory, by POSIX relative path, excluding its seal."""
    root = Path(directory)
    return {p.relative_to(root).as_posix(): content_digest(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != SEAL}


def seal_path(directory: str | os.PathLike) -> Path:
    """The member-digest file that marks a directory artifact as complete."""
    return Path(directory) / SEAL


def read_seal(directory: str | os.PathLike) -> dict[str, str] | None:
    """The member digests a directory artifact's seal records, or None when it has no readable seal."""
    try:
        return json.loads(seal_path(directory).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


def write_seal(directory: str | os.PathLike) -> str:
    """Record member digests inside a directory artifact; returns the digest of the whole directory."""
    members = member_digests(directory)
    seal_path(directory).write_text(json.dumps(members, indent=1, sort_keys=True) + "\n")
    return json_digest(members)
