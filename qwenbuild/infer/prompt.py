"""From the user's text to prompt ids: ChatML with the default system turn, or the raw text."""

from __future__ import annotations

from qwenbuild.data import chatml
from qwenbuild.errors import UserError

# the prompt of the original README's inference examples
SEED_PROMPT = "帮助我制定一份去上海的旅游攻略"


def chat_text(prompt: str, system: str = chatml.SYSTEM_PROMPT) -> str:
    """A one-turn ChatML conversation ending with the assistant's generation prompt."""
    return chatml.prompt([{"role": "system", "content": system}, {"role": "user", "content": prompt}])


def encode(tokenizer, prompt: str, raw: bool = False) -> list[int]:
    if not prompt:
        raise UserError("--predict_data is empty", hint="give the text to continue or the question to answer")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # bytes from the command line or a file that are not UTF-8 text
        raise UserError(f"the prompt {prompt[:40]!r} is not UTF-8 text (character {exc.start + 1})",
                        hint="pass the prompt as UTF-8 (check the terminal's or the file's encoding)") from None
    text = prompt if raw else chat_text(prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
