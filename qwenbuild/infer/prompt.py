"""From the user's text to prompt ids: ChatML with the default system turn (or the raw text), and the stop ids."""

from __future__ import annotations

from qwenbuild.data import chatml
from qwenbuild.errors import UserError
from qwenbuild.tokenizer.files import ENDOFTEXT, IM_END


def chat_text(prompt: str, system: str = chatml.SYSTEM_PROMPT) -> str:
    """A one-turn ChatML conversation ending with the assistant's generation prompt."""
    return chatml.prompt([{"role": "system", "content": system}, {"role": "user", "content": prompt}])


def encode(tokenizer, prompt: str, raw: bool = False) -> list[int]:
    if not prompt:
        raise UserError("--predict_data is empty", hint="give the text to continue or the question to answer")
    text = prompt if raw else chat_text(prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_ids(tokenizer) -> list[int]:
    """Ids of <|im_end|> (end of a chat reply) and <|endoftext|> (end of a document), as this tokenizer has them."""
    vocab = tokenizer.get_vocab()
    missing = [tok for tok in (IM_END, ENDOFTEXT) if tok not in vocab]
    if missing:
        raise UserError(f"the tokenizer has no {', '.join(missing)} token",
                        hint="use a Qwen1.5 tokenizer directory (vocab.json, merges.txt, tokenizer_config.json)")
    return [vocab[IM_END], vocab[ENDOFTEXT]]


def pad_id(tokenizer) -> int:
    return tokenizer.get_vocab()[ENDOFTEXT]
