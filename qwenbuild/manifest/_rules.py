"""Rules of a manifest that the schema cannot express: the parallel plan against the hardware and the model."""

from __future__ import annotations

from qwenbuild.build_dir import BuildDir
from qwenbuild.model.lora import rank_problems
from qwenbuild.parallel.memory import GIB, deployment_memory, max_device_memory_gb
from qwenbuild.parallel.plan_rules import plan_problems
from qwenbuild.tokenizer.files import QWEN_VOCAB_SIZE


def manifest_problems(m) -> list:
    """Every broken rule as a Problem naming the key to change."""
    return (_plan(m) + _export_fits(m) + _lengths(m) + _nodes(m) + _tokenizer(m) + _data(m) + _prompt(m)
            + _strategy_dir(m) + _lora(m))


def deployment_dtype(m) -> str:
    """The dtype the export topology's graphs and the predict YAML hold weights in (export.dtype's rule)."""
    return m.export.dtype_on(m.hardware.device, m.model.param_dtype)


def device_limit(m) -> float:
    """Bytes MindSpore may allocate on one device: the YAML's max_device_memory on Ascend, the host RAM share
    hardware.device_memory_gb on CPU."""
    gb = m.hardware.device_memory_gb
    return (max_device_memory_gb(gb) if m.hardware.device == "ascend" else gb) * GIB


def _export_card(m, model_parallel: int, vocab_emb_dp: bool):
    ex, ascend = m.export, m.hardware.device == "ascend"
    return deployment_memory(m.model.config, model_parallel, vocab_emb_dp, ex.seq_length, ex.batch_size,
                             deployment_dtype(m), ascend, device_limit(m))


def _export_fits(m) -> list:
    """A card of the export topology holds its weights, its KV cache and a layer's prefill, or validate refuses,
    naming the smallest export.model_parallel on one node that fits."""
    mp, cfg, emb_dp = m.export.model_parallel, m.model.config, m.parallel.vocab_emb_dp
    if plan_problems(cfg, 1, mp, 1, emb_dp):
        return []  # _plan names what mp must divide first
    card = _export_card(m, mp, emb_dp)
    if card.total <= card.limit:
        return []
    most = m.hardware.devices_per_node if m.hardware.device == "ascend" else 64
    fitting = [k for k in range(mp + 1, most + 1)
               if not plan_problems(cfg, 1, k, 1, emb_dp) and _export_card(m, k, emb_dp).total <= card.limit]
    todo = f"set export.model_parallel = {fitting[0]}" if fitting else \
        f"no export.model_parallel up to {most} fits"
    if emb_dp and mp > 1 and not plan_problems(cfg, 1, mp, 1, False) and _export_card(m, mp, False).total <= card.limit:
        todo += " (or parallel.vocab_emb_dp = false: the embedding and lm_head split too)"
    parts = ", ".join(f"{c.name} {c.bytes / GIB:.1f} GiB" for c in card.components)
    limit = (f"max_device_memory {card.limit / GIB:g}GB of a {m.hardware.device_memory_gb:g} GB card"
             if m.hardware.device == "ascend" else f"hardware.device_memory_gb {m.hardware.device_memory_gb:g}")
    return [m.problem("export.model_parallel",
                      f"a card of the export topology (dp 1 x mp {mp}) needs {card.total / GIB:.1f} GiB in "
                      f"{deployment_dtype(m)} ({parts}; export.seq_length {m.export.seq_length} x export.batch_size "
                      f"{m.export.batch_size}), more than {limit}; {todo}, or lower export.seq_length or "
                      "export.batch_size")]


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


def _prompt(m) -> list:
    """export.predict_data goes onto the command lines of predict.sh and lite_infer.sh."""
    text = m.export.predict_data
    if text is not None and (not text.strip() or "\0" in text):
        return [m.problem("export.predict_data", "a prompt needs text other than white space and no NUL character "
                                                 "(it is an argument of predict.sh and lite_infer.sh)")]
    return []


def _strategy_dir(m) -> list:
    """Compiled strategies read from where the finetune's MindFormers saves its own would be replaced by them."""
    given, compiled = m.path_of("parallel.strategy_dir"), BuildDir(m.build_dir).compiled_strategy
    if given is not None and (given == compiled or compiled in given.parents):
        return [m.problem("parallel.strategy_dir", f"{given} is where MindFormers saves the strategies it compiles "
                                                   "during the finetune, which replaces them; copy the files to "
                                                   "another directory and point there")]
    return []
