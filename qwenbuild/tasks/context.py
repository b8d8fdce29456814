"""What a task's action sees: the manifest keys its TaskSpec declares (no others), the build dir, and atomic outputs."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

from qwenbuild.build_dir import BuildDir
from qwenbuild.manifest.sections import SECTIONS
from qwenbuild.store import atomic_path, write_seal


class UndeclaredKey(Exception):
    """An action read a manifest key its task does not declare: the task would not rebuild when that key changes."""


class DeclaredManifest:
    """The manifest as one task may read it: its declared keys and sections, and properties computed from them."""

    def __init__(self, manifest, task: str, keys: tuple[str, ...]):
        self._manifest, self._task, self._keys = manifest, task, frozenset(keys)

    def check(self, key: str) -> None:
        parts = key.split(".")
        if not any(".".join(parts[:n]) in self._keys for n in range(1, len(parts) + 1)):
            raise UndeclaredKey(f"task {self._task!r} reads {key} but does not declare it in its TaskSpec keys")

    def __getattr__(self, section: str):
        if section not in SECTIONS:
            raise AttributeError(section)
        return _DeclaredSection(getattr(self._manifest, section), section, self)

    def value(self, key: str):
        self.check(key)
        return self._manifest.value(key)

    def path_of(self, key: str) -> Path | None:
        self.check(key)
        return self._manifest.path_of(key)

    def resolve(self, path: str) -> Path:
        """A path written in qwen.toml (found under a declared key), relative to its directory."""
        return self._manifest.resolve(path)


class _DeclaredSection:
    def __init__(self, section, name: str, owner: DeclaredManifest):
        self._section, self._name, self._owner = section, name, owner

    def __getattr__(self, attr: str):
        # a property computed from several keys needs every one of them declared
        for key in getattr(type(self._section), "READS", {}).get(attr, (attr,)):
            self._owner.check(f"{self._name}.{key}")
        return getattr(self._section, attr)


@dataclasses.dataclass
class Context:
    name: str
    manifest: DeclaredManifest
    build: BuildDir

    @contextlib.contextmanager
    def output_dir(self, final: Path):
        """A temporary directory promoted onto `final`, sealed with its member digests, once the block succeeds."""
        with atomic_path(final, directory=True) as tmp:
            yield tmp
            write_seal(tmp)

    def output_file(self, final: Path):
        return atomic_path(final)
