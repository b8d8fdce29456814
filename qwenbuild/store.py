"""Atomic promotion of outputs and sealed directories: a killed build never leaves a half artifact that looks
complete; and the one rule of what an output may replace, so nothing the user had is lost (`output_path`)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import stat
import uuid
from pathlib import Path
from typing import Iterable, Iterator

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


def promote(tmp: Path, final: Path, *, link: bool = False) -> None:
    """Move a finished temporary file or directory onto its final path in one step; what is there now must be
    something an output may replace (`refuse_in_the_way`), checked again at this moment."""
    refuse_in_the_way(final, directory=tmp.is_dir() and not tmp.is_symlink(), link=link)
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
def atomic_path(final: str | os.PathLike, *, directory: bool = False, inputs: Iterable = (),
                link: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; promote it when the block succeeds, delete it when it fails.

    Before any work, `final` is checked by the one rule of what an output may replace (`output_path`): it is
    refused when it is, holds or lies inside one of `inputs`. A directory is sealed before promotion, so a later
    run knows it as qwenbuild's; link=True: the output is a symbolic link qwenbuild makes (it may replace one)."""
    final = output_path(final, directory=directory, inputs=inputs, link=link)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create directory {final.parent}: {exc.strerror}",
                        hint="choose an output path in a writable directory") from exc
    if not os.access(final.parent, os.W_OK):
        raise UserError(f"{final.parent} is not writable", hint="choose an output path in a writable directory")
    sweep_stale(final)
    tmp = tmp_sibling(final, "tmp")
    try:
        if directory:  # inside the try: a signal handled just after mkdir returns must still remove it
            tmp.mkdir()
        yield tmp
        if directory and not seal_path(tmp).exists():
            write_seal(tmp)
        promote(tmp, final, link=link)
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
        members = json.loads(seal_path(directory).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(members, dict) or not all(isinstance(v, str) for v in members.values()):
        return None
    return members


def write_seal(directory: str | os.PathLike, within: Iterable[str] | None = None) -> str:
    """Record member digests inside a directory artifact; returns the digest of the whole directory. within: only
    the members below these subdirectories (what qwenbuild wrote into a directory that may hold other files)."""
    members = member_digests(directory)
    if within is not None:
        prefixes = tuple(f"{w}/" for w in within)
        members = {rel: d for rel, d in members.items() if rel.startswith(prefixes)}
    seal_path(directory).write_text(json.dumps(members, indent=1, sort_keys=True) + "\n")
    return json_digest(members)


# ---- what an output may replace: one rule for every command and task

_NOT_FILES = ((stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISFIFO, "a named pipe"),
              (stat.S_ISSOCK, "a socket"))
_SHOWN = 4


def absolute(path: str | os.PathLike) -> Path:
    """An absolute path whose directories are resolved (symbolic links followed) and whose last part is kept."""
    p = Path(os.path.abspath(path))
    if p == Path(p.anchor):
        raise UserError(f"{path} is the root directory", hint="name a file or a new directory for the output")
    try:
        return p.parent.resolve() / p.name
    except (RuntimeError, OSError) as exc:  # a loop of symbolic links in the directories
        raise UserError(f"cannot resolve the directory of {path}: {exc}") from None


def output_path(final: str | os.PathLike, *, directory: bool = False, inputs: Iterable = (),
                link: bool = False) -> Path:
    """`final` made absolute, once it is known to be something an output may be written to: a new path, a regular
    file (a file output), a directory qwenbuild sealed or an empty one (a directory output), qwenbuild's own link
    (link=True); never a device, a pipe or a link into somewhere else, never an input or a hard link of a file inside
    an input directory, nor a directory that holds or lies inside one. Refusals are UserErrors naming what is in the way."""
    final = absolute(final)
    refuse_inputs(final, inputs)
    if directory and final == Path.cwd().resolve():
        raise UserError(f"the output directory {final} is the working directory itself",
                        hint="name a new subdirectory for the output, e.g. ./out")
    refuse_in_the_way(final, directory=directory, link=link)
    return final


def refuse_in_the_way(final: Path, *, directory: bool, link: bool = False) -> None:
    """A UserError when what is at `final` now may not be replaced by an output of this kind."""
    try:
        st = os.lstat(final)
    except (FileNotFoundError, NotADirectoryError):
        return
    if stat.S_ISLNK(st.st_mode):
        if link:
            return
        raise UserError(f"{final} is a symbolic link (to {os.readlink(final)}); an output never replaces a link or "
                        "writes through one", hint="give the path the link points to, or remove the link")
    for test, what in _NOT_FILES:
        if test(st.st_mode):
            raise UserError(f"{final} is {what}, not a regular file; an output is only ever a regular file or a "
                            "new path", hint="choose another output path")
    is_dir = stat.S_ISDIR(st.st_mode)
    if is_dir != directory or link:
        found = "a directory" if is_dir else "a file"
        wanted = "a symbolic link" if link else ("a directory" if directory else "a file")
        raise UserError(f"{final} is {found}, but the output is {wanted}",
                        hint="remove it or choose another output path")
    if is_dir:
        if os.path.ismount(final):
            raise UserError(f"{final} is a mount point; an output directory replaces its whole path",
                            hint="name a new subdirectory inside it for the output")
        foreign = not_ours(final)
        if foreign:
            more = f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else ""
            shown = ", ".join(foreign[:_SHOWN]) + more
            raise UserError(f"{final} holds what qwenbuild did not write there ({shown}); the output would replace "
                            "the whole directory", hint="name a new subdirectory for the output, or move those away")


def not_ours(directory: Path) -> list[str]:
    """Top-level entries of a directory that no seal qwenbuild wrote (its own, else the nearest one above)
    accounts for: everything, when no seal covers it. Members whose bytes changed are still qwenbuild's."""
    entries = _entries(directory)
    if not entries:
        return []
    members = _sealed_members(directory)
    if members is None:
        return sorted({e.split("/", 1)[0] for e in entries})
    ours = {SEAL} | set(members) | {parent for m in members for parent in _parents(m)}
    return sorted({e.split("/", 1)[0] for e in entries if e not in ours and e.rsplit("/", 1)[-1] != SEAL})


def _entries(directory: Path) -> list[str]:
    """Every file, directory and link below `directory`, as POSIX relative paths (links are not followed)."""
    out = []
    for root, dirs, files in os.walk(directory):
        rel = Path(root).relative_to(directory)
        out += [(rel / name).as_posix() for name in dirs + files]
    return out


def _parents(rel: str) -> list[str]:
    parts = rel.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _sealed_members(directory: Path) -> dict[str, str] | None:
    """Members of `directory` by its own seal, or by the seal of the nearest sealed directory above it."""
    here = directory
    while True:
        members = read_seal(here)
        if members is not None:
            prefix = directory.relative_to(here).as_posix()
            if prefix == ".":
                return members
            return {m[len(prefix) + 1:]: d for m, d in members.items() if m.startswith(prefix + "/")}
        if here.parent == here:
            return None
        here = here.parent


def refuse_inputs(final: Path, inputs: Iterable) -> None:
    """A UserError when the output is, holds, or lies inside one of `inputs`, or is a hard link of a file inside an
    input directory (hard links and links resolved)."""
    out = Path(os.path.realpath(final))
    for given in inputs:
        if given is None:
            continue
        real = Path(os.path.realpath(given))
        linked = _hard_link_inside(final, real) if real.is_dir() else None
        if linked is not None:
            raise UserError(f"the output {final} is a hard link of {linked}, inside the input {given}: writing it would "
                            "replace a name of a file the run reads", hint="choose an output path apart from the inputs")
        if out == real or _same_file(final, given):
            why = "is"
        elif out in real.parents:
            why = "holds"
        elif real in out.parents:
            why = "lies inside"
        else:
            continue
        raise UserError(f"the output {final} {why} the input {given}: an output is never written over or into what it is made from",
                        hint="choose an output path apart from the inputs")


def _hard_link_inside(final, directory: Path) -> Path | None:
    """The file inside `directory` that `final` is another name of (a hard link), if any; only a file with more than
    one name is looked for, so a new path or a usual file costs one stat."""
    try:
        st = os.stat(final)
    except OSError:
        return None
    if st.st_nlink < 2 or not stat.S_ISREG(st.st_mode):
        return None
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                other = os.stat(os.path.join(root, name))
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return Path(root) / name
    return None


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def real_file(path: str | os.PathLike) -> Path:
    """The file a path names, symbolic links followed; a loop of links is a UserError."""
    try:
        return Path(path).resolve(strict=False)
    except (RuntimeError, OSError) as exc:  # Python 3.11 raises RuntimeError for a loop of links
        raise UserError(f"{path} is a loop of symbolic links, not a file: {exc}") from None


def write_through(path: str | os.PathLike, data: bytes) -> Path:
    """Replace the bytes of a file the user edits through qwenbuild (`qwenbuild set`), where it really lives: through
    a symbolic link to its target, keeping its mode and owner; a file with other hard links is rewritten in place, so
    every name of it sees the edit. Returns the file written."""
    target = real_file(path)
    st = os.stat(target)
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{target} is not a regular file", hint="edit a regular file")
    if st.st_nlink > 1:
        with open(target, "r+b") as f:
            f.write(data)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        return target
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
        os.chmod(tmp, stat.S_IMODE(st.st_mode))
        with contextlib.suppress(PermissionError):
            os.chown(tmp, st.st_uid, st.st_gid)
    return target


def refuse_not_a_directory(path: str | os.PathLike, what: str = "the output directory") -> None:
    """A directory outputs are written into (not replaced as a whole) must be one, or a new path: a UserError
    naming the path as given when it is a file, a device or a link to one."""
    p = Path(path)
    if p.exists() and not p.is_dir() or p.is_symlink() and not p.exists():
        kind = "a symbolic link to nothing" if not p.exists() else "a device or pipe" if not p.is_file() else "a file"
        raise UserError(f"{what} {path} is {kind}, not a directory", hint="name a directory, or a new path")
