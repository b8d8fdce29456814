"""Qwen1.5 weights between Hugging Face and MindSpore (MindFormers names), streamed tensor by tensor."""

from qwenbuild.weights.convert import convert_weight
from qwenbuild.weights.random_init import write_random_hf_model
from qwenbuild.weights.reverse import convert_reversed

__all__ = ["convert_weight", "convert_reversed", "write_random_hf_model"]
