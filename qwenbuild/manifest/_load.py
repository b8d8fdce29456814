"""Load qwen.toml: tomlkit parse, schema check, defaults, model dimensions resolved, plan checks; all errors at once."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import tomllib

import tomlkit
from tomlkit.exceptions import TOMLKitError

from qwenbuild import schema
from qwenbuild.errors import UserError
from qwenbuild.jsonfile import read_bytes
from qwenbuild.manifest import _presets, sections
from qwenbuild.manifest._lines import key_lines, line_of
from qwenbuild.manifest._rules import manifest_problems
from qwenbuild.model.config import QwenConfig
from qwenbuild.store import real_file


# far above any hand-written manifest; a device or an endless pipe named as one stops here
MAX_MANIFEST_BYTES = 16 << 20


@dataclasses.dataclass
class Problem:
    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.key}: {self.message}" if self.key else \
            f"{self.file}:{self.line}: {self.message}"


class ManifestError(UserError):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        noun = "error" if len(problems) == 1 else "errors"
        super().__init__(f"{len(problems)} {noun} in {problems[0].file}:\n" + "\n".join(f"  {p}" for p in problems))


@dataclasses.dataclass
class Manifest:
    """A loaded qwen.toml: one typed object per section (sections.py), with where each key stands in the file."""

    path: Path
    lines: dict[str, int]
    model: sections.Model
    tokenizer: sections.Tokenizer
    dataset: sections.Dataset
    hardware: sections.Hardware
    parallel: sections.Parallel
    train: sections.Train
    export: sections.Export
    lite: sections.Lite
    build: sections.Build
    warnings: list[Problem] = dataclasses.field(default_factory=list)
    # files the manifest names that do not exist yet: `validate` fails on them and so do the tasks that read them,
    # while the others (rank tables, strategy files, launch scripts, YAML) still build
    unavailable: list[Problem] = dataclasses.field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def build_dir(self) -> Path:
        return (self.root / self.build.dir).resolve()

    def value(self, key: str):
        """The TOML-shaped value of a dotted key (`train.learning_rate`) or section (`lite`); None when left out."""
        if not schema.is_key(key):
            raise KeyError(f"{key!r} is not a qwen.toml key (see schemas/qwen.schema.json)")
        obj = self
        for name in key.split("."):
            obj = getattr(obj, name)
        return sections.to_json(obj)

    def path_of(self, key: str) -> Path | None:
        """A path-valued key resolved against the manifest's directory."""
        value = self.value(key)
        return None if value is None else self.resolve(value)

    def resolve(self, path: str) -> Path:
        """A path written in qwen.toml (relative to its directory)."""
        return (self.root / path).resolve()

    def line(self, key: str) -> int:
        return line_of(self.lines, key)

    def problem(self, key: str, message: str) -> Problem:
        return Problem(str(self.path), self.line(key), key, message)


BOM = "\ufeff"


def read_manifest_text(path: Path) -> str:
    """qwen.toml's text as written (line endings kept, for edits), a UTF-8 byte-order mark included when there;
    every way it can be unreadable is a UserError naming the file."""
    try:
        raw = read_bytes(path, "manifest", limit=MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist", hint="create one with `qwenbuild init`, or name another manifest "
                                                       "(qwenbuild -c PATH; doit manifest=PATH)") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a qwen.toml file") from None
    except PermissionError:
        raise UserError(f"{path} is not readable") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start})", hint="save the file as UTF-8") from None


def parse_toml(path: Path):
    """The tomlkit document of a qwen.toml (comments kept, for edits) and its text; every way it can be unreadable
    is a UserError or a ManifestError naming the file and line. A leading byte-order mark (which editors on Windows
    write) is read past, as Python's own utf-8-sig does; `set` writes it back."""
    text = read_manifest_text(path).removeprefix(BOM)
    try:
        tomllib.loads(text)  # Python's reader names the line and column of every syntax error and repeated key
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError([_syntax_problem(path, text, str(exc))])
    try:
        doc = tomlkit.parse(text)
        doc.unwrap()
    except TOMLKitError as exc:  # what tomllib accepts tomlkit should too: say so rather than guess a line
        raise ManifestError([Problem(str(path), 1, "", f"TOML error: {exc}")])
    return doc, text


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_POSITION = re.compile(r"(.*) \(at line (\d+), column (\d+)\)", re.S)
_REPEATED = ("Cannot overwrite", "Cannot declare", "Cannot mutate")


