"""The MindFormers run YAML of a fine-tuning run (the run_qwen1_5_72b.yaml equivalent), for Ascend or CPU.

`target="ascend"` keeps the original's performance settings (bfloat16 compute, flash attention, recompute,
sequence parallel, semi-auto parallel); `target="cpu"` gives the flags MindFormers' LlamaForCausalLM needs to run
on CPU (rope slicing, no flash attention, no fused RMSNorm, float32, data parallel only).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qwenbuild.errors import UserError
from qwenbuild.model.config import QwenConfig
from qwenbuild.store import atomic_path

TARGETS = ("ascend", "cpu")
QWEN_EOS = 151643


@dataclasses.dataclass(frozen=True)
class RunYaml:
    """What the YAML says beyond the model dimensions; batch_size is per data-parallel rank."""

    seq_length: int
    batch_size: int
    learning_rate: float
    train_dataset: str
    load_checkpoint: str = ""
    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    micro_batch_num: int = 1
    epochs: int = 1
    warmup_ratio: float = 0.01
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 42
    save_steps: int = 400
    keep_checkpoint_max: int = 1
    output_dir: str = "./output"
    vocab_file: str = ""
    merges_file: str = ""
    pad_token_id: int = QWEN_EOS
    eos_token_id: int = QWEN_EOS


def _model_config(cfg: QwenConfig, run: RunYaml, ascend: bool) -> dict:
    compute = "bfloat16" if ascend else "float32"
    return {
        "type": "LlamaConfig",
        "batch_size": 1,
        "seq_length": run.seq_length,
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size,
        "intermediate_size": cfg.intermediate_size,
        "qkv_has_bias": cfg.qkv_has_bias,
        "rms_norm_eps": cfg.rms_norm_eps,
        "theta": float(cfg.rope_theta),
        "max_position_embedding": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "emb_dropout_prob": 0.0,
        "eos_token_id": run.eos_token_id,
        "pad_token_id": run.pad_token_id,
        "ignore_token_id": -100,
        "compute_dtype": compute,
        "layernorm_compute_type": "float32",
        "softmax_compute_type": "float32",
        "rotary_dtype": "float32",
        "param_init_type": "float32",
        "use_past": False,
        "extend_method": "None",
        "use_flash_attention": ascend,
        "use_rope_slice": not ascend,
        "fused_rms_norm": ascend,
        "fine_grain_interleave": 1,
        "qkv_concat": False,
        "offset": 0,
        "checkpoint_name_or_path": "",
        "repetition_penalty": 1,
        "max_decode_length": 512,
        "top_k": 0,
        "top_p": 0.8,
        "do_sample": False,
    }


def _parallel(run: RunYaml, ascend: bool) -> dict:
    return {
        # semi-auto parallel (1) on Ascend; CPU compiles only data parallel (0)
        "parallel_mode": 1 if ascend else 0,
        "gradients_mean": not ascend,
        "enable_alltoall": False,
        "full_batch": ascend,
        "search_mode": "sharding_propagation",
        "enable_parallel_optimizer": ascend,
        "strategy_ckpt_save_file": "./ckpt_strategy.ckpt",
        "parallel_optimizer_config": {"gradient_accumulation_shard": False, "parallel_optimizer_threshold": 64},
    }


def _context(ascend: bool) -> dict:
    context = {"mode": 0, "device_target": "Ascend" if ascend else "CPU", "max_call_depth": 10000,
               "save_graphs": False, "save_graphs_path": "./graph", "device_id": 0}
    if ascend:
        context.update({"enable_graph_kernel": False, "max_device_memory": "58GB", "runtime_num_threads": 1,
                        "ascend_config": {"precision_mode": "must_keep_origin_dtype"}})
    return context


def _dataset(run: RunYaml, shuffle: bool) -> dict:
    return {
        "data_loader": {"type": "MindDataset", "dataset_dir": run.train_dataset, "shuffle": shuffle},
        "input_columns": ["input_ids", "target_ids", "attention_mask"],
        "num_parallel_workers": 8,
        "python_multiprocessing": False,
        "drop_remainder": shuffle,
        "batch_size": run.batch_size,
        "repeat": 1,
        "numa_enable": False,
        "prefetch_size": 1,
    }


def check_target(run: RunYaml, target: str) -> None:
    if target not in TARGETS:
        raise UserError(f"YAML target {target!r} is not one of {', '.join(TARGETS)}")
    if target == "cpu" and (run.model_parallel > 1 or run.pipeline_stage > 1):
        raise UserError(f"model_parallel={run.model_parallel}, pipeline_stage={run.pipeline_stage} cannot run on "
                        "CPU: MindSpore compiles semi-auto parallel only on Ascend/GPU",
                        hint="use the ascend YAML for model or pipeline parallel")


def mindformers_config(cfg: QwenConfig, run: RunYaml, target: str = "ascend") -> dict:
    """The YAML content as a dict, keys in the order of the original run_qwen1_5_72b.yaml."""
    check_target(run, target)
    ascend = target == "ascend"
    sharded = run.model_parallel > 1
    return {
        "seed": run.seed,
        "output_dir": run.output_dir,
        "load_checkpoint": run.load_checkpoint,
        "src_strategy_path_or_dir": "",
        # the shards under load_checkpoint are already built for this layout
        "auto_trans_ckpt": False,
        "only_save_strategy": False,
        "resume_training": False,
        "run_mode": "finetune",
        "trainer": {"type": "CausalLanguageModelingTrainer", "model_name": "qwen1_5"},
        "do_eval": False,
        "eval_step_interval": -1,
        "eval_epoch_interval": 50,
        "runner_config": {"epochs": run.epochs, "batch_size": run.batch_size, "sink_mode": True, "sink_size": 1},
        "runner_wrapper": {
            "type": "MFTrainOneStepCell",
            "scale_sense": {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 4096, "scale_factor": 2,
                            "scale_window": 1000} if ascend else 1.0,
            "use_clip_grad": run.grad_clip > 0,
            "max_grad_norm": run.grad_clip or 1.0,
        },
        "optimizer": {"type": "AdamW", "betas": [0.9, 0.95], "eps": 1.0e-8, "weight_decay": run.weight_decay},
        "lr_schedule": {"type": "CosineWithWarmUpLR", "learning_rate": run.learning_rate,
                        "warmup_ratio": run.warmup_ratio, "total_steps": -1},
        "train_dataset": _dataset(run, shuffle=True),
        "train_dataset_task": {"type": "CausalLanguageModelDataset"},
        "use_parallel": run.data_parallel * run.model_parallel * run.pipeline_stage > 1,
        "parallel": _parallel(run, ascend),
        "parallel_config": {
            "data_parallel": run.data_parallel,
            "model_parallel": run.model_parallel,
            "pipeline_stage": run.pipeline_stage,
            "use_seq_parallel": ascend and sharded,
            "micro_batch_num": run.micro_batch_num,
            "vocab_emb_dp": not sharded,
            "gradient_aggregation_group": 4,
        },
        "micro_batch_interleave_num": 1,
        "recompute_config": {"recompute": ascend, "select_recompute": False,
                             "parallel_optimizer_comm_recompute": False, "mp_comm_recompute": ascend,
                             "recompute_slice_activation": ascend},
        "callbacks": [
            {"type": "MFLossMonitor"},
            {"type": "CheckpointMonitor", "prefix": "qwen2", "save_checkpoint_steps": run.save_steps,
             "keep_checkpoint_max": run.keep_checkpoint_max, "integrated_save": False, "async_save": False},
        ],
        "context": _context(ascend),
        "model": {"model_config": _model_config(cfg, run, ascend), "arch": {"type": "LlamaForCausalLM"}},
        "processor": {
            "return_tensors": "ms",
            "tokenizer": {"model_max_length": 32768, "vocab_file": run.vocab_file, "merges_file": run.merges_file,
                          "unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                          "type": "Qwen2Tokenizer"},
            "type": "Qwen2Processor",
        },
        "metric": {"type": "PerplexityMetric"},
        "auto_tune": False,
        "profile": False,
    }


def write_yaml(path: str | Path, cfg: QwenConfig, run: RunYaml, target: str = "ascend") -> Path:
    import yaml

    content = mindformers_config(cfg, run, target)
    path = Path(path)
    with atomic_path(path) as tmp:
        text = yaml.safe_dump(content, sort_keys=False, default_flow_style=False, allow_unicode=True)
        tmp.write_text(f"# MindFormers {target} fine-tuning run for Qwen1.5, written by qwenbuild\n" + text,
                       encoding="utf-8")
    return path


def llama_from_yaml(path: str | Path):
    """Build mindformers' LlamaForCausalLM from the model section of a YAML (run on CPU with the cpu target)."""
    from mindformers.models.llama import LlamaConfig, LlamaForCausalLM
    from mindformers.tools.register import MindFormerConfig

    config = MindFormerConfig(str(path))
    model_config = {k: v for k, v in config.model.model_config.items() if k != "type"}
    return LlamaForCausalLM(LlamaConfig(**model_config))
