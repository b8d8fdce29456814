"""Load qwen.toml: tomlkit parse, schema check, defaults, model dimensions resolved, plan checks; all errors at once."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import tomlkit
from tomlkit.exceptions import ParseError

from qwenbuild.errors import UserError
from qwenbuild.manifest import _presets, _schema
from qwenbuild.manifest._lines import key_lines, line_of
from qwenbuild.model.config import QwenConfig


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
    path: Path
    data: dict
    lines: dict[str, int]
    model: QwenConfig
    warnings: list[Problem] = dataclasses.field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def build_dir(self) -> Path:
        return (self.root / self.data["build"]["dir"]).resolve()

    def get(self, key: str):
        node = self.data
        for part in key.split("."):
            node = node[part]
        return node

    def has(self, key: str) -> bool:
        try:
            self.get(key)
            return True
        except (KeyError, TypeError):
            return False

    def path_of(self, key: str) -> Path | None:
        """A path-valued key resolved against the manifest's directory."""
        value = self.get(key) if self.has(key) else None
        return None if value is None else (self.root / value).resolve()

    def line(self, key: str) -> int:
        return line_of(self.lines, key)

    def problem(self, key: str, message: str) -> Problem:
        return Problem(str(self.path), self.line(key), key, message)

    @property
    def device_count(self) -> int:
        return len(self.data["hardware"]["nodes"]) * self.data["hardware"]["devices_per_node"]


def read_toml(path: Path) -> tuple[dict, dict[str, int], str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} does not exist", hint="create one with `qwenbuild init`, or pass -c PATH")
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a qwen.toml file")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start})", hint="save the file as UTF-8")
    except PermissionError:
        raise UserError(f"{path} is not readable")
    try:
        doc = tomlkit.parse(text)
    except ParseError as exc:
        reason = str(exc).split(" at line ")[0]
        raise ManifestError([Problem(str(path), exc.line, "", f"TOML syntax error at column {exc.col}: {reason}")])
    return doc.unwrap(), key_lines(text), text


def _resolve_model(m: Manifest, raw_model: dict) -> tuple[QwenConfig | None, list[Problem]]:
    problems: list[Problem] = []
    model = m.data["model"]
    explicit = {k: raw_model[k] for k in _presets.DIMENSION_KEYS + ("param_dtype", "compute_dtype") if k in raw_model}
    hf_dir = m.path_of("model.hf_dir")
    if hf_dir is not None and not (hf_dir / "config.json").exists() and model.get("preset"):
        # weights not downloaded yet: the preset stands in until they are
        m.warnings.append(m.problem("model.hf_dir", f"{hf_dir / 'config.json'} does not exist yet; using the "
                                                    f"{model['preset']} preset's dimensions until it does"))
        hf_dir = None
    if hf_dir is not None:
        config = hf_dir / "config.json"
        try:
            hf = json.loads(config.read_text(encoding="utf-8"))
            base = dataclasses.asdict(QwenConfig.from_hf_dict(hf))
        except FileNotFoundError:
            return None, [m.problem("model.hf_dir", f"{config} does not exist; point hf_dir at a Hugging Face "
                                                    "Qwen1.5 checkpoint directory")]
        except (json.JSONDecodeError, UnicodeDecodeError, UserError, TypeError) as exc:
            return None, [m.problem("model.hf_dir", f"{config} is not a usable Qwen1.5 config.json: {exc}")]
        for key, value in explicit.items():
            if key in ("param_dtype", "compute_dtype"):
                continue
            if base.get(key) != value:
                problems.append(m.problem(f"model.{key}", f"found {value!r} but {config} says {base.get(key)!r}; "
                                                          "remove the key or make it agree"))
        base.update({k: v for k, v in explicit.items() if k in ("param_dtype", "compute_dtype")})
    elif model.get("preset"):
        base = dict(_presets.MODELS[model["preset"]])
        base.update(explicit)
    else:
        missing = [k for k in _presets.DIMENSION_KEYS[:6] if k not in explicit]
        if missing:
            return None, [m.problem("model", "set `preset`, `hf_dir`, or every dimension (missing: "
                                             + ", ".join(missing) + ")")]
        base = dict(_presets.MODELS["tiny"], **explicit)
    base.setdefault("n_kv_heads", base.get("num_heads"))
    try:
        cfg = QwenConfig(**{f.name: base[f.name] for f in dataclasses.fields(QwenConfig) if f.name in base})
    except UserError as exc:
        return None, problems + [m.problem("model", str(exc))]
    return cfg, problems


def _check_paths(m: Manifest) -> list[Problem]:
    problems = []
    tok = m.data.get("tokenizer", {})
    if tok.get("kind") == "hf":
        key = "tokenizer.dir" if tok.get("dir") else "model.hf_dir"
        folder = m.path_of(key) if m.has(key) and m.get(key) else None
        if folder is None:
            problems.append(m.problem("tokenizer.dir", "kind = \"hf\" needs `dir` (or model.hf_dir)"))
        else:
            for name in ("vocab.json", "merges.txt"):
                if not (folder / name).is_file():
                    problems.append(m.problem(key, f"{folder / name} does not exist"))
    ds = m.data["dataset"]
    if ds["source"] == "alpaca":
        if not ds.get("path"):
            problems.append(m.problem("dataset.path", "source = \"alpaca\" needs `path` to an alpaca JSON/JSONL file"))
        elif not m.path_of("dataset.path").is_file():
            m.warnings.append(m.problem("dataset.path", f"{m.path_of('dataset.path')} does not exist yet; the "
                                                        "alpaca task needs it"))
    if m.data["parallel"].get("strategy_dir") and not m.path_of("parallel.strategy_dir").is_dir():
        problems.append(m.problem("parallel.strategy_dir", f"{m.path_of('parallel.strategy_dir')} is not a directory"))
    return problems


def load_manifest(path: str | Path = "qwen.toml", *, check_plan: bool = True) -> Manifest:
    """Load and validate a manifest; raises ManifestError listing every problem with file:line and key path."""
    path = Path(path).resolve()
    raw, lines, _ = read_toml(path)
    found = [Problem(str(path), line_of(lines, key), key, msg) for key, msg in _schema.problems(raw)]
    if found:
        raise ManifestError(found)
    m = Manifest(path=path, data=_schema.with_defaults(raw), lines=lines, model=None)
    cfg, found = _resolve_model(m, raw.get("model", {}))
    found += _check_paths(m)
    if cfg is not None:
        m.model = cfg
        m.data["model"].update({k: v for k, v in dataclasses.asdict(cfg).items()})
        if check_plan:
            from qwenbuild.plan import plan_problems

            found += [m.problem(key, msg) for key, msg in plan_problems(m)]
    if found:
        raise ManifestError(sorted(found, key=lambda p: p.line))
    return m
