"""The Qwen1.5 model: its dimensions, its parameter names (MindFormers' LlamaForCausalLM) and its network."""

from qwenbuild.model.config import QwenConfig
from qwenbuild.model.params import hf_to_ms, ms_to_hf, num_parameters, parameter_shapes

__all__ = ["QwenConfig", "hf_to_ms", "ms_to_hf", "num_parameters", "parameter_shapes"]
