"""qwen.lock: per task, the digests of its artifacts and inputs and the manifest slice it was built from.

The lock is both the record of what was built from what and the test of whether an artifact can be trusted.
It holds content only, so two clean builds of the same inputs give identical lock files; the size, mtime, ctime
and inode seen when each artifact (or input file) was recorded live beside it in qwen.lock.stat, a cache that lets
a no-op build skip reading files. A file whose stat differs is re-hashed (ctime catches a write whose mtime was put
back; the inode, a file replaced by a copy), and one whose bytes differ is rebuilt; a re-hash that finds the same
bytes refreshes the cache."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from qwenbuild.digests import content_digest, json_digest
from qwenbuild.errors import UserError
from qwenbuild.jsonfile import BadJSON, parse_json
from qwenbuild.store import SEAL, atomic_path, member_digests, read_seal

LOCK_VERSION = 1


def file_stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _members(path: Path) -> list[Path]:
    return [p for p in sorted(path.rglob("*")) if p.is_file() and p.name != SEAL]


def describe_artifact(path: Path) -> tuple[dict, dict[str, list[int]]]:
    """(lock entry, stats by absolute path) of a file, or of every member of a directory artifact."""
    if path.is_dir():
        members = member_digests(path)
        stats = {str(path / rel): file_stat(path / rel) for rel in members}
        return {"kind": "dir", "digest": json_digest(members), "members": members}, stats
    return {"kind": "file", "digest": content_digest(path)}, {str(path): file_stat(path)}


def _intact_file(path: Path, digest: str, stats: dict, refreshed: dict | None) -> str | None:
    if not path.is_file():
        return f"{path} is missing"
    seen = file_stat(path)
    if stats.get(str(path)) == seen:
        return None  # unchanged since it was recorded: trust without reading
    if content_digest(path) != digest:
        return f"{path} changed since it was built (digest differs from qwen.lock)"
    if refreshed is not None:
        refreshed[str(path)] = seen
    return None


def check_artifact(path: Path, entry: dict, stats: dict, refreshed: dict | None = None) -> str | None:
    """None when the artifact still matches its lock entry, else the reason it does not; files re-hashed and found
    unchanged go into `refreshed` with their new stat."""
    if entry.get("kind") != "dir":
        return _intact_file(path, entry["digest"], stats, refreshed)
    if not path.is_dir():
        return f"{path} is missing"
    if {p.relative_to(path).as_posix() for p in _members(path)} != set(entry["members"]):
        return f"{path} gained or lost files since it was built"
    for rel, digest in entry["members"].items():
        reason = _intact_file(path / rel, digest, stats, refreshed)
        if reason:
            return reason
    return None


def check_sealed(directory: Path, stats: dict) -> str | None:
    """None when a directory's members still have the digests its own seal records, else why not."""
    members = read_seal(directory)
    if members is None:
        return f"{directory} has no seal: it was never completed"
    return check_artifact(directory, {"kind": "dir", "members": members}, stats)


def _is_table(value, values) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and values(v) for k, v in value.items())


def _artifact_problem(art) -> str | None:
    if not isinstance(art, dict) or art.get("kind") not in ("file", "dir") or not isinstance(art.get("digest"), str):
        return "an artifact is not {\"kind\": \"file\" or \"dir\", \"digest\": text}"
    if art["kind"] == "dir" and not _is_table(art.get("members"), lambda v: isinstance(v, str)):
        return "a directory artifact has no table of member digests"
    return None


def entry_problem(entry) -> str | None:
    """Why a task's lock entry does not have the shape qwenbuild writes, or None."""
    if not isinstance(entry, dict):
        return "the entry is not a JSON object"
    for key in ("artifacts", "inputs", "manifest", "toolchain"):
        if not isinstance(entry.get(key), dict):
            return f"no {key!r} table"
    if not _is_table(entry["inputs"], lambda v: v is None or isinstance(v, str)):
        return "an input digest is not text"
    for art in entry["artifacts"].values():
        problem = _artifact_problem(art)
        if problem:
            return problem
    return None


def _dump(value) -> str:
    return json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


