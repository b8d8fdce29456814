"""README.md tells the truth: its qwen.toml reference matches the schema, and CI runs its commands."""

from __future__ import annotations

import re
from pathlib import Path

from qwenbuild.manifest.reference import BEGIN, END, reference_section

REPO = Path(__file__).resolve().parents[1]


def readme() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def test_reference_section_is_generated_from_the_schema():
    text = readme()
    section = text[text.index(BEGIN):text.index(END) + len(END)]
    assert section == reference_section(), "run `python -m qwenbuild.manifest.reference` to refresh README.md"


def test_every_schema_key_is_documented():
    from qwenbuild.schema import schema

    text = readme()
    for name, sec in schema()["properties"].items():
        for key in sec.get("properties", {}):
            assert f"`{name}.{key}`" in text


def fresh_machine_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", readme(), flags=re.S)
    return [blocks[0].strip(), blocks[1].strip()]


def test_readme_starts_with_the_two_fresh_machine_commands():
    build, tests = fresh_machine_commands()
    assert build.startswith("python3 -m venv .venv") and "doit finetune" in build
    assert tests.startswith("python3 -m venv .venv") and ".venv/bin/pytest" in tests


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    _, tests = fresh_machine_commands()
    assert tests in ci.splitlines()
