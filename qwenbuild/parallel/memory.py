"""Device memory of a parallel plan: what a training rank and an export (predict) card allocate, by component.

Training counts what the generated YAML makes MindFormers hold on each rank of a pipeline stage: the master weights
in `param_init_type`, their gradients in the same dtype (the pipeline's `accu_grads`, or one step's gradients),
AdamW's two moments in float32 (`mindformers/core/optim/adamw.py`), and the activations of the micro batches in
flight (1F1B: stage p holds min(pipeline_stage - p, micro_batch_num)), with recompute and sequence parallelism.
The parallel optimizer (on Ascend) splits a parameter's weights and moments over data_parallel when its slice is
at least `PARALLEL_OPTIMIZER_THRESHOLD` bytes and its first dimension divides. Activations are an estimate; the
parameter and optimizer figures are exact (a test builds MindFormers' network and optimizer and compares bytes).
Under LoRA only the adapters have gradients and AdamW moments, and the parallel optimizer splits only them: the
frozen weights are held whole.
"""

from __future__ import annotations

import dataclasses
import math

from qwenbuild.dtypes import ITEMSIZE
from qwenbuild.model.config import QwenConfig
from qwenbuild.model.lora import A, LoraConfig, layer_adapter_slices
from qwenbuild.parallel.shard_sizes import ShardGroup, stage_groups, stage_elements

GIB = 1 << 30
# the YAML's parallel_optimizer_config.parallel_optimizer_threshold (64 KB): smaller parameters stay whole
PARALLEL_OPTIMIZER_THRESHOLD = 64 * 1024
# below this share of max_device_memory left free a plan is warned about: the estimate is not exact
HEADROOM = 0.10
# what MindSpore may allocate of a card: the rest holds the driver, HCCL buffers and the runtime (the seed's
# max_device_memory "58GB" on a 64 GB 910B)
RESERVED_SHARE = 6 / 64
ADAM_MOMENTS = 2


@dataclasses.dataclass(frozen=True)
class Component:
    name: str  # weights, gradients, optimizer, activations, kv_cache
    bytes: float
    dtype: str
    what: str  # how it was counted, in one phrase


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    """One device's memory: a pipeline stage's rank (training) or a card of the export topology."""

    label: str
    layers: range
    params: int  # parameter elements the device holds (before the parallel optimizer's split)
    components: tuple[Component, ...]
    limit: float  # bytes MindSpore may allocate (max_device_memory)

    @property
    def total(self) -> float:
        return sum(c.bytes for c in self.components)

    @property
    def headroom(self) -> float:
        return 1 - self.total / self.limit

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    def to_json(self) -> dict:
        return {"label": self.label, "layers": [self.layers.start, self.layers.stop - 1] if len(self.layers) else [],
                "params": self.params, "total_bytes": self.total, "limit_bytes": self.limit,
                "headroom": round(self.headroom, 4),
                "components": {c.name: {"bytes": c.bytes, "dtype": c.dtype, "what": c.what}
                               for c in self.components}}


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    """What training memory depends on, beyond the model: the plan, the batch and the YAML's dtypes and switches."""

    data_parallel: int
    model_parallel: int
    pipeline_stage: int
    micro_batch_num: int
    vocab_emb_dp: bool
    use_seq_parallel: bool
    recompute: bool
    seq_length: int
    batch_size: int
    weight_dtype: str  # the master weights: MindFormers' param_init_type
    compute_dtype: str  # activations
    flash_attention: bool
    parallel_optimizer: bool
    lora: LoraConfig | None = None  # train.method = "lora": the adapters that train; None: every weight


def max_device_memory_gb(device_memory_gb: float) -> int:
    """The YAML's context.max_device_memory (whole GB) for a card of device_memory_gb."""
    return max(1, math.floor(device_memory_gb * (1 - RESERVED_SHARE)))


def _optimizer_split(group: ShardGroup, itemsize: int, data_parallel: int, enabled: bool) -> int:
    """How many ways the parallel optimizer splits one tensor of a group (1 when it stays whole)."""
    if not enabled or data_parallel == 1 or group.shard_elements * itemsize < PARALLEL_OPTIMIZER_THRESHOLD:
        return 1
    return data_parallel if group.shard_shape[0] % data_parallel == 0 else 1