class Lock:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.stat_path = self.path.with_name(self.path.name + ".stat")

    def read(self) -> dict:
        """The lock's content; none yet (or of another lock version) is an empty one, a damaged one an error."""
        try:
            data = parse_json(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"version": LOCK_VERSION, "tasks": {}}
        except (BadJSON, UnicodeDecodeError) as exc:
            raise self._damaged(f"not valid JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("tasks", {}), dict):
            raise self._damaged("not a JSON object with a \"tasks\" table")
        if data.get("version") != LOCK_VERSION:
            return {"version": LOCK_VERSION, "tasks": {}}
        for task, entry in data.get("tasks", {}).items():
            problem = entry_problem(entry)
            if problem:
                raise self._damaged(f"task {task!r}: {problem}")
        return data

    def _damaged(self, why: str) -> UserError:
        return UserError(f"{self.path} is damaged ({why}), so what was built from what is unknown",
                         hint=f"delete {self.path.name} to rebuild and record every artifact again, or restore it "
                              "from a copy")

    def read_stats(self) -> dict:
        try:
            stats = parse_json(self.stat_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, BadJSON, UnicodeDecodeError):
            return {}  # only a cache: every artifact is re-hashed instead
        return stats if isinstance(stats, dict) else {}

    @contextlib.contextmanager
    def _writing(self):
        """One writer at a time: a build records while `qwenbuild plan` may refresh the stat cache."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".mutex"), "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _write(self, data: dict, stats: dict | None = None) -> None:
        with atomic_path(self.path) as tmp:
            tmp.write_text(_dump(data), encoding="utf-8")
        if stats is not None:
            with atomic_path(self.stat_path) as tmp:
                tmp.write_text(_dump(stats), encoding="utf-8")

    def entry(self, task: str) -> dict | None:
        return self.read()["tasks"].get(task)

    def record(self, task: str, artifacts: list[Path], inputs: dict[str, str], manifest: dict,
               toolchain: dict, root: Path, input_stats: dict[str, list[int]] | None = None,
               machine: dict | None = None) -> dict:
        """Write the task's entry; input_stats are the stats of its input files when their digests were taken,
        machine what of this machine the artifacts' numbers depend on (an entry holds it only when given)."""
        described, seen = {}, dict(input_stats or {})
        for path in artifacts:
            described[os.path.relpath(path, root)], stats = describe_artifact(path)
            seen.update(stats)
        entry = {"artifacts": described, "inputs": dict(sorted(inputs.items())), "manifest": manifest,
                 "toolchain": toolchain, **({"machine": machine} if machine else {})}
        with self._writing():
            data, stats = self.read(), self.read_stats()
            data["tasks"][task] = entry
            data["tasks"] = dict(sorted(data["tasks"].items()))
            stats.update(seen)
            self._write(data, dict(sorted(stats.items())))
        return entry

    def forget(self, task: str) -> None:
        with self._writing():
            data = self.read()
            if data["tasks"].pop(task, None) is not None:
                self._write(data)

    def intact(self, task: str, root: Path) -> str | None:
        """None when every artifact of `task` matches the lock, else why the task must run."""
        entry = self.entry(task)
        if entry is None:
            return f"{task} has no entry in qwen.lock"
        stats, refreshed = self.read_stats(), {}
        for rel, art in entry["artifacts"].items():
            reason = check_artifact(root / rel, art, stats, refreshed)
            if reason:
                return reason
        if refreshed:
            self._refresh(refreshed)
        return None

    def _refresh(self, seen: dict) -> None:
        """Remember stats of files whose bytes were just confirmed, so the next check need not read them."""
        try:
            with self._writing():
                stats = self.read_stats()
                stats.update(seen)
                with atomic_path(self.stat_path) as tmp:
                    tmp.write_text(_dump(dict(sorted(stats.items()))), encoding="utf-8")
        except OSError:
            pass  # only a cache: a read-only build dir still checks correctly, just slower

    def digest_of(self, path: Path, root: Path) -> str | None:
        """Digest recorded for an artifact path (a file, a directory, or a member of a directory)."""
        rel = os.path.relpath(path, root)
        for entry in self.read()["tasks"].values():
            for art_rel, art in entry["artifacts"].items():
                if art_rel == rel:
                    return art["digest"]
                if art.get("kind") == "dir" and rel.startswith(art_rel + "/"):
                    member = art["members"].get(rel[len(art_rel) + 1:])
                    if member:
                        return member
        return None
