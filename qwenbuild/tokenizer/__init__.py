"""Qwen1.5 tokenizer files: the real one rebuilt offline, a small one trained on the project's data, and loaders."""

from qwenbuild.tokenizer.files import ENDOFTEXT, IM_END, IM_START, SPECIAL_TOKENS, special_ids
from qwenbuild.tokenizer.load import bpe_pipeline, load_tokenizer, pad_id, stop_ids
from qwenbuild.tokenizer.qwen import build_qwen_tokenizer
from qwenbuild.tokenizer.train import train_tokenizer

__all__ = ["ENDOFTEXT", "IM_END", "IM_START", "SPECIAL_TOKENS", "bpe_pipeline", "build_qwen_tokenizer",
           "load_tokenizer", "pad_id", "special_ids", "stop_ids", "train_tokenizer"]
