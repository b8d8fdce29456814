"""The plain settings of one training run (run.json): read, checked key by key, and digested for resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from qwenbuild import schema
from qwenbuild.digests import file_digest, json_digest
from qwenbuild.errors import UserError
from qwenbuild.jsonfile import read_json
from qwenbuild.model.config import QwenConfig
from qwenbuild.model.lora import LoraConfig, rank_problems
from qwenbuild.store import SEAL, atomic_path


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    model: QwenConfig
    train_data: str
    output_dir: str
    seq_length: int
    batch_size: int  # per data-parallel rank, as MindFormers runner_config.batch_size
    learning_rate: float
    init_checkpoint: str | None = None
    data_parallel: int = 1
    warmup_ratio: float = 0.01
    lr_end: float = 0.0
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    epochs: int = 1
    steps: int | None = None  # overrides epochs when set
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    seed: int = 42
    save_steps: int = 100
    keep_checkpoint_max: int = 2
    checkpoint_prefix: str = "qwen2"
    threads: int = 0  # CPU kernel threads per worker; 0 lets MindSpore choose
    model_parallel: int = 1
    pipeline_stage: int = 1
    device_target: str = "CPU"
    strategy_dir: str | None = None  # per-rank strategy files: what each process holds under model/pipeline parallel
    micro_batch_num: int = 1  # micro batches per step under pipeline parallel (MindFormers' global batch counts them)
    lora: LoraConfig | None = None  # adapters to train on the frozen weights; None trains every weight

    @property
    def rows_per_step(self) -> int:
        """Rows one data-parallel rank trains on per step: its micro batches, run at once on CPU."""
        return self.batch_size * (self.micro_batch_num if self.pipeline_stage > 1 else 1)

    @property
    def global_batch_size(self) -> int:
        return self.rows_per_step * self.data_parallel

    @property
    def processes(self) -> int:
        """Worker processes of the run: data_parallel x model_parallel (a CPU process runs every pipeline stage)."""
        return self.data_parallel * self.model_parallel

    def result_digest(self) -> str:
        """Digest of everything that changes the trained parameters (not paths to outputs or save cadence)."""
        values = dataclasses.asdict(self)
        for key in ("output_dir", "save_steps", "keep_checkpoint_max", "checkpoint_prefix", "threads"):
            values.pop(key)
        # inputs by content, not by path: the same run built in another directory has the same digest
        values["train_data"] = _content(values["train_data"])
        values["init_checkpoint"] = _content(values["init_checkpoint"])
        values["strategy_dir"] = _content(values["strategy_dir"])
        return json_digest(values)

    def to_json(self) -> dict:
        values = dataclasses.asdict(self)
        values["model"] = dataclasses.asdict(self.model)
        return values


def _content(path: str | None) -> str | None:
    """Digest of an input file, or of a sealed directory's member digests (per-rank shards; every shard of a
    MindRecord named by its first file)."""
    if not path:
        return path
    p = Path(path)
    if p.is_dir() and (p / SEAL).is_file():
        return file_digest(p / SEAL)
    if p.is_file() and (p.parent / SEAL).is_file():
        return file_digest(p.parent / SEAL)
    return file_digest(p) if p.is_file() else str(p)


# run.json settings that are qwen.toml keys: the build takes them from there, and the schema's bounds check them
SCHEMA_KEYS = {
    **{name: f"train.{name}" for name in ("learning_rate", "warmup_ratio", "weight_decay", "beta1", "beta2", "eps",
                                          "grad_clip", "epochs", "steps", "batch_size", "seed", "save_steps")},
    "seq_length": "dataset.seq_length",
    "data_parallel": "parallel.data_parallel",
    "model_parallel": "parallel.model_parallel",
    "pipeline_stage": "parallel.pipeline_stage",
    "micro_batch_num": "parallel.micro_batch_num",
}
_NON_NEGATIVE = ("lr_end", "threads", "keep_checkpoint_max")
DEVICE_TARGETS = ("CPU", "Ascend", "GPU")


def _check(values: dict, source: str) -> None:
    def bad(key, what):
        raise UserError(f"{source}: key {key!r} is {values[key]!r}; {what}")

    for key, schema_key in SCHEMA_KEYS.items():
        if key in values and not (key == "steps" and values[key] is None):  # null steps: train for `epochs`
            problem = schema.value_problem(schema_key, values[key])
            if problem:
                bad(key, f"{problem} (as {schema_key} in qwen.toml)")
    for key in _NON_NEGATIVE:
        if key in values and (not isinstance(values[key], (int, float)) or isinstance(values[key], bool)
                              or values[key] < 0):
            bad(key, "it must be a number >= 0")
    if values.get("device_target", "CPU") not in DEVICE_TARGETS:
        bad("device_target", f"use {', '.join(DEVICE_TARGETS)}")
    if values.get("lora") is not None:
        _check_lora(values["lora"], source)


LORA_KEYS = tuple(f.name for f in dataclasses.fields(LoraConfig))


def _check_lora(lora, source: str) -> None:
    if isinstance(lora, LoraConfig):
        return
    if not isinstance(lora, dict) or set(lora) != set(LORA_KEYS):
        raise UserError(f"{source}: key 'lora' is {lora!r}; it must be null or an object of exactly "
                        f"{', '.join(LORA_KEYS)} (as [train.lora] in qwen.toml)")
    for key in LORA_KEYS:
        problem = schema.value_problem(f"train.lora.{key}", lora[key])
        if problem:
            raise UserError(f"{source}: key 'lora.{key}' is {lora[key]!r}; {problem} (as train.lora.{key} in "
                            "qwen.toml)")


def check_parallel(settings: TrainSettings, source: str = "run.json") -> None:
    """Model and pipeline parallel training takes its layout from the strategy files."""
    if (settings.model_parallel > 1 or settings.pipeline_stage > 1) and not settings.strategy_dir:
        raise UserError(
            f"{source}: model_parallel={settings.model_parallel}, pipeline_stage={settings.pipeline_stage} need "
            "strategy_dir: the per-rank strategy files say which slice of each parameter a process holds",
            hint="build them with `doit strategy` (or `qwenbuild strategy`) and set strategy_dir")


_PATH_KEYS = ("train_data", "output_dir", "init_checkpoint", "strategy_dir")


def settings_from_dict(values: dict, source: str = "run.json", base_dir: str | Path | None = None) -> TrainSettings:
    """Checked settings; relative paths are taken relative to base_dir (the directory of run.json) when given."""
    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise UserError(f"{source}: unknown key(s) {', '.join(unknown)}", hint=f"allowed keys: {', '.join(sorted(fields))}")
    required = [f.name for f in dataclasses.fields(TrainSettings)
                if f.default is dataclasses.MISSING and f.name not in values]
    if required:
        raise UserError(f"{source}: missing key(s) {', '.join(required)}")
    _check(values, source)
    model = values["model"]
    if isinstance(model, dict):
        try:
            model = QwenConfig(**model)
        except (TypeError, UserError) as exc:
            raise UserError(f"{source}: key 'model' does not describe a QwenConfig: {exc}") from exc
    if not isinstance(model, QwenConfig):
        raise UserError(f"{source}: key 'model' must be an object of model dimensions, not {model!r}")
    if base_dir is not None:
        values = {**values, **{k: str(Path(base_dir, values[k])) for k in _PATH_KEYS if values.get(k)}}
    lora = values.get("lora")
    settings = TrainSettings(**{**values, "model": model,
                                "lora": LoraConfig(**lora) if isinstance(lora, dict) else lora})
    if settings.lora is not None and rank_problems(model, settings.lora.rank, settings.lora.targets):
        raise UserError(f"{source}: key 'lora.rank': " + "; ".join(rank_problems(model, settings.lora.rank,
                                                                                  settings.lora.targets)))
    check_parallel(settings, source)
    return settings


def read_run_json(path: str | Path) -> TrainSettings:
    """Settings from run.json; its relative paths are relative to the file's own directory."""
    path = Path(path)
    values = read_json(path, "run settings", missing_hint="write the run settings first (doit run_config)")
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a JSON object of run settings")
    return settings_from_dict(values, str(path), base_dir=path.parent)


def write_run_json(path: str | Path, settings: TrainSettings) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(settings.to_json(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path
