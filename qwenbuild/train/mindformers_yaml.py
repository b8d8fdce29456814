"""The MindFormers run YAML of a fine-tuning run (the run_qwen1_5_72b.yaml equivalent), for Ascend or CPU.

Every value comes from the run's settings (run.json) and the manifest's parallel plan. `target="ascend"` adds the
original's performance settings (flash attention, fused RMSNorm, semi-auto parallel, the model's compute dtype);
`target="cpu"` gives the flags MindFormers' LlamaForCausalLM needs to run on CPU (rope slicing, no flash attention,
no fused RMSNorm, float32, data parallel only).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from qwenbuild.errors import UserError
from qwenbuild.model.lora import LoraConfig, cell_regex
from qwenbuild.parallel.memory import max_device_memory_gb
from qwenbuild.store import atomic_path
from qwenbuild.tokenizer.files import ENDOFTEXT, MODEL_MAX_LENGTH, QWEN_SPECIAL_IDS
from qwenbuild.train.events import tensorboard_dir
from qwenbuild.train.settings import TrainSettings

TARGETS = ("ascend", "cpu")
# MindFormers' master weights: float32 whatever the compute dtype (bfloat16 on Ascend), as the seed's YAML has them
PARAM_INIT_TYPE = "float32"


@dataclasses.dataclass(frozen=True)
class RunYaml:
    """A run's settings (the same run.json the CPU trainer reads, so both agree on every value) plus what only the
    YAML needs: the rest of the parallel plan (qwen.toml [parallel]) and the tokenizer files."""

    settings: TrainSettings
    micro_batch_num: int
    vocab_emb_dp: bool
    use_seq_parallel: bool
    recompute: bool
    gradient_aggregation_group: int
    offset: int | list[int] = 0  # extra layers per pipeline stage, as MindFormers' model_config.offset
    vocab_file: str = ""
    merges_file: str = ""
    pad_token_id: int = QWEN_SPECIAL_IDS[ENDOFTEXT]
    eos_token_id: int = QWEN_SPECIAL_IDS[ENDOFTEXT]
    device_memory_gb: float = 64  # hardware.device_memory_gb: the card's memory, of which MindSpore may take a share


def _model_config(run: RunYaml, ascend: bool) -> dict:
    # the CPU kernels compute in float32 only
    cfg = run.settings.model
    compute = cfg.compute_dtype if ascend else "float32"
    return {
        "type": "LlamaConfig",
        "batch_size": 1,
        "seq_length": run.settings.seq_length,
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
        "param_init_type": PARAM_INIT_TYPE,
        "use_past": False,
        "extend_method": "None",
        "use_flash_attention": ascend,
        "use_rope_slice": not ascend,
        "fused_rms_norm": ascend,
        "fine_grain_interleave": 1,
        "qkv_concat": False,
        "offset": run.offset,
        "checkpoint_name_or_path": "",
        "repetition_penalty": 1,
        "max_decode_length": 512,
        "top_k": 0,
        "top_p": 0.8,
        "do_sample": False,
        **({"pet_config": pet_config(run.settings.lora)} if run.settings.lora else {}),
    }


def pet_config(lora: LoraConfig) -> dict:
    """model_config.pet_config of MindFormers' LoRA: its regex over cell names, from the Hugging Face targets."""
    return {"pet_type": "lora", "lora_rank": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
            "target_modules": cell_regex(lora.targets)}


def _parallel(ascend: bool) -> dict:
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


def _context(ascend: bool, device_memory_gb: float) -> dict:
    context = {"mode": 0, "device_target": "Ascend" if ascend else "CPU", "max_call_depth": 10000,
               "save_graphs": False, "save_graphs_path": "./graph", "device_id": 0}
    if ascend:
        context.update({"enable_graph_kernel": False,
                        "max_device_memory": f"{max_device_memory_gb(device_memory_gb)}GB", "runtime_num_threads": 1,
                        "ascend_config": {"precision_mode": "must_keep_origin_dtype"}})
    return context


