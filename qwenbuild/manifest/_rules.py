"""Rules of a manifest that the schema cannot express: the parallel plan against the hardware and the model."""

from __future__ import annotations

from qwenbuild.model.lora import rank_problems
from qwenbuild.parallel.plan_rules import plan_problems
from qwenbuild.tokenizer.files import QWEN_VOCAB_SIZE


def manifest_problems(m) -> list:
    """Every broken rule as a Problem naming the key to change."""
    return _plan(m) + _lengths(m) + _nodes(m) + _tokenizer(m) + _data(m) + _lora(m)


def _plan(m) -> list:
    par, hw = m.parallel, m.hardware
    out = []
    if par.world_size != hw.device_count:
        out.append(m.problem("parallel.data_parallel",
                             f"data_parallel {par.data_parallel} x model_parallel {par.model_parallel} x "
                             f"pipeline_stage {par.pipeline_stage} = {par.world_size}, but the hardware has "
                             f"{hw.device_count} devices ({len(hw.nodes)} node(s) x {hw.devices_per_node} "
                             "devices_per_node); make the product equal the device count"))
    for p in plan_problems(m.model.config, par.data_parallel, par.model_parallel, par.pipeline_stage,
                           par.vocab_emb_dp, par.stage_offset, par.micro_batch_num):
        out.append(m.problem(f"parallel.{p.key}", p.message if p.hint is None else f"{p.message}; {p.hint}"))
    for p in plan_problems(m.model.config, 1, m.export.model_parallel, 1, par.vocab_emb_dp):
        out.append(m.problem("export.model_parallel", f"export topology dp 1 x mp {m.export.model_parallel}: "
                                                      + (p.message if p.hint is None else f"{p.message}; {p.hint}")))
    if hw.device == "ascend" and m.export.model_parallel > hw.devices_per_node:
        out.append(m.problem("export.model_parallel", f"{m.export.model_parallel} ranks do not fit one node of "
                                                      f"{hw.devices_per_node} devices; the export topology is one "
                                                      "node"))
    if hw.device == "cpu" and hw.devices_per_node % par.pipeline_stage:
        out.append(m.problem("hardware.devices_per_node",
                             f"{hw.devices_per_node} is not a multiple of pipeline_stage {par.pipeline_stage}: a CPU "
                             "worker runs every stage of its slice, so each node starts devices_per_node / "
                             "pipeline_stage workers"))
    if hw.device == "cpu" and m.train.engine_on(hw.device) == "mindformers" and par.world_size > par.data_parallel:
        out.append(m.problem("train.engine", "MindFormers compiles model_parallel and pipeline_stage only on Ascend; "
                                             "on CPU use engine = \"qwenbuild\" (tensor parallel from the strategy "
                                             "files) or data_parallel only"))
    return out


def _lengths(m) -> list:
    limit = m.model.max_position_embeddings
    return [m.problem(key, f"{value} exceeds model.max_position_embeddings {limit}")
            for key, value in (("export.seq_length", m.export.seq_length), ("dataset.seq_length", m.dataset.seq_length))
            if value > limit]


def _nodes(m) -> list:
    hw, out = m.hardware, []
    for i, node in enumerate(hw.nodes):
        for key in ("device_ids", "device_ips"):
            listed = getattr(node, key)
            if listed is not None and len(listed) != hw.devices_per_node:
                out.append(m.problem(f"hardware.nodes[{i}].{key}", f"lists {len(listed)} entries, but "
                                                                   f"devices_per_node is {hw.devices_per_node}"))
    ips = [n.ip for n in hw.nodes]
    if len(set(ips)) != len(ips) and hw.device == "ascend":
        out.append(m.problem("hardware.nodes", "two nodes share an ip; every Ascend node needs its own address"))
    return out


def _tokenizer(m) -> list:
    tok, vocab = m.tokenizer, m.model.vocab_size
    if tok.kind == "trained" and tok.vocab_size > vocab:
        return [m.problem("tokenizer.vocab_size", f"{tok.vocab_size} exceeds model.vocab_size {vocab}: the embedding "
                                                  "needs a row for every token")]
    if tok.kind == "qwen" and vocab < QWEN_VOCAB_SIZE:
        return [m.problem("tokenizer.kind", f"the Qwen tokenizer has {QWEN_VOCAB_SIZE} tokens but model.vocab_size "
                                            f"is {vocab}; use kind = \"trained\" or a larger vocabulary")]
    return []


def _data(m) -> list:
    """The builtin dataset's size is known here; other sources are counted by preprocess and finetune."""
    par, ds = m.parallel, m.dataset
    micro = par.micro_batch_num if par.pipeline_stage > 1 else 1
    batch = m.train.batch_size * par.data_parallel * micro
    if ds.source == "builtin" and ds.num_train < batch:
        return [m.problem("dataset.num_train", f"{ds.num_train} rows are fewer than one global batch of {batch} "
                                               f"(train.batch_size {m.train.batch_size} x data_parallel "
                                               f"{par.data_parallel}" + (f" x micro_batch_num {micro}" if micro > 1
                                                                         else "") + "); raise num_train or lower "
                                               "train.batch_size")]
    return []


def _lora(m) -> list:
    lora = m.train.lora_config
    if lora is None:
        return []
    return [m.problem("train.lora.rank", f"{problem}; lower train.lora.rank or leave that target out")
            for problem in rank_problems(m.model.config, lora.rank, lora.targets)]
