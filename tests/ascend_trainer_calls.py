"""What MindFormers' Trainer does to its output_dir on an Ascend cluster, played with MindFormers' own functions and
the arguments its Trainer passes them, read from a generated YAML (CPU never reaches these calls: qwenbuild's entry
runs stand-alone there). Where Ascend would then write a file (the compiled strategy, a checkpoint, a log, a
resharded slice), this writes one at the path MindFormers chose.

  python ascend_trainer_calls.py finetune run_qwen1_5.yaml RANKS    (cwd: the build dir, as node_K.sh runs)
  python ascend_trainer_calls.py predict predict_qwen1_5.yaml RANKS (cwd: build/predict, as predict.sh runs)

Prints one JSON object: the directories and files MindFormers chose, and the folders it emptied.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace


def _write(path, what: str) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(f"{what}\n")
    return str(path)


def _trainer_init(yaml_path: str):
    """Trainer.__init__'s output settings for this rank: set_output_path, set_strategy_save_path (given
    config.parallel) and set_checkpoint_save_path; the rank's config as the Trainer holds it."""
    from mindformers.tools.register import MindFormerConfig
    from mindformers.utils.file_utils import set_checkpoint_save_path, set_output_path, set_strategy_save_path

    config = MindFormerConfig(yaml_path)
    set_output_path(config.output_dir)
    set_strategy_save_path(config.parallel)
    set_checkpoint_save_path()
    # Trainer.__init__ fills these in before train/finetune/predict read them
    config.load_ckpt_format = config.get("load_ckpt_format", "ckpt")
    return config


def _validate_auto_trans(config) -> list[str]:
    """Trainer._check_config_rules -> _validate_auto_trans_ckpt_requirements on the main rank: with auto_trans_ckpt
    it calls clear_auto_trans_output(load_checkpoint, src_strategy_path_or_dir, load_ckpt_format)."""
    from mindformers.tools.utils import get_output_root_path
    from mindformers.trainer.trainer import Trainer

    Trainer._validate_auto_trans_ckpt_requirements(SimpleNamespace(config=config))
    folders = ("strategy", "transformed_checkpoint" if config.load_ckpt_format == "ckpt" else "unified_checkpoint")
    return [os.path.join(get_output_root_path(), f) for f in folders] if config.auto_trans_ckpt else []


def finetune(yaml_path: str, ranks: int) -> dict:
    from mindformers.core.callback.callback import CheckpointMonitor
    from mindformers.tools.utils import get_log_path

    out = {"strategy_files": [], "checkpoint_dirs": [], "cleared": []}
    # the original's command line passes --auto_trans_ckpt True (mindformers_run.py takes the flag too): before
    # anything compiles, the main rank empties what auto_trans_ckpt rewrites
    os.environ["RANK_ID"] = "0"
    config = _trainer_init(yaml_path)
    config.auto_trans_ckpt = True
    out["cleared"] = _validate_auto_trans(config)
    for rank in range(ranks):
        os.environ["RANK_ID"] = str(rank)
        config = _trainer_init(yaml_path)
        # MindSpore compiles the rank's strategy and saves it where set_strategy_save_path pointed it
        out["strategy_files"].append(_write(config.parallel["strategy_ckpt_save_file"], f"strategy of rank {rank}"))
        monitor = next(c for c in config.callbacks if c["type"] == "CheckpointMonitor")
        callback = CheckpointMonitor(**{k: v for k, v in monitor.items() if k != "type"},
                                     save_network_params=True, save_trainable_params=True)
        for directory in (callback._directory, callback.network_directory, callback.trainable_directory):
            out["checkpoint_dirs"].append(directory)
            _write(Path(directory) / f"{callback.origin_prefix}_rank_{rank}-1_1.ckpt", f"checkpoint of rank {rank}")
        _write(callback.meta_json, "{}")
        _write(Path(get_log_path()) / f"rank_{rank}" / "mindformer.log", f"log of rank {rank}")
    return out


def predict(yaml_path: str, ranks: int) -> dict:
    from mindformers.tools.ckpt_transform.transform_checkpoint import TransformCkpt

    out = {"strategy_files": [], "transformed": [], "cleared": []}
    os.environ["RANK_SIZE"] = str(ranks)
    for rank in range(ranks):
        os.environ["RANK_ID"] = str(rank)
        config = _trainer_init(yaml_path)
        if rank == 0:
            out["cleared"] = _validate_auto_trans(config)
        # then auto_trans_ckpt writes the rank's slice and the destination strategies where TransformCkpt says
        transform = TransformCkpt(auto_trans_ckpt=True, rank_id=rank, world_size=ranks)
        name = Path(config.load_checkpoint).stem
        out["transformed"].append(_write(Path(transform.transformed_checkpoint_dir) / name / f"rank_{rank}" /
                                         f"checkpoint_{rank}.ckpt", f"slice of rank {rank}"))
        out["strategy_files"].append(_write(config.parallel["strategy_ckpt_save_file"],
                                            f"strategy of rank {rank}"))
        if ranks > 1:
            _write(Path(transform.dst_strategy_dir) / f"merged_ckpt_strategy_rank_{rank}.ckpt", "merged strategy")
    return out


if __name__ == "__main__":
    mode, yaml_file, count = sys.argv[1:4]
    print(json.dumps({"finetune": finetune, "predict": predict}[mode](yaml_file, int(count))))
