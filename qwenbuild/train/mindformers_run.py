"""MindFormers' own Trainer on a generated YAML, with the flags of the original run_qwen1_5.py.

  python -m qwenbuild.train.mindformers_run --config run_qwen1_5.yaml --run_mode finetune --load_checkpoint DIR
                                            --auto_trans_ckpt False --train_data FILE.mindrecord --use_parallel True

msrun starts it on every worker of a node (the launch scripts do). The YAML decides everything else. On a CPU
device the entry first applies the substitutions MindFormers 1.9 needs there, and logs each one it makes: float32
compute, no flash attention, the sliced rotary embedding, no fused RMSNorm, data parallel without data sink, and a
finite-gradient check in place of the Ascend overflow-status kernel.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from qwenbuild.errors import UserError
from qwenbuild.flags import str2bool
from qwenbuild.logs import configure, entry_logger
from qwenbuild.processes import follow_parent
from qwenbuild.train.mindformers_tokenizer import register_qwen2_tokenizer
from qwenbuild.train.events import TOKENS_PER_S
from qwenbuild.train.worker import exit_code

# started as `python -m`, this module is __main__: its lines go under its package name all the same
logger = entry_logger(__file__)

RUN_MODES = ("train", "finetune", "predict")
LOG_PREFIX = "mindformers_run:"
# model_config values MindFormers' LlamaForCausalLM needs on the CPU kernels
CPU_MODEL_CONFIG = {"use_flash_attention": False, "use_rope_slice": True, "fused_rms_norm": False,
                    "compute_dtype": "float32", "layernorm_compute_type": "float32",
                    "softmax_compute_type": "float32", "rotary_dtype": "float32", "param_init_type": "float32"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mindformers_run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the MindFormers run YAML (run_qwen1_5.yaml)")
    parser.add_argument("--run_mode", default="finetune", choices=RUN_MODES)
    parser.add_argument("--task", default="text_generation")
    parser.add_argument("--load_checkpoint", default=None, help="checkpoint file or directory of rank_N/ shards")
    parser.add_argument("--auto_trans_ckpt", type=str2bool, default=None, help="let MindFormers reshard first")
    parser.add_argument("--train_data", "--train_dataset", dest="train_data", default=None,
                        help="MindRecord to train on (default: the YAML's dataset_dir)")
    parser.add_argument("--use_parallel", type=str2bool, default=None)
    parser.add_argument("--predict_data", default=None, help="--run_mode predict: the prompt")
    parser.add_argument("--predict_length", type=int, default=None,
                        help="--run_mode predict: prompt and answer together stop there (max_length)")
    parser.add_argument("--device_id", type=int, default=-1)
    return parser.parse_args(argv)


def log(message: str) -> None:
    logger.info(f"{LOG_PREFIX} {message}")


def _set(section, key: str, value, where: str, why: str = "CPU") -> None:
    if section.get(key) != value:
        log(f"{why}: {where}.{key} = {value!r} (was {section.get(key)!r})")
        section[key] = value


def host_limits(config) -> None:
    """MindSpore's dataset refuses more parallel workers than this host has cores."""
    cores = os.cpu_count() or 1
    if "train_dataset" in config and config.train_dataset.get("num_parallel_workers", 1) > cores:
        _set(config.train_dataset, "num_parallel_workers", cores, "train_dataset", "host")


def cpu_substitutions(config) -> None:
    """Make a YAML (written for Ascend or for CPU) runnable on the CPU kernels, logging what changes."""
    model = config.model.model_config
    for key, value in CPU_MODEL_CONFIG.items():
        _set(model, key, value, "model.model_config")
    _set(config.runner_config, "sink_mode", False, "runner_config")
    _set(config.parallel, "parallel_mode", 0, "parallel")
    _set(config.parallel, "enable_parallel_optimizer", False, "parallel")
    _set(config.parallel, "full_batch", False, "parallel")
    _set(config.parallel, "gradients_mean", True, "parallel")
    _set(config.runner_wrapper, "scale_sense", 1.0, "runner_wrapper")
    if "ascend_config" in config.context:
        log("CPU: context.ascend_config dropped")
        del config.context["ascend_config"]
    _finite_overflow_check()
    if config.use_parallel:
        _cpu_barrier()


def _cpu_barrier() -> None:
    """MindFormers waits for all ranks with the Barrier op, which has no CPU kernel: wait on an all-reduce instead."""
    # mindspore loads in seconds: imported only when training runs
    from mindspore import Tensor, ops
    from mindspore.communication import comm_func

    def barrier(group=None):
        reduce = ops.AllReduce() if group is None else ops.AllReduce(group=group)
        reduce(Tensor(np.ones(1, np.float32)))

    for name, module in list(sys.modules.items()):
        if name.startswith(("mindformers", "mindspore.communication")):
            for attr in ("barrier",):
                if getattr(module, attr, None) is comm_func.barrier and module is not comm_func:
                    setattr(module, attr, barrier)
    comm_func.barrier = barrier
    log("CPU: barrier = an all-reduce of one value (the Barrier op has no CPU kernel)")


