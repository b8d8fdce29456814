"""Held-out evaluation: greedy answers to the ChatML prompts of the held-out split, scored by exact match."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from qwenbuild.data.instructions import eval_examples
from qwenbuild.errors import UserError
from qwenbuild.jsonfile import read_json
from qwenbuild.model.config import QwenConfig
from qwenbuild.store import atomic_path
from qwenbuild.tokenizer.files import ENDOFTEXT, IM_END
from qwenbuild.tokenizer.load import load_tokenizer
from qwenbuild.train.progress import write_metrics
from qwenbuild.weights.mindspore_ckpt import load_weights

logger = logging.getLogger(__name__)

EVAL_BATCH = 64


def read_heldout(path: str | Path) -> list[dict]:
    path = Path(path)
    rows = read_json(path, "held-out file", missing_hint="build the dataset first")
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{path}: expected a non-empty JSON array of alpaca rows (instruction/input/output)")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) \
                or not isinstance(row.get("output"), str):
            raise UserError(f"{path}: row {i} lacks a string \"instruction\" or \"output\"")
    return rows


class GreedyDecoder:
    """Batched greedy decoding with the network's KV-cache graphs, compiled once for [batch, length]."""

    def __init__(self, net, cfg: QwenConfig, batch: int, length: int):
        # mindspore takes seconds to load: imported only when this runs
        import mindspore as ms

        from qwenbuild.model.network import DecodeCell, PrefillCell

        self.batch, self.length = batch, length
        self.prefill = PrefillCell(net, length)
        self.decode = DecodeCell(net, length)
        self.ms = ms

    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int]) -> list[list[int]]:
        """New tokens of up to `batch` prompts, each cut after its first eos id."""
        ms, n = self.ms, len(prompts)
        padded = prompts + [prompts[0]] * (self.batch - n)
        ids = np.zeros((self.batch, self.length), np.int32)
        for i, p in enumerate(padded):
            ids[i, :len(p)] = p
        valid = np.array([len(p) for p in padded], np.int32)
        logits, keys, values = self.prefill(ms.Tensor(ids), ms.Tensor(valid))
        out = [[] for _ in range(self.batch)]
        done = np.zeros(self.batch, bool)
        done[n:] = True
        for _ in range(max_new_tokens):
            tokens = logits.asnumpy().argmax(-1).astype(np.int32)
            for i in np.flatnonzero(~done):
                out[i].append(int(tokens[i]))
                done[i] = tokens[i] in eos_ids
            valid += 1
            if done.all() or valid.max() > self.length:
                break
            logits, keys, values = self.decode(ms.Tensor(tokens[:, None]), ms.Tensor(valid), keys, values)
        return out[:n]


def _answer(tokenizer, new_ids: list[int], eos_ids: set[int]) -> str:
    if new_ids and new_ids[-1] in eos_ids:
        new_ids = new_ids[:-1]
    return tokenizer.decode(new_ids, skip_special_tokens=True)


def evaluate_heldout(ckpt: str | Path, cfg: QwenConfig, tokenizer_dir: str | Path, heldout_file: str | Path,
                     metrics_path: str | Path | None = None, max_new_tokens: int = 32, limit: int | None = None,
                     samples_path: str | Path | None = None) -> dict:
    """Greedy answers to the held-out prompts (the ChatML prompt training used) compared with the references.

    Returns {"heldout_accuracy", "heldout_correct", "heldout_total", "heldout_by_task", "eval_s"} and merges it
    into metrics_path when given; samples_path receives every prompt/answer/reference as JSON Lines.
    """
    # mindspore takes seconds to load: imported only when this runs
    import mindspore as ms

    from qwenbuild.model.network import QwenForCausalLM

    started = time.monotonic()
    rows = read_heldout(heldout_file)[:limit]
    tokenizer = load_tokenizer(tokenizer_dir)
    eos_ids = {tokenizer.convert_tokens_to_ids(t) for t in (IM_END, ENDOFTEXT)}
    examples = eval_examples(rows)
    prompts = [tokenizer.encode(text, add_special_tokens=False) for text, _ in examples]
    length = max(len(p) for p in prompts) + max_new_tokens
    ms.set_context(mode=ms.GRAPH_MODE)
    net = QwenForCausalLM(cfg)
    load_weights(net, ckpt)
    net.set_train(False)
    decoder = GreedyDecoder(net, cfg, min(EVAL_BATCH, len(prompts)), length)
    answers = []
    for start in range(0, len(prompts), decoder.batch):
        chunk = decoder.generate(prompts[start:start + decoder.batch], max_new_tokens, eos_ids)
        answers.extend(_answer(tokenizer, ids, eos_ids) for ids in chunk)
        logger.info(f"eval: {len(answers)}/{len(prompts)} prompts")
    right = [a.strip() == ref.strip() for a, (_, ref) in zip(answers, examples)]
    by_task: dict[str, list[bool]] = {}
    for row, ok in zip(rows, right):
        by_task.setdefault(row.get("task", "all"), []).append(ok)
    result = {
        "heldout_accuracy": sum(right) / len(right),
        "heldout_correct": sum(right),
        "heldout_total": len(right),
        "heldout_by_task": {task: sum(v) / len(v) for task, v in sorted(by_task.items())},
        "eval_s": time.monotonic() - started,
    }
    if metrics_path:
        write_metrics(metrics_path, result)
    if samples_path:
        with atomic_path(samples_path) as tmp:
            tmp.write_text("".join(json.dumps({"prompt": text, "answer": a, "reference": ref, "correct": ok},
                                              ensure_ascii=False) + "\n"
                                   for (text, ref), a, ok in zip(examples, answers, right)), encoding="utf-8")
    logger.info(f"held-out: {result['heldout_correct']}/{result['heldout_total']} exactly right "
                f"({100 * result['heldout_accuracy']:.1f}%) in {result['eval_s']:.1f} s")
    return result
