"""Text generation with the exported prefill/decode graphs, through MindSpore (GraphCell) or MindSpore Lite."""

from qwenbuild.infer.runtime import GenerationResult, generate, generate_ids, open_export

__all__ = ["GenerationResult", "generate", "generate_ids", "open_export"]
