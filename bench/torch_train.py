"""The torch side of the training benchmarks: transformers' Qwen2 trained as qwenbuild trains, step by step."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def load_qwen2(hf_dir: Path, settings):
    """transformers' Qwen2 of the benchmark's checkpoint, float32 and eager attention, on settings.threads threads."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    return Qwen2ForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager")


def torch_steps(model, groups: list[dict], settings, rows_by_epoch, lrs):
    """AdamW on the parameter `groups` (the benchmark's betas, eps and clipping, lr per step from `lrs`), one
    (loss, seconds) per step over the benchmark's rows; a step is timed from the batch to the loss read back."""
    import torch

    from qwenbuild.train import data

    model.train()
    opt = torch.optim.AdamW(groups, lr=lrs[0], betas=(settings.beta1, settings.beta2), eps=settings.eps)
    trained = [p for group in groups for p in group["params"]]
    for step, (input_ids, target_ids) in enumerate(data.batches(settings.train_data, rows_by_epoch,
                                                                settings.batch_size)):
        t0 = time.perf_counter()
        tokens = torch.from_numpy(input_ids[:, :-1].astype(np.int64))
        labels = torch.from_numpy(target_ids[:, 1:].astype(np.int64))
        logits = model(input_ids=tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, settings.grad_clip)
        for group in opt.param_groups:
            group["lr"] = lrs[step]
        opt.step()
        yield float(loss.detach()), time.perf_counter() - t0
