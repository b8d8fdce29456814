"""The `qwenbuild` command: one table maps subcommand names to command modules, imported only when run."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

from qwenbuild import __version__
from qwenbuild.errors import UserError, os_error_text
from qwenbuild.logs import ENV, configure
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

# -v / -q, before the command or among its flags: the level of the lines on stderr (the command's result on stdout
# is never affected)
_LEVEL_FLAGS = {"-v": "debug", "--verbose": "debug", "-q": "warning", "--quiet": "warning"}


def add_level_flags(parser) -> None:
    group = parser.add_argument_group("output").add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="debug",
                       help="also show debug lines on stderr")
    group.add_argument("-q", "--quiet", dest="log_level", action="store_const", const="warning",
                       help="show only warnings and errors on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenbuild", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"qwenbuild {__version__}")
    add_level_flags(parser)
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
    add_level_flags(parser)
    return module, parser


@contextlib.contextmanager
def logging_at(level: str | None):
    """Lines on stderr at `level` (default: $QWENBUILD_LOG, else info), also in the processes the command starts."""
    chosen = configure(level)
    before = os.environ.get(ENV)
    os.environ[ENV] = chosen
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    leading = None
    while argv and argv[0] in _LEVEL_FLAGS:
        leading, argv = _LEVEL_FLAGS[argv[0]], argv[1:]
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
        args = parser.parse_args(argv[1:])
        with logging_at(args.log_level or leading):
            rc = module.main(args)
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