def layer_activation_elements(cfg: QwenConfig, tokens: int, seq_length: int, model_parallel: int,
                              sequence_parallel: bool, flash_attention: bool) -> float:
    """Elements one decoder layer keeps for its backward pass, per micro batch of `tokens` tokens: the two norms'
    inputs and outputs (split by model_parallel under sequence parallelism), q, k, v and the attention output,
    SwiGLU's gate, up and product (split by model_parallel), and the attention probabilities without flash
    attention."""
    h, kv = cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim
    norms = 4 * tokens * h / (model_parallel if sequence_parallel else 1)
    split = tokens * (2 * h + 2 * kv + 3 * cfg.intermediate_size) / model_parallel
    scores = 0 if flash_attention else tokens * cfg.num_heads * seq_length / model_parallel
    return norms + split + scores


def _adapter_groups(cfg: QwenConfig, lora: LoraConfig, model_parallel: int, layers: int) -> list[ShardGroup]:
    return [ShardGroup(f"layers.{name}", layers, whole, part)
            for name, (whole, part) in layer_adapter_slices(cfg, lora, model_parallel).items()] if layers else []


def adapter_activation_elements(cfg: QwenConfig, lora: LoraConfig, tokens: int, model_parallel: int) -> float:
    """Elements one layer's adapters keep per micro batch: each target's input after dropout (when it drops) and
    its rank-wide product with A."""
    total = 0.0
    for name, (_, part) in layer_adapter_slices(cfg, lora, model_parallel).items():
        if name.endswith(A):
            total += tokens * ((part[1] if lora.dropout else 0) + lora.rank)
    return total


def _in_flight(stage: int, plan: TrainingPlan) -> int:
    return min(plan.pipeline_stage - stage, plan.micro_batch_num) if plan.pipeline_stage > 1 else 1


def _activations(cfg: QwenConfig, plan: TrainingPlan, stage: int, layers: int) -> Component:
    tokens, mp, sp = plan.seq_length * plan.batch_size, plan.model_parallel, plan.use_seq_parallel
    abytes, in_flight = ITEMSIZE[plan.compute_dtype], _in_flight(stage, plan)
    full = layer_activation_elements(cfg, tokens, plan.seq_length, mp, sp, plan.flash_attention)
    if plan.lora is not None:
        full += adapter_activation_elements(cfg, plan.lora, tokens, mp)
    if plan.recompute:
        # each layer keeps its input; one layer at a time is recomputed in full for its backward
        kept = tokens * cfg.hidden_size / (mp if sp else 1) * layers * in_flight + (full if layers else 0)
        what = "recompute: each layer's input per micro batch in flight, one layer in full"
    else:
        kept = full * layers * in_flight
        what = "every layer's activations per micro batch in flight"
    nbytes = kept * abytes
    if stage == plan.pipeline_stage - 1:
        vocab = cfg.vocab_size / (1 if plan.vocab_emb_dp else mp)
        # the final norm, the logits in the compute dtype, cast to float32, and the softmax the loss keeps
        nbytes += 2 * tokens * cfg.hidden_size / (mp if sp else 1) * abytes + tokens * vocab * (abytes + 4 + 4)
    if plan.pipeline_stage > 1:
        what += " (1F1B: min(pipeline_stage - stage, micro_batch_num))"
    what += "; the last stage also the final norm and the logits (float32 softmax)"
    if plan.use_seq_parallel and mp > 1:
        what += "; sequence parallel"
    return Component("activations", nbytes, plan.compute_dtype, what)