def _syntax_problem(path: Path, text: str, message: str) -> Problem:
    """tomllib's message as file:line, a repeated key called that, a name TOML cannot hold unquoted explained."""
    found = _POSITION.fullmatch(message)
    if found:
        reason, line, where = found.group(1), int(found.group(2)), f" at column {found.group(3)}"
    else:
        reason, line, where = message.replace(" (at end of document)", ""), text.count("\n") + 1, " at the end"
        if reason.startswith(_REPEATED):
            line = _repeated_key_line(text)
    if reason.startswith(_REPEATED):
        return Problem(str(path), line, "", f"TOML error{where}: {reason} (each key may be written once)")
    if reason.startswith("Invalid initial character for a key part"):
        reason = _bare_key_problem(text, line) or reason
    return Problem(str(path), line, "", f"TOML syntax error{where}: {reason}")


def _bare_key_problem(text: str, lineno: int) -> str | None:
    """A table or key name with characters TOML does not allow unquoted: say which."""
    lines = text.splitlines()
    line = lines[lineno - 1].strip() if 0 < lineno <= len(lines) else ""
    name = line.strip("[] ") if line.startswith("[") else line.partition("=")[0].strip()
    if not name or name[0] in "\"'" or all(_BARE_KEY.fullmatch(part.strip()) for part in name.split(".")):
        return None
    return (f"name {name!r} holds characters an unquoted TOML name cannot (only A-Z a-z 0-9 _ -); qwen.toml's "
            "names are English ([model], [dataset], preset, ...): `qwenbuild init` writes them all, commented")


def _repeated_key_line(text: str) -> int:
    """Line of the key tomlkit finds written twice (tomllib names only the end of the document), else 1."""
    try:
        tomlkit.parse(text).unwrap()
    except TOMLKitError as exc:
        name = re.search(r'Key "([^"]+)"', str(exc))
        if name:
            pattern = re.compile(rf"^\s*(?:[\w\"'.-]+\.)?\"?{re.escape(name.group(1))}\"?\s*[=.\]]")
            hits = [i for i, line in enumerate(text.splitlines(), start=1) if pattern.match(line)]
            return hits[1] if len(hits) > 1 else (hits[0] if hits else 1)
    return 1


def read_toml(path: Path) -> tuple[dict, dict[str, int], str]:
    doc, text = parse_toml(path)
    return doc.unwrap(), key_lines(text), text


@dataclasses.dataclass
class _Draft:
    """A schema-valid manifest's tables with defaults filled, before its sections are built."""

    path: Path
    lines: dict[str, int]
    data: dict
    warnings: list[Problem]
    unavailable: list[Problem]

    def problem(self, key: str, message: str) -> Problem:
        return Problem(str(self.path), line_of(self.lines, key), key, message)

    def path_of(self, section: str, key: str) -> Path | None:
        value = self.data[section].get(key)
        return None if value is None else (self.path.parent / value).resolve()


def _resolve_model(d: _Draft, raw_model: dict) -> tuple[QwenConfig | None, list[Problem]]:
    problems: list[Problem] = []
    model = d.data["model"]
    explicit = {k: raw_model[k] for k in _presets.DIMENSION_KEYS + ("param_dtype", "compute_dtype") if k in raw_model}
    hf_dir = d.path_of("model", "hf_dir")
    if model["init"] == "random" and hf_dir is not None:
        problems.append(d.problem("model.init", f"init = \"random\" draws the starting weights from init_seed, but "
                                                f"hf_dir names {hf_dir}; remove hf_dir, or set init = \"hf\""))
    if model["init"] == "hf" and hf_dir is None:
        problems.append(d.problem("model.hf_dir", "missing: init = \"hf\" converts a Hugging Face Qwen1.5 checkpoint; "
                                                  "set hf_dir to its directory, or init = \"random\" for seeded "
                                                  "random starting weights"))
    if hf_dir is not None and hf_dir.exists() and not hf_dir.is_dir():
        return None, problems + [d.problem("model.hf_dir", f"{hf_dir} is a file; hf_dir names the Hugging Face "
                                                           "checkpoint's directory (config.json and the weights)")]
    stand_in = _stand_in(model, explicit)
    if hf_dir is not None and not (hf_dir / "config.json").exists() and stand_in:
        # weights not downloaded yet: the dimensions plan the cluster, nothing is trained without them
        d.unavailable.append(d.problem("model.hf_dir", f"{hf_dir / 'config.json'} does not exist: download the "
                                                       f"checkpoint there ({stand_in} stand in for planning; no "
                                                       "weights are made up)"))
        hf_dir = None
    if hf_dir is not None:
        config = hf_dir / "config.json"
        try:
            base = dataclasses.asdict(QwenConfig.from_hf_dir(hf_dir))
        except UserError as exc:
            if not config.exists():
                return None, [d.problem("model.hf_dir", f"{config} does not exist; point hf_dir at a Hugging Face "
                                                        "Qwen1.5 checkpoint directory, or set model.preset (or "
                                                        "every dimension) to plan before it is downloaded")]
            return None, [d.problem("model.hf_dir", f"not a usable Qwen1.5 config.json: {exc}")]
        for key, value in explicit.items():
            if key in ("param_dtype", "compute_dtype"):
                continue
            if base.get(key) != value:
                problems.append(d.problem(f"model.{key}", f"found {value!r} but {config} says {base.get(key)!r}; "
                                                          "remove the key or make it agree"))
        base.update({k: v for k, v in explicit.items() if k in ("param_dtype", "compute_dtype")})
    elif model.get("preset"):
        base = dict(_presets.MODELS[model["preset"]])
        base.update(explicit)
    else:
        missing = [k for k in _presets.DIMENSION_KEYS[:6] if k not in explicit]
        if missing:
            return None, [d.problem("model", "set `preset`, `hf_dir`, or every dimension (missing: "
                                             + ", ".join(missing) + ")")]
        base = dict(_presets.MODELS["tiny"], **explicit)
    base.setdefault("n_kv_heads", base.get("num_heads"))
    try:
        cfg = QwenConfig(**{f.name: base[f.name] for f in dataclasses.fields(QwenConfig) if f.name in base})
    except UserError as exc:
        return None, problems + [d.problem("model", str(exc))]
    return cfg, problems


