"""Edit keys of qwen.toml in place, keeping comments and formatting.

  qwenbuild set train.learning_rate=1e-4 parallel.data_parallel=2
  qwenbuild set 'hardware.nodes[1].ip=10.0.0.2'
  qwenbuild set 'hardware.nodes[+].host=node4' 'hardware.nodes[-1].ip=10.0.0.5'   (append a node)
  qwenbuild set --remove 'hardware.nodes[3]'                                       (remove one)

Values are TOML (numbers, true/false, "strings", [arrays]); a bare word is taken as a string. The edited manifest
is validated first: a value the schema or the plan rejects leaves the file untouched. Setting model.hf_dir to a
checkpoint directory switches the manifest to that checkpoint's dimensions; one not downloaded yet is accepted with
a warning (the preset plans the cluster meanwhile; validate and the weight tasks refuse it until it is there).
The edit goes to the file the user has: through a symbolic link, to every hard link, with its mode, line endings
and byte-order mark."""

from __future__ import annotations

import sys
from pathlib import Path

from qwenbuild.commands import add_manifest_argument
from qwenbuild.errors import UserError
from qwenbuild.manifest.edit import set_keys


def add_arguments(parser):
    add_manifest_argument(parser)
    parser.add_argument("assignments", nargs="*", metavar="KEY=VALUE",
                        help="key path (hardware.nodes[1].ip; [+] appends) and TOML value")
    parser.add_argument("--remove", action="append", default=[], metavar="KEY",
                        help="delete a key or an entry (hardware.nodes[2]); may be repeated")


def main(args):
    if not args.assignments and not args.remove:
        raise UserError("KEY=VALUE assignments or --remove KEY are required",
                        hint="e.g. qwenbuild set train.learning_rate=1e-4")
    changes = []
    for item in args.assignments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{item!r} is not KEY=VALUE", hint="e.g. qwenbuild set train.learning_rate=1e-4")
        changes.append((key.strip(), value.strip()))
    for line in set_keys(Path(args.config), changes, args.remove):
        print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout)
