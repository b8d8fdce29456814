"""qwen.lock: per task, the digests of its artifacts and inputs and the manifest slice it was built from.

The lock is both the record of what was built from what and the test of whether an artifact can be trusted:
an artifact whose size or mtime differs from its entry is re-hashed, and one whose bytes differ is rebuilt."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from qwenbuild.store import DIR_MANIFEST, atomic_path, content_digest, json_digest, member_digests

LOCK_VERSION = 1


def _stat(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def describe_artifact(path: Path) -> dict:
    """Digest and stat of a file, or of every member of a directory artifact."""
    if path.is_dir():
        members = member_digests(path)
        return {"kind": "dir", "digest": json_digest(members),
                "members": {rel: {"digest": d, **_stat(path / rel)} for rel, d in members.items()}}
    return {"kind": "file", "digest": content_digest(path), **_stat(path)}


def _intact_file(path: Path, entry: dict) -> str | None:
    if not path.is_file():
        return f"{path} is missing"
    if _stat(path) == {"size": entry["size"], "mtime_ns": entry["mtime_ns"]}:
        return None  # unchanged since it was recorded: trust without reading
    if content_digest(path) != entry["digest"]:
        return f"{path} changed since it was built (digest differs from qwen.lock)"
    return None


def check_artifact(path: Path, entry: dict) -> str | None:
    """None when the artifact still matches its lock entry, else the reason it does not."""
    if entry.get("kind") == "dir":
        if not path.is_dir():
            return f"{path} is missing"
        present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != DIR_MANIFEST}
        if present != set(entry["members"]):
            return f"{path} gained or lost files since it was built"
        for rel, member in entry["members"].items():
            reason = _intact_file(path / rel, {"kind": "file", **member})
            if reason:
                return reason
        return None
    return _intact_file(path, entry)


class Lock:
    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return {"version": LOCK_VERSION, "tasks": {}}
        return data if data.get("version") == LOCK_VERSION else {"version": LOCK_VERSION, "tasks": {}}

    @contextlib.contextmanager
    def _exclusive(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".flock"), "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def entry(self, task: str) -> dict | None:
        return self.read()["tasks"].get(task)

    def record(self, task: str, artifacts: dict[str, Path], inputs: dict[str, str], manifest: dict,
               toolchain: dict, root: Path) -> dict:
        entry = {
            "artifacts": {str(p.relative_to(root)): describe_artifact(p) for p in artifacts.values()},
            "inputs": dict(sorted(inputs.items())),
            "manifest": manifest,
            "toolchain": toolchain,
        }
        with self._exclusive():
            data = self.read()
            data["tasks"][task] = entry
            data["tasks"] = dict(sorted(data["tasks"].items()))
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n",
                               encoding="utf-8")
        return entry

    def forget(self, task: str) -> None:
        with self._exclusive():
            data = self.read()
            if data["tasks"].pop(task, None) is not None:
                with atomic_path(self.path) as tmp:
                    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n",
                                   encoding="utf-8")

    def intact(self, task: str, root: Path) -> str | None:
        """None when every artifact of `task` matches the lock, else why the task must run."""
        entry = self.entry(task)
        if entry is None:
            return f"{task} has no entry in qwen.lock"
        for rel, art in entry["artifacts"].items():
            reason = check_artifact(root / rel, art)
            if reason:
                return reason
        return None

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
                        return member["digest"]
        return None