def _stand_in(model: dict, explicit: dict) -> str | None:
    """What gives the dimensions while hf_dir's checkpoint is not there yet: the preset, or every one written."""
    if model.get("preset"):
        return f"the {model['preset']} preset's dimensions"
    if all(k in explicit for k in _presets.DIMENSION_KEYS[:6]):
        return "the dimensions in [model]"
    return None


def _check_paths(d: _Draft) -> list[Problem]:
    problems = []
    tok = d.data["tokenizer"]
    if tok["kind"] == "hf":
        key = "tokenizer.dir" if tok.get("dir") else "model.hf_dir"
        section, _, name = key.partition(".")
        folder = d.path_of(section, name)
        if folder is None:
            problems.append(d.problem("tokenizer.dir", "kind = \"hf\" needs `dir` (or model.hf_dir)"))
        else:
            for file in ("vocab.json", "merges.txt"):
                if not (folder / file).is_file():
                    problems.append(d.problem(key, f"{folder / file} does not exist"))
    if d.data["dataset"]["source"] == "alpaca":
        data_path = d.path_of("dataset", "path")
        if data_path is None:
            problems.append(d.problem("dataset.path", "source = \"alpaca\" needs `path` to an alpaca JSON/JSONL file"))
        elif not data_path.is_file():
            d.warnings.append(d.problem("dataset.path", f"{data_path} does not exist yet; the alpaca task needs it"))
    strategy_dir = d.path_of("parallel", "strategy_dir")
    if strategy_dir is not None and not strategy_dir.is_dir():
        problems.append(d.problem("parallel.strategy_dir", f"{strategy_dir} is not a directory"))
    return problems


def load_manifest(path: str | Path = "qwen.toml") -> Manifest:
    """Load and validate a manifest; raises ManifestError listing every problem with file:line and key path."""
    path = real_file(path)
    raw, lines, _ = read_toml(path)
    found = [Problem(str(path), line_of(lines, key), key, msg) for key, msg in schema.problems(raw)]
    if found:
        raise ManifestError(found)
    draft = _Draft(path, lines, schema.with_defaults(raw), [], [])
    cfg, found = _resolve_model(draft, raw.get("model", {}))
    found += _check_paths(draft)
    if cfg is None:
        raise ManifestError(sorted(found, key=lambda p: p.line))
    draft.data["model"].update(dataclasses.asdict(cfg))
    m = Manifest(path=path, lines=lines, warnings=draft.warnings, unavailable=draft.unavailable,
                 **{name: sections.build_section(cls, draft.data[name]) for name, cls in sections.SECTIONS.items()})
    found += manifest_problems(m)
    m.unavailable += [m.problem(f"hardware.nodes[{i}].rank_table", f"{m.resolve(n.rank_table)} does not exist: write "
                                f"it with `qwenbuild hccl_tools --server_ip {n.ip}` on {n.host}")
                      for i, n in enumerate(m.hardware.nodes) if n.rank_table and not m.resolve(n.rank_table).is_file()]
    if found:
        raise ManifestError(sorted(found, key=lambda p: p.line))
    return m
