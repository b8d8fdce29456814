"""Small MindRecord files and settings for the training tests, written with MindSpore's own FileWriter."""

from __future__ import annotations

import numpy as np

from qwenbuild.model.config import QwenConfig
from qwenbuild.train.settings import TrainSettings

VOCAB = 48
SEQ = 16
MASKED_PREFIX = 3
TINY = QwenConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, n_kv_heads=2, intermediate_size=64,
                  max_position_embeddings=64)


def progression_rows(count: int, seq_length: int = SEQ, seed: int = 0) -> np.ndarray:
    """Rows x_t = (a + b t) mod VOCAB: learnable from context, every row the same length."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, VOCAB, (count, 1))
    b = rng.integers(1, 5, (count, 1))
    return ((a + b * np.arange(seq_length + 1)) % VOCAB).astype(np.int32)


def write_mindrecord(path, rows: np.ndarray, masked_prefix: int = MASKED_PREFIX) -> str:
    from mindspore.mindrecord import FileWriter

    writer = FileWriter(str(path), shard_num=1, overwrite=True)
    writer.add_schema({c: {"type": "int32", "shape": [-1]} for c in ("input_ids", "target_ids", "attention_mask")})
    for row in rows:
        target = row.copy()
        # the same number of ignored targets in every row keeps per-rank means equal to the global mean
        target[:masked_prefix] = -100
        writer.write_raw_data([{"input_ids": row, "target_ids": target, "attention_mask": np.ones_like(row)}])
    writer.commit()
    return str(path)


def settings(train_data, output_dir, **overrides) -> TrainSettings:
    values = dict(model=TINY, train_data=str(train_data), output_dir=str(output_dir), seq_length=SEQ, batch_size=4,
                  learning_rate=5e-3, warmup_ratio=0.1, steps=30, save_steps=10, seed=7, threads=1)
    values.update(overrides)
    return TrainSettings(**values)