def training_memory(cfg: QwenConfig, plan: TrainingPlan, stages: list[range], limit: float) -> list[DeviceMemory]:
    """Per pipeline stage, the memory of each of its ranks, by component."""
    wbytes = ITEMSIZE[plan.weight_dtype]
    rows = []
    for stage, (layers, groups) in enumerate(zip(stages, stage_groups(cfg, plan.model_parallel, plan.vocab_emb_dp,
                                                                       stages))):
        params = stage_elements(groups)
        if plan.lora is not None:
            # the frozen weights stay whole; the adapters train
            frozen, groups = params, _adapter_groups(cfg, plan.lora, plan.model_parallel, len(layers))
        splits = [_optimizer_split(g, wbytes, plan.data_parallel, plan.parallel_optimizer) for g in groups]
        sharded = sum(g.elements / k for g, k in zip(groups, splits))
        trained = stage_elements(groups)
        split_note = f", split over data_parallel {plan.data_parallel} by the parallel optimizer" \
            if any(k > 1 for k in splits) else ""
        if plan.lora is None:
            weights = Component("weights", sharded * wbytes, plan.weight_dtype, "master weights" + split_note)
        else:
            weights = Component("weights", (frozen + sharded) * wbytes, plan.weight_dtype,
                                f"frozen master weights, whole, and the rank {plan.lora.rank} adapters" + split_note)
            params = frozen + trained
        trains = "" if plan.lora is None else " (the adapters only)"
        components = [
            weights,
            Component("gradients", trained * wbytes, plan.weight_dtype,
                      ("accumulated over micro batches (accu_grads)" if plan.pipeline_stage > 1 else "one step's")
                      + trains),
            Component("optimizer", sharded * 4 * ADAM_MOMENTS, "float32", "AdamW adam_m and adam_v" + trains
                      + split_note),
        ]
        if not plan.recompute and plan.compute_dtype != plan.weight_dtype:
            components.append(Component("weight_casts", params * ITEMSIZE[plan.compute_dtype], plan.compute_dtype,
                                        "the weights cast to the compute dtype, kept for the backward pass"))
        components.append(_activations(cfg, plan, stage, len(layers)))
        rows.append(DeviceMemory(f"stage {stage}", layers, params, tuple(components), limit))
    return rows


def one_process(rows: list[DeviceMemory]) -> DeviceMemory:
    """Several stages run by one process (a CPU worker runs every stage of its slice): their memory added up."""
    names = [c.name for c in rows[0].components]
    for row in rows[1:]:
        names += [c.name for c in row.components if c.name not in names]
    components = []
    for name in names:
        parts = [c for row in rows for c in row.components if c.name == name]
        components.append(Component(name, sum(c.bytes for c in parts), parts[0].dtype, parts[0].what))
    layers = range(rows[0].layers.start, rows[-1].layers.stop)
    return DeviceMemory(f"stages 0-{len(rows) - 1}", layers, sum(r.params for r in rows), tuple(components),
                        rows[0].limit)


def deployment_memory(cfg: QwenConfig, model_parallel: int, vocab_emb_dp: bool, seq_length: int, batch_size: int,
                      dtype: str, flash_attention: bool, limit: float) -> DeviceMemory:
    """One card of the export topology (dp 1 x model_parallel x pp 1): its weights in the deployment dtype, the KV
    cache of export.seq_length x batch_size, and the prefill of one layer at a time."""
    [groups] = stage_groups(cfg, model_parallel, vocab_emb_dp, [range(cfg.num_layers)])
    params, size = stage_elements(groups), ITEMSIZE[dtype]
    whole = "" if not vocab_emb_dp or model_parallel == 1 else "; embedding and lm_head whole on every card " \
                                                                "(vocab_emb_dp)"
    kv_heads = cfg.n_kv_heads / model_parallel
    cache = 2 * cfg.num_layers * batch_size * seq_length * kv_heads * cfg.head_dim * size
    tokens = seq_length * batch_size
    prefill = layer_activation_elements(cfg, tokens, seq_length, model_parallel, False, flash_attention) * size
    return DeviceMemory(f"export card (mp {model_parallel})", range(cfg.num_layers), params, (
        Component("weights", params * size, dtype, f"every layer split by model_parallel {model_parallel}{whole}"),
        Component("kv_cache", cache, dtype, f"keys and values of {cfg.num_layers} layers x {seq_length} positions x "
                                            f"batch {batch_size}"),
        Component("activations", prefill, dtype, f"the prefill of one layer at a time ({tokens} tokens)"),
    ), limit)
