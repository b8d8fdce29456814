"""ChatML conversations: the system prompt of the alpaca converter and the rendering Qwen1.5 preprocessing uses."""

from __future__ import annotations

from qwenbuild.tokenizer.files import IM_END, IM_START

SYSTEM_PROMPT = "You are a helpful assistant."


def conversation(user: str, assistant: str) -> dict:
    """One converted alpaca row: the record the original alpaca_converter writes."""
    return {"type": "chatml", "messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant},
    ]}


def render_message(role: str, content: str) -> str:
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def render(messages: list[dict]) -> str:
    """The text apply_chat_template makes with plain ChatML and no generation prompt."""
    return "".join(render_message(m["role"], m["content"]) for m in messages)


def prompt(messages: list[dict]) -> str:
    """The text a model continues at inference: the conversation so far plus the assistant header."""
    return render(messages) + f"{IM_START}assistant\n"


def message_problem(messages) -> str | None:
    """Why a "messages" value cannot be rendered, or None when it can."""
    if not isinstance(messages, list) or not messages:
        return f'"messages" must be a non-empty list, found {_kind(messages)}'
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}] must be an object with role and content, found {_kind(m)}"
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                found = "nothing" if key not in m else _kind(m[key])
                return f'messages[{i}]["{key}"] must be a string, found {found}'
        if not m["role"]:
            return f'messages[{i}]["role"] is empty'
    return None


def _kind(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