def _dataset(run: RunYaml, shuffle: bool) -> dict:
    return {
        "data_loader": {"type": "MindDataset", "dataset_dir": run.settings.train_data, "shuffle": shuffle},
        # MindFormers 1.9 passes columns to LlamaForCausalLM by keyword: target_ids are its labels; the
        # attention mask is rebuilt inside the model from the padding, so the column is not read
        "input_columns": ["input_ids", "target_ids"],
        "construct_args_key": ["input_ids", "labels"],
        "num_parallel_workers": 8,
        "python_multiprocessing": False,
        "drop_remainder": shuffle,
        "batch_size": run.settings.batch_size,
        "repeat": 1,
        "numa_enable": False,
        "prefetch_size": 1,
    }


def check_target(run: RunYaml, target: str) -> None:
    if target not in TARGETS:
        raise UserError(f"YAML target {target!r} is not one of {', '.join(TARGETS)}")
    s = run.settings
    if target == "cpu" and (s.model_parallel > 1 or s.pipeline_stage > 1):
        raise UserError(f"model_parallel={s.model_parallel}, pipeline_stage={s.pipeline_stage} cannot run on "
                        "CPU: MindSpore compiles semi-auto parallel only on Ascend/GPU",
                        hint="use the ascend YAML for model or pipeline parallel")


def default_target(settings: TrainSettings) -> str:
    """The settings' device; a model- or pipeline-parallel plan trained on CPU by qwenbuild's own loop gets the
    YAML its cluster would run (MindFormers compiles those plans only on Ascend)."""
    parallel = settings.model_parallel > 1 or settings.pipeline_stage > 1
    return "ascend" if settings.device_target == "Ascend" or parallel else "cpu"


def mindformers_config(run: RunYaml, target: str | None = None) -> dict:
    """The YAML content as a dict, keys in the order of the original run_qwen1_5_72b.yaml; the target defaults to
    the settings' device."""
    s = run.settings
    target = target or default_target(s)
    check_target(run, target)
    ascend = target == "ascend"
    runner = {"epochs": s.epochs, "batch_size": s.batch_size, "sink_mode": True, "sink_size": 1}
    if s.steps:
        # a fixed step count, as qwenbuild's trainer runs it: enough epochs (each has a step at least), then stop
        runner.update(epochs=max(s.epochs, s.steps), stop_step=s.steps)
    return {
        "seed": s.seed,
        # MindFormers writes checkpoint/rank_N below its output_dir
        "output_dir": s.output_dir,
        "load_checkpoint": s.init_checkpoint or "",
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
        "runner_config": runner,
        "runner_wrapper": {
            "type": "MFTrainOneStepCell",
            "scale_sense": {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 4096, "scale_factor": 2,
                            "scale_window": 1000} if ascend else 1.0,
            "use_clip_grad": s.grad_clip > 0,
            "max_grad_norm": s.grad_clip or 1.0,
        },
        "optimizer": {"type": "AdamW", "betas": [s.beta1, s.beta2], "eps": s.eps, "weight_decay": s.weight_decay},
        "lr_schedule": {"type": "CosineWithWarmUpLR", "learning_rate": s.learning_rate, "lr_end": s.lr_end,
                        "warmup_ratio": s.warmup_ratio, "total_steps": s.steps or -1},
        "train_dataset": _dataset(run, shuffle=True),
        "train_dataset_task": {"type": "CausalLanguageModelDataset"},
        "use_parallel": s.data_parallel * s.model_parallel * s.pipeline_stage > 1,
        "parallel": _parallel(ascend),
        "parallel_config": {
            "data_parallel": s.data_parallel,
            "model_parallel": s.model_parallel,
            "pipeline_stage": s.pipeline_stage,
            "use_seq_parallel": run.use_seq_parallel,
            "micro_batch_num": run.micro_batch_num,
            "vocab_emb_dp": run.vocab_emb_dp,
            "gradient_aggregation_group": run.gradient_aggregation_group,
        },
        "micro_batch_interleave_num": 1,
        "recompute_config": {"recompute": run.recompute, "select_recompute": False,
                             "parallel_optimizer_comm_recompute": False, "mp_comm_recompute": run.recompute,
                             "recompute_slice_activation": run.recompute},
        "callbacks": [
            {"type": "MFLossMonitor"},
            {"type": "CheckpointMonitor", "prefix": s.checkpoint_prefix, "save_checkpoint_steps": s.save_steps,
             "keep_checkpoint_max": s.keep_checkpoint_max, "integrated_save": False, "async_save": False},
            # MindFormers 1.9 reads runner_config.stop_step but never adds the callback that acts on it
            *([{"type": "TrainCallBack", "stop_step": s.steps}] if s.steps else []),
        ],
        # TensorBoard event files of each rank in <tensorboard_dir>/rank_N, beside qwenbuild's own engine's
        "tensorboard": {"tensorboard_dir": str(tensorboard_dir(s.output_dir)), "tensorboard_queue_size": 10,
                        "log_loss_scale_to_tensorboard": True, "log_timers_to_tensorboard": True},
        "context": _context(ascend, run.device_memory_gb),
        "model": {"model_config": _model_config(run, ascend), "arch": {"type": "LlamaForCausalLM"}},
        "processor": {
            "return_tensors": "ms",
            "tokenizer": {"model_max_length": MODEL_MAX_LENGTH, "vocab_file": run.vocab_file, "merges_file": run.merges_file,
                          "unk_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT,
                          "type": "Qwen2Tokenizer"},
            "type": "Qwen2Processor",
        },
        "metric": {"type": "PerplexityMetric"},
        "auto_tune": False,
        "profile": False,
    }


