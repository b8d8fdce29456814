"""The JSON written next to each exported graph: its inputs, outputs, shapes and the tokenizer it expects."""

from __future__ import annotations

import json
import re
from pathlib import Path

from qwenbuild.data.chatml import SYSTEM_PROMPT, prompt
from qwenbuild.errors import UserError
from qwenbuild.export.graph_files import FULL, GRAPH_DIRS, INC
from qwenbuild.jsonfile import read_json
from qwenbuild.model.config import QwenConfig
from qwenbuild.model.params import CACHE_NAMES, cache_name
from qwenbuild.tokenizer.files import ENDOFTEXT, IM_END, IM_START

FORMAT = "qwenbuild-mindir-graph/2"
# the prompt a chat client renders, with placeholders where its system prompt and user message go
_PROMPT_TEMPLATE = prompt([{"role": "system", "content": "{system}"}, {"role": "user", "content": "{prompt}"}])


def _tensor(name: str, dtype: str, shape: list, meaning: str) -> dict:
    return {"name": name, "dtype": dtype, "shape": shape, "meaning": meaning}


def graph_io(kind: str, cfg: QwenConfig, batch_size: int, seq_length: int) -> tuple[list, list]:
    """(inputs, outputs) of the prefill ("full") or decode ("inc") graph, in graph argument order."""
    b, s = batch_size, seq_length
    logits = _tensor("logits", "float32", [b, cfg.vocab_size],
                     "next-token logits of each row, taken at position batch_valid_length-1 (every rank returns "
                     "the whole vocabulary)")
    shared = [
        _tensor("batch_index", "int64", [b], "the KV-cache row each batch row uses (0..batch_size-1)"),
        _tensor("zactivate_len", "int64", [s], "its length is the window of cache slots attention reads; the "
                                               "values are not read"),
    ]
    if kind == FULL:
        inputs = [
            _tensor("input_ids", "int32", [b, s], "prompt token ids, right-padded with pad_token_id to seq_length"),
            _tensor("batch_valid_length", "int32", [b], "number of real prompt tokens in each row (1..seq_length)"),
        ]
        return inputs + shared, [logits]
    inputs = [
        _tensor("input_ids", "int32", [b, 1], "the token chosen last for each row"),
        _tensor("batch_valid_length", "int32", [b], "tokens in each row counting this one; its keys and values "
                                                     "are written at cache slot batch_valid_length-1"),
    ]
    return inputs + shared, [logits]


def kv_cache(cfg: QwenConfig, batch_size: int, seq_length: int, model_parallel: int = 1) -> dict:
    """The graph state: one key and one value Parameter per layer, this rank's heads."""
    heads = cfg.n_kv_heads // model_parallel
    shape = [batch_size * heads * seq_length, cfg.head_dim]
    return {"where": "graph state (Parameters updated in place by the graph); the prefill graph fills the rows of "
                     "batch_index, each decode call writes one slot per row and reads the window of zactivate_len",
            "layout": f"row (b, h, s) = (b * {heads} + h) * {seq_length} + s: cache row b (batch_index), this "
                      "rank's KV head h, slot s",
            "parameters": [cache_name(i, w) for i in range(cfg.num_layers) for w in CACHE_NAMES],
            "dtype": "float32", "shape": shape,
            "sharing": "MindSpore Lite shares them between the full and inc models of one ModelGroup "
                       "(SHARE_WEIGHT); the GraphCell backend copies the prefill's into the decode graph once per "
                       "request"}


def sidecar(kind: str, cfg: QwenConfig, *, rank: int, batch_size: int, seq_length: int, mindir: str,
            variables: str | None, digest: str, eos_token_ids, pad_token_id: int | None, source_checkpoint: str,
            mindspore_version: str, model_parallel: int = 1) -> dict:
    """eos_token_ids/pad_token_id: the tokenizer's (empty/None when unknown at export; the runtime always takes
    them from the tokenizer it is given)."""
    inputs, outputs = graph_io(kind, cfg, batch_size, seq_length)
    return {
        "format": FORMAT,
        "graph": kind,
        "role": "prefill: the whole prompt in one call" if kind == FULL else "decode: one new token per row",
        "rank": rank,
        "model_parallel": model_parallel,
        "mindir": mindir,
        "variables": variables,
        "mindir_digest": digest,
        "batch_size": batch_size,
        "seq_length": seq_length,
        "vocab_size": cfg.vocab_size,
        "model": {"hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
                  "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
                  "intermediate_size": cfg.intermediate_size, "rope_theta": cfg.rope_theta,
                  "rms_norm_eps": cfg.rms_norm_eps, "param_dtype": cfg.param_dtype},
        "inputs": inputs,
        "outputs": outputs,
        "kv_cache": kv_cache(cfg, batch_size, seq_length, model_parallel),
        "eos_token_ids": [int(e) for e in eos_token_ids],
        "pad_token_id": pad_token_id,
        "tokenizer": {
            "class": "Qwen2Tokenizer (byte-level BPE: vocab.json, merges.txt, tokenizer_config.json)",
            "special_tokens": {ENDOFTEXT: "eos, pad", IM_START: "ChatML turn start",
                               IM_END: "ChatML turn end, eos of chat replies"},
            "max_token_id": cfg.vocab_size - 1,
            "chat_template": "ChatML: " + _PROMPT_TEMPLATE.replace("\n", "\\n"),
            "system_prompt": SYSTEM_PROMPT,
        },
        "source_checkpoint": source_checkpoint,
        "mindspore_version": mindspore_version,
    }


_INT_LIST = re.compile(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]")


def dump(doc: dict) -> bytes:
    """Indented JSON with shapes and id lists kept on one line."""
    text = json.dumps(doc, indent=1, ensure_ascii=False)
    text = _INT_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    return (text + "\n").encode("utf-8")


def read_sidecar(path) -> dict:
    """Read and check one rank_N_graph.json; UserError naming the file when missing or malformed."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist: the export under {path.parent.parent} is missing or incomplete",
                        hint=f"export the graphs first (doit export, or qwenbuild export --output_dir "
                             f"{path.parent.parent}); --mindir_root_dir must hold {GRAPH_DIRS[FULL]}/ and "
                             f"{GRAPH_DIRS[INC]}/")
    doc = read_json(path, "graph description", hint="re-export the graphs")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"{path}: format is {doc.get('format') if isinstance(doc, dict) else doc!r}, "
                        f"expected {FORMAT!r}", hint="re-export the graphs with this version of qwenbuild")
    for key in ("graph", "mindir", "batch_size", "seq_length", "vocab_size", "inputs", "outputs"):
        if key not in doc:
            raise UserError(f"{path} lacks the key {key!r}", hint="re-export the graphs")
    return doc
