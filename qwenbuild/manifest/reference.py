"""The qwen.toml reference section of README.md, rendered from the schema so the two cannot drift apart."""

from __future__ import annotations

import json

from qwenbuild.schema import allowed, schema

BEGIN = "<!-- qwen.toml reference: generated from schemas/qwen.schema.json by `python -m qwenbuild.manifest.reference` -->"
END = "<!-- end of qwen.toml reference -->"


def _default(node: dict) -> str:
    if "default" not in node or node.get("type") == "object":
        return ""
    return json.dumps(node["default"], ensure_ascii=False)


def _rows(prefix: str, node: dict, required: set[str]) -> list[str]:
    rows = []
    for key, sub in node.get("properties", {}).items():
        path = f"{prefix}.{key}"
        if sub.get("type") == "array" and isinstance(sub.get("items"), dict) and sub["items"].get("properties"):
            rows.append(f"| `{path}` | array of tables | | {sub.get('description', '')} |")
            rows += _rows(f"{path}[]", sub["items"], set(sub["items"].get("required", [])))
            continue
        if sub.get("type") == "object" and sub.get("properties"):
            rows.append(f"| `{path}` | table | | {sub.get('description', '')} |")
            rows += _rows(path, sub, set(sub.get("required", [])))
            continue
        if sub.get("type") == "object" and not sub.get("properties"):
            kind = "table of ini keys"
        elif sub.get("type") == "array":
            items = sub["items"]
            kind = f"array of {allowed(items) if 'enum' in items else items.get('type', 'values')}"
        else:
            kind = allowed(sub)
        need = " (required)" if key in required else ""
        rows.append(f"| `{path}`{need} | {kind} | {_default(sub)} | {sub.get('description', '')} |")
    return rows


def reference_section() -> str:
    s = schema()
    out = [BEGIN, ""]
    for name, sec in s["properties"].items():
        need = " (required)" if name in s.get("required", []) else ""
        out += [f"#### `[{name}]`{need}", "", sec.get("description", ""), "",
                "| key | allowed | default | meaning |", "| --- | --- | --- | --- |"]
        out += _rows(name, sec, set(sec.get("required", [])))
        out.append("")
    out.append(END)
    return "\n".join(out)


def update_readme(path) -> bool:
    """Rewrite the generated section of README.md; True when it changed."""
    text = path.read_text(encoding="utf-8")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + reference_section() + text[end:]
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    from pathlib import Path

    readme = Path(__file__).resolve().parents[2] / "README.md"
    print(f"{readme}: {'updated' if update_readme(readme) else 'already current'}")
