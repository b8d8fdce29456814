"""The `qwenbuild` command: one table maps subcommand names to command modules, imported only when run."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from qwenbuild import __version__
from qwenbuild.errors import UserError, os_error_text
from qwenbuild.processes import interrupted_line, interruption, stop_on_signals

# name -> (module, one-line help); modules define add_arguments(parser) and main(args) -> int | None
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("qwenbuild.commands.init", "write a commented qwen.toml from a preset"),
    "validate": ("qwenbuild.commands.validate", "check qwen.toml against the schema and the parallel plan"),
    "plan": ("qwenbuild.commands.plan", "show where each rank runs, memory per device and which tasks are out of date"),
    "set": ("qwenbuild.commands.set_", "edit keys of qwen.toml in place, keeping comments"),
    "hccl_tools": ("qwenbuild.commands.hccl_tools", "write this node's RANK_TABLE_FILE (hccl_tools format)"),
    "merge_hccl": ("qwenbuild.commands.merge_hccl", "merge per-node rank tables into one RANK_TABLE_FILE"),
    "strategy": ("qwenbuild.commands.strategy", "write one strategy file per rank for a parallel plan"),
    "transform_ckpt": ("qwenbuild.commands.transform_ckpt", "reshard a checkpoint between strategies, rank by rank"),
    "verify": ("qwenbuild.commands.verify", "rebuild into a fresh dir and compare every artifact with qwen.lock"),
    "tokenizer": ("qwenbuild.commands.tokenizer", "write the Qwen1.5 tokenizer files (or train a small one)"),
    "alpaca_converter": ("qwenbuild.commands.alpaca_converter", "convert alpaca rows to ChatML JSON Lines"),
    "preprocess": ("qwenbuild.commands.preprocess", "tokenize ChatML conversations into a MindRecord"),
    "qwen1_5_preprocess": ("qwenbuild.commands.preprocess", "same as preprocess (the original script's name)"),
    "instructions": ("qwenbuild.commands.instructions", "write the project's own instruction dataset"),
    "convert_weight": ("qwenbuild.commands.convert_weight", "convert a Hugging Face Qwen1.5 checkpoint to MindSpore"),
    "convert_reversed": ("qwenbuild.commands.convert_reversed", "convert a MindSpore Qwen1.5 checkpoint to Hugging Face"),
    "export": ("qwenbuild.commands.export", "write the prefill and decode MINDIR graphs of one rank"),
    "infer": ("qwenbuild.commands.infer", "generate text with the exported MINDIR graphs"),
    "run_qwen1_5_mslite_infer": ("qwenbuild.commands.infer", "same as infer (the original script's name)"),
    "finetune": ("qwenbuild.commands.finetune", "train on a MindRecord from run.json, data-parallel through msrun"),
    "eval_heldout": ("qwenbuild.commands.eval_heldout", "exact-match accuracy of greedy answers on held-out rows"),
}

DESCRIPTION = """\
qwenbuild builds everything Qwen1.5 fine-tuning and deployment on MindSpore needs from one qwen.toml.
Build with doit (`doit finetune`, `doit export`, `doit list`); the subcommands below run single steps by hand,
with the flags of the original MindFormers scripts."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenbuild", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"qwenbuild {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def _command_parser(name: str):
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"qwenbuild {name}", description=getattr(module, "__doc__", None) or help_,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    return module, parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        parser = build_parser()
        if not argv:
            parser.print_help()
            return 0
        parser.parse_args(argv)  # prints --help/--version, or an error naming the unknown command
        return 2
    name = f"qwenbuild {argv[0]}"
    stop_on_signals(name)
    try:
        module, parser = _command_parser(argv[0])
        rc = module.main(parser.parse_args(argv[1:]))
    except BaseException as exc:
        return _reported(name, exc)
    return int(rc or 0)


def _reported(name: str, exc: BaseException) -> int:
    """The exit code of a command that raised `exc`, after one line on stderr; unexpected errors go on up."""
    stop = interruption(exc)
    if stop is not None:  # after SIGINT or SIGTERM, an error of the unwinding is the interruption too
        print(interrupted_line(name), file=sys.stderr)
        return stop.exit_code
    if isinstance(exc, UserError):
        print(f"{name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if isinstance(exc, BrokenPipeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    # a path the command could not read or write; QWENBUILD_DEBUG=1 keeps the traceback for bug reports
    if isinstance(exc, OSError) and not os.environ.get("QWENBUILD_DEBUG"):
        print(f"{name}: error: {os_error_text(exc)}", file=sys.stderr)
        return 1
    raise exc


if __name__ == "__main__":
    sys.exit(main())