def _finite_overflow_check() -> None:
    """MindSpore's loss-scale cell asks an Ascend kernel whether gradients overflowed; on CPU, look at them."""
    # mindspore loads in seconds: imported only when training runs
    from mindspore import nn, ops

    def get_overflow_status(self, status, compute_output):
        finite = ops.stack([ops.isfinite(g).all() for g in compute_output])
        return ops.logical_not(finite.all())

    nn.TrainOneStepWithLossScaleCell.get_overflow_status = get_overflow_status
    log("CPU: loss-scale overflow check = isfinite over the gradients (NPUGetFloatStatusV2 is Ascend only)")


def run(args: argparse.Namespace) -> None:
    # mindformers loads in seconds (and writes ./output/log): imported only when a run starts
    from mindformers import MindFormerConfig, Trainer
    from mindformers.core.context import build_context

    if not Path(args.config).is_file():
        raise UserError(f"--config {args.config} does not exist", hint="build it with `doit run_config`")
    config = MindFormerConfig(str(Path(args.config).resolve()))
    config.run_mode = args.run_mode
    if args.use_parallel is not None:
        config.use_parallel = args.use_parallel
    if args.load_checkpoint is not None:
        config.load_checkpoint = args.load_checkpoint
    if args.auto_trans_ckpt is not None:
        config.auto_trans_ckpt = args.auto_trans_ckpt
    if args.train_data:
        config.train_dataset.data_loader.dataset_dir = args.train_data
        config.train_dataset_task.dataset_config = config.train_dataset
    if args.device_id >= 0:
        config.context.device_id = args.device_id
    host_limits(config)
    if config.context.device_target == "CPU":
        cpu_substitutions(config)
    # the YAML's processor.tokenizer names it; MindFormers 1.9 has none of that name
    register_qwen2_tokenizer()
    build_context(config)
    if args.run_mode == "predict":
        _predict(config, args)
        return
    callbacks = [tokens_per_second(config)] if config.get("tensorboard") else None
    trainer = Trainer(args=config, task=args.task, train_dataset=config.train_dataset.data_loader.dataset_dir,
                      callbacks=callbacks)
    if args.run_mode == "finetune":
        trainer.finetune(finetune_checkpoint=config.load_checkpoint or False, auto_trans_ckpt=config.auto_trans_ckpt)
    else:
        trainer.train(train_checkpoint=config.load_checkpoint or False, auto_trans_ckpt=config.auto_trans_ckpt)


def tokens_per_second(config):
    """A callback adding tokens/s to MindFormers' TensorBoard events, as qwenbuild's engine logs it (MindFormers
    logs samples/s per device); a step's tokens are its global batch times seq_length."""
    # mindspore and mindformers load in seconds: imported only when a run starts
    from mindformers.utils.tensorboard import get_tensorboard_writer
    from mindspore.train import Callback

    parallel = config.parallel_config
    micro_batches = parallel.micro_batch_num if parallel.pipeline_stage > 1 else 1
    tokens = (config.runner_config.batch_size * parallel.data_parallel * micro_batches
              * config.model.model_config.seq_length)

    class TokensPerSecond(Callback):
        def on_train_step_begin(self, run_context):
            self.started = time.monotonic()

        def on_train_step_end(self, run_context):
            writer = get_tensorboard_writer()
            if writer is not None:
                writer.add_scalar(TOKENS_PER_S, tokens / max(time.monotonic() - self.started, 1e-9),
                                  global_step=run_context.original_args().cur_step_num)

    return TokensPerSecond()


def _predict(config, args) -> None:
    """MindFormers' own online predict (Trainer.predict), as run_qwen1_5.py --run_mode predict does."""
    # mindformers loads in seconds: imported only when a run starts
    from mindformers import Trainer

    if not args.predict_data:
        raise UserError("--run_mode predict needs --predict_data", hint="pass the prompt to answer")
    trainer = Trainer(args=config, task=args.task)
    length = args.predict_length or config.model.model_config.seq_length
    result = trainer.predict(predict_checkpoint=config.load_checkpoint or None, input_data=args.predict_data,
                             max_length=length, auto_trans_ckpt=config.auto_trans_ckpt)
    log(f"predict: {result}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get("MS_ROLE"):
        follow_parent()  # msrun decides on Ctrl-C, and msrun gone (killed with the build) means this worker goes too
    return exit_code(lambda: run(args))


if __name__ == "__main__":
    configure()  # this process's lines in its msrun log, at the level QWENBUILD_LOG asks for
    sys.exit(main())
