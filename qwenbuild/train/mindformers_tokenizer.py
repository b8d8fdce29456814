"""The `Qwen2Tokenizer` the MindFormers YAML names (processor.tokenizer.type), registered with MindFormers' registry.

MindFormers 1.9 ships no Qwen2Tokenizer (the original's research/qwen1_5/qwen1_5_tokenizer.py registered one). This
one is qwenbuild's byte-level BPE pipeline on vocab.json and merges.txt (NFC, Qwen's split regex, the special tokens
after the regular ones) inside MindFormers' own PreTrainedTokenizerFast, so `build_tokenizer`, the Trainer and the
text-generation pipeline use it as they use MindFormers' own tokenizers.
"""

from __future__ import annotations

from qwenbuild.tokenizer.files import ENDOFTEXT, IM_END, IM_START, MERGES_FILE, MODEL_MAX_LENGTH, VOCAB_FILE
from qwenbuild.tokenizer.load import bpe_pipeline

NAME = "Qwen2Tokenizer"
_registered = []


def register_qwen2_tokenizer():
    """Register Qwen2Tokenizer with MindFormers (once per process) and return the class."""
    if _registered:
        return _registered[0]
    # mindformers loads in seconds: imported only when a MindFormers run needs the tokenizer
    from mindformers.models.tokenization_utils_fast import PreTrainedTokenizerFast
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

    class Qwen2Tokenizer(PreTrainedTokenizerFast):
        """Qwen1.5's tokenizer from vocab.json and merges.txt; <|endoftext|> is eos, pad and unk, no BOS."""

        vocab_files_names = {"vocab_file": VOCAB_FILE, "merges_file": MERGES_FILE}
        model_input_names = ["input_ids", "attention_mask"]

        def __init__(self, vocab_file, merges_file, unk_token=ENDOFTEXT, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT,
                     bos_token=None, model_max_length=MODEL_MAX_LENGTH, **kwargs):
            backend, _ = bpe_pipeline(vocab_file, merges_file)
            kwargs.setdefault("additional_special_tokens", [IM_START, IM_END])
            super().__init__(tokenizer_object=backend, vocab_file=vocab_file, merges_file=merges_file,
                             unk_token=unk_token, eos_token=eos_token, pad_token=pad_token, bos_token=bos_token,
                             model_max_length=model_max_length, **kwargs)

    Qwen2Tokenizer.__name__ = Qwen2Tokenizer.__qualname__ = NAME
    MindFormerRegister.register(MindFormerModuleType.TOKENIZER)(Qwen2Tokenizer)
    _registered.append(Qwen2Tokenizer)
    return Qwen2Tokenizer
