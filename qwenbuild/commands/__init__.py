"""One module per `qwenbuild` subcommand: a docstring, add_arguments(parser) and main(args)."""

from __future__ import annotations

import argparse


def add_manifest_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default="qwen.toml", metavar="PATH",
                        help="the manifest (default: ./qwen.toml)")