def predict_config(run: RunYaml, model_parallel: int, checkpoint: str, seq_length: int, max_decode_length: int,
                   target: str | None = None, dtype: str = "float32") -> dict:
    """The online-predict YAML (run_qwen1_5_72b_infer.yaml's settings) for `model_parallel` cards of one node:
    use_past, dp 1 x mp model_parallel x pp 1 with the embedding whole, the complete checkpoint resharded by
    MindFormers itself (auto_trans_ckpt), the tokenizer files, greedy decoding; on Ascend the weights are held in
    `dtype` (the deployment's, export.dtype) and, when it is 16-bit, computed in it; on CPU all is float32."""
    s = dataclasses.replace(run.settings, data_parallel=1, model_parallel=model_parallel, pipeline_stage=1,
                            seq_length=seq_length)
    config = mindformers_config(dataclasses.replace(run, settings=s, micro_batch_num=1, vocab_emb_dp=True), target)
    config.update(load_checkpoint=checkpoint, auto_trans_ckpt=model_parallel > 1, run_mode="predict",
                  use_parallel=model_parallel > 1)
    config["runner_config"] = {"epochs": 5, "batch_size": 1, "sink_mode": True, "sink_size": 2}
    config["parallel_config"].update(gradient_aggregation_group=4, use_seq_parallel=False)
    config["parallel"].pop("strategy_ckpt_save_file")
    config["parallel"]["strategy_ckpt_config"] = {"save_file": "./ckpt_strategy.ckpt", "only_trainable_params": False}
    config["model"]["model_config"].update(batch_size=1, use_past=True, max_decode_length=max_decode_length,
                                           do_sample=False, top_k=0, top_p=0.8, repetition_penalty=1)
    if (target or default_target(s)) == "ascend":
        # float32 weights keep the model's 16-bit compute, as the original's note on param_init_type says: with
        # use_past the rotary kernel (ApplyRotaryPosEmb) takes float16 or bfloat16 inputs only
        config["model"]["model_config"].update(param_init_type=dtype,
                                               **({"compute_dtype": dtype} if dtype != "float32" else {}))
    for key in ("train_dataset", "train_dataset_task", "lr_schedule", "optimizer", "tensorboard"):
        config.pop(key)
    return config


def write_yaml(path: str | Path, run: RunYaml, target: str | None = None, content: dict | None = None,
               what: str = "fine-tuning run") -> Path:
    content = content or mindformers_config(run, target)
    path = Path(path)
    with atomic_path(path) as tmp:
        text = yaml.safe_dump(content, sort_keys=False, default_flow_style=False, allow_unicode=True)
        tmp.write_text(f"# MindFormers {target or default_target(run.settings)} {what} for Qwen1.5, written by "
                       "qwenbuild\n" + text, encoding="utf-8")
    return path


def llama_from_yaml(path: str | Path):
    """Build mindformers' LlamaForCausalLM from the model section of a YAML (run on CPU with the cpu target)."""
    # mindformers takes seconds to load (and writes ./output/log): imported only here
    from mindformers.models.llama import LlamaConfig, LlamaForCausalLM
    from mindformers.tools.register import MindFormerConfig

    config = MindFormerConfig(str(path))
    model_config = {k: v for k, v in config.model.model_config.items() if k != "type"}
    return LlamaForCausalLM(LlamaConfig(**model_config))
