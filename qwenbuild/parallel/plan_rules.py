"""The rules of a parallel plan: how layers split over pipeline stages and what the degrees must divide.

One copy of each rule: the manifest reports them with file:line, the strategy and shard functions refuse a plan
that breaks them.
"""

from __future__ import annotations

import dataclasses

from qwenbuild.errors import UserError
from qwenbuild.model.config import QwenConfig

MAX_RANKS = 1 << 16  # one strategy file per rank: a bound that stops a typo from writing files forever


@dataclasses.dataclass(frozen=True)
class PlanProblem:
    key: str  # the parallel-plan setting to change: data_parallel, model_parallel, pipeline_stage, ...
    message: str
    hint: str | None = None

    def error(self) -> UserError:
        return UserError(self.message, hint=self.hint)


def default_offset(num_layers: int, pipeline_stage: int) -> list[int] | int:
    """The offset that puts the remainder layers on the last stages (0 when the layers split evenly)."""
    remainder = num_layers % pipeline_stage
    return 0 if remainder == 0 else [0] * (pipeline_stage - remainder) + [1] * remainder


def stage_layers(num_layers: int, pipeline_stage: int, offset: int | list[int] | None = 0) -> list[range]:
    """Layers of each pipeline stage by MindFormers' LayerSetting rule.

    Every stage gets num_layers // pipeline_stage layers plus its entry of `offset`; the offsets must add up to the
    remainder, so an uneven split is spelled out by the user, as MindFormers requires.
    """
    if pipeline_stage < 1 or pipeline_stage > num_layers:
        raise UserError(f"pipeline_stage {pipeline_stage} must be between 1 and num_layers {num_layers}")
    offset = offset or 0
    if pipeline_stage == 1:
        if offset not in (0, [0], (0,)):
            raise UserError(f"offset {offset!r} spreads layers over pipeline stages, but pipeline_stage is 1",
                            hint="remove offset, or set pipeline_stage to the number of its entries")
        return [range(num_layers)]
    base, remainder = divmod(num_layers, pipeline_stage)
    offsets = [0] * pipeline_stage if isinstance(offset, int) and offset == 0 else offset
    if isinstance(offsets, int) or len(offsets) != pipeline_stage or sum(offsets) != remainder:
        raise UserError(f"{num_layers} layers over {pipeline_stage} pipeline stages: offset {offset!r} must be a "
                        f"list of {pipeline_stage} per-stage extra layers adding up to {remainder}",
                        hint=f"for example offset = {default_offset(num_layers, pipeline_stage)}")
    counts = [base + o for o in offsets]
    if any(c < 1 for c in counts):
        empty = [s for s, c in enumerate(counts) if c < 1]
        raise UserError(f"offset {list(offsets)} leaves pipeline stage {empty[0]} without a layer (layers per stage: "
                        f"{counts})", hint=f"every stage needs a layer; for example offset = "
                                           f"{default_offset(num_layers, pipeline_stage)}")
    ranges, start = [], 0
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    return ranges


def indivisible_dims(cfg: QwenConfig, model_parallel: int, vocab_emb_dp: bool = False) -> list[tuple[str, int]]:
    """Model dimensions that model_parallel must divide but does not."""
    dims = [("num_heads", cfg.num_heads), ("n_kv_heads", cfg.n_kv_heads), ("intermediate_size", cfg.intermediate_size)]
    if not vocab_emb_dp:
        dims.append(("vocab_size", cfg.vocab_size))
    return [(name, value) for name, value in dims if value % model_parallel]


def plan_problems(cfg: QwenConfig, data_parallel: int, model_parallel: int, pipeline_stage: int,
                  vocab_emb_dp: bool = False, offset: int | list[int] | None = 0,
                  micro_batch_num: int | None = None) -> list[PlanProblem]:
    """Every rule the plan breaks, in the order a user would fix them."""
    degrees = (("data_parallel", data_parallel), ("model_parallel", model_parallel),
               ("pipeline_stage", pipeline_stage))
    below_one = [PlanProblem(name, f"{name} must be at least 1, not {value}") for name, value in degrees if value < 1]
    if below_one:
        return below_one
    out = []
    ranks = data_parallel * model_parallel * pipeline_stage
    if ranks > MAX_RANKS:
        out.append(PlanProblem("data_parallel", f"data_parallel {data_parallel} x model_parallel {model_parallel} x "
                                                f"pipeline_stage {pipeline_stage} = {ranks:,} ranks, more than the "
                                                f"{MAX_RANKS:,} one plan may have"))
    for name, value in indivisible_dims(cfg, model_parallel, vocab_emb_dp):
        hint = "set vocab_emb_dp = true or pad the vocabulary" if name == "vocab_size" else \
            "choose a model_parallel that divides it"
        out.append(PlanProblem("model_parallel", f"model.{name} {value} is not divisible by model_parallel "
                                                 f"{model_parallel}", hint))
    if pipeline_stage > cfg.num_layers:
        out.append(PlanProblem("pipeline_stage", f"pipeline_stage {pipeline_stage} exceeds model.num_layers "
                                                 f"{cfg.num_layers}: every stage needs at least one layer"))
    else:
        try:
            stage_layers(cfg.num_layers, pipeline_stage, offset)
        except UserError as exc:
            out.append(PlanProblem("offset" if offset else "pipeline_stage", str(exc)))
    if micro_batch_num is not None and pipeline_stage > 1 and micro_batch_num < pipeline_stage:
        out.append(PlanProblem("micro_batch_num", f"micro_batch_num {micro_batch_num} is below pipeline_stage "
                                                  f"{pipeline_stage}; use at least {pipeline_stage} to keep every "
                                                  "stage busy"))
    return out


def check_plan(cfg: QwenConfig, data_parallel: int, model_parallel: int, pipeline_stage: int,
               vocab_emb_dp: bool = False, offset: int | list[int] | None = 0) -> None:
    """Refuse a plan that breaks a rule, naming the first."""
    problems = plan_problems(cfg, data_parallel, model_parallel, pipeline_stage, vocab_emb_dp, offset)
    if problems:
        raise problems[0].error()
