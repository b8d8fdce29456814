"""Training checkpoints under MindFormers' names: <output>/checkpoint/rank_N/<prefix>_rank_N-<epoch>_<step>.ckpt.

Each file holds the network parameters (MindFormers names), the AdamW moments adam_m.* / adam_v.*, the
optimizer's global_step, and epoch_num / step_num / loss_scale as MindFormers' CheckpointMonitor appends them.
meta.json next to them names the last file (as MindFormers writes it) plus this run's settings digest and history.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from qwenbuild.errors import UserError
from qwenbuild.model.params import CONFIG_ENTRY, LORA_ENTRY
from qwenbuild.store import atomic_path
from qwenbuild.weights.mindspore_ckpt import load_with_crc

META = "meta.json"


def rank_dir(output_dir: str | Path, rank: int) -> Path:
    return Path(output_dir) / "checkpoint" / f"rank_{rank}"


def file_name(prefix: str, rank: int, step: int, steps_per_epoch: int) -> str:
    """MindFormers names a file by 1-based epoch and step within it; `step` counts finished steps."""
    epoch = (step - 1) // steps_per_epoch + 1
    in_epoch = (step - 1) % steps_per_epoch + 1
    return f"{prefix}_rank_{rank}-{epoch}_{in_epoch}.ckpt"


def saved_steps(output_dir: str | Path, rank: int, prefix: str, steps_per_epoch: int) -> dict[int, Path]:
    """Finished-step count -> checkpoint file, for one rank."""
    pattern = re.compile(rf"^{re.escape(prefix)}_rank_{rank}-(\d+)_(\d+)\.ckpt$")
    found = {}
    directory = rank_dir(output_dir, rank)
    for path in directory.glob("*.ckpt") if directory.is_dir() else ():
        m = pattern.match(path.name)
        if m:
            found[(int(m.group(1)) - 1) * steps_per_epoch + int(m.group(2))] = path
    return found


def read_meta(output_dir: str | Path, rank: int) -> dict:
    try:
        return json.loads((rank_dir(output_dir, rank) / META).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def finished_checkpoint(output_dir: str | Path, rank: int) -> Path:
    """The last checkpoint a run left for `rank` (meta.json names it, as MindFormers' monitor does)."""
    name = read_meta(output_dir, rank).get("last_ckpt_file")
    if not name or not (rank_dir(output_dir, rank) / name).is_file():
        raise UserError(f"no finished checkpoint in {rank_dir(output_dir, rank)}",
                        hint="run `doit finetune` first, or set export.checkpoint = \"converted\"")
    return rank_dir(output_dir, rank) / name


def resume_step(output_dir: str | Path, world_size: int, prefix: str, steps_per_epoch: int, digest: str) -> int:
    """Latest step that every rank saved for these same settings, or 0 to start afresh."""
    common = None
    for rank in range(world_size):
        if read_meta(output_dir, rank).get("run_digest") != digest:
            return 0
        steps = set(saved_steps(output_dir, rank, prefix, steps_per_epoch))
        common = steps if common is None else common & steps
    return max(common) if common else 0


def clear_stale(output_dir: str | Path, rank: int) -> None:
    """Drop this rank's checkpoints from other settings, so they can never be mistaken for this run's."""
    directory = rank_dir(output_dir, rank)
    if directory.is_dir():
        for path in [*directory.glob("*.ckpt"), directory / META]:
            path.unlink(missing_ok=True)


def save(cell, output_dir: str | Path, rank: int, step: int, steps_per_epoch: int, prefix: str, digest: str,
         keep_max: int, meta_extra: dict | None = None, hf_config: dict | None = None, choice=None,
         lora=None) -> Path:
    """Save `cell` (the entries `choice(name)` keeps, when given) with MindFormers' step entries and the model's
    config.json, so the file converts back alone; a LoRA run's files also record its adapters' settings (rank,
    alpha, dropout, targets), so their scale is known from the file itself."""
    # mindspore takes seconds to load: imported only when this runs
    import mindspore as ms

    directory = rank_dir(output_dir, rank)
    final = directory / file_name(prefix, rank, step, steps_per_epoch)
    append = {"epoch_num": (step - 1) // steps_per_epoch + 1, "step_num": step, "loss_scale": 1.0}
    if hf_config is not None:
        append[CONFIG_ENTRY] = json.dumps(hf_config, sort_keys=True)
    if lora is not None:
        append[LORA_ENTRY] = json.dumps(dataclasses.asdict(lora), sort_keys=True)
    with atomic_path(final) as tmp:
        # save_checkpoint appends .ckpt to any other name
        ms.save_checkpoint(cell, str(tmp) + ".ckpt", append_dict=append, crc_check=True, choice_func=choice)
        os.replace(str(tmp) + ".ckpt", tmp)
    meta = {"last_epoch": append["epoch_num"], "last_step": (step - 1) % steps_per_epoch + 1,
            "last_ckpt_file": final.name, "run_digest": digest, **(meta_extra or {})}
    with atomic_path(directory / META) as tmp:
        tmp.write_text(json.dumps(meta) + "\n", encoding="utf-8")
    if keep_max:
        saved = saved_steps(output_dir, rank, prefix, steps_per_epoch)
        for old in sorted(saved)[:-keep_max]:
            saved[old].unlink(missing_ok=True)
    return final


def init_checkpoint_file(path: str | Path, rank: int) -> Path:
    """The file a rank starts from: a complete .ckpt, or <dir>/rank_<rank>/<one>.ckpt (built shards)."""
    path = Path(path)
    if path.is_file():
        return path
    for directory in (path / f"rank_{rank}", path):
        files = sorted(directory.glob("*.ckpt")) if directory.is_dir() else []
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            raise UserError(f"{directory} holds {len(files)} .ckpt files; expected exactly one",
                            hint="point init_checkpoint at the file to start from")
    raise UserError(f"init_checkpoint {path}: no .ckpt file and no rank_{rank}/<name>.ckpt below it",
                    hint="convert the Hugging Face weights first (convert_weight) or give the .ckpt path")


def load_into(cell, paths: str | Path | list, required: list[str]) -> dict:
    """Load a checkpoint, or the files of one process's pipeline-stage ranks together, into `cell`; every name in
    `required` must be present with its shape. Returns the dict."""
    # mindspore takes seconds to load: imported only when this runs
    import mindspore as ms

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    params = {}
    for one in paths:
        params.update(load_with_crc(one))
    path = paths[0] if len(paths) == 1 else f"{paths[0]} (and {len(paths) - 1} more stage file(s))"
    missing = [name for name in required if name not in params]
    if missing:
        raise UserError(f"{path}: lacks {len(missing)} tensor(s) the network needs, e.g. {', '.join(missing[:3])}",
                        hint="the checkpoint must come from a model with the same dimensions (MindFormers names)")
    own = {p.name: p for p in cell.get_parameters()}
    for name in required:
        if tuple(params[name].shape) != tuple(own[name].shape):
            raise UserError(f"{path}: tensor {name} has shape {tuple(params[name].shape)}, "
                            f"the network expects {tuple(own[name].shape)}",
                            hint="the model dimensions in run.json must match the checkpoint")
    ms.load_param_into_net(cell, {k: v for k, v in params.items() if k in own})
    return params
