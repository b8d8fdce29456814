"""Write the project's own instruction dataset: train.json and heldout.json in alpaca format.

Small English and Chinese tasks with short exact answers (copy, reverse, uppercase, next letter or number, small
addition, unit conversion, digits in Chinese), generated deterministically from --seed. Held-out prompts never
occur in the training file.
"""

from __future__ import annotations

from qwenbuild.data.instructions import write_instruction_dataset
from qwenbuild.errors import UserError

MAX_ROWS = 10_000_000  # the rows are built in memory; a larger set belongs in an alpaca file


def add_arguments(parser) -> None:
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train", type=int, default=4000)
    parser.add_argument("--num_heldout", type=int, default=400)


def main(args) -> int:
    for flag, value, least in (("--num_train", args.num_train, 1), ("--num_heldout", args.num_heldout, 0),
                               ("--seed", args.seed, 0)):
        if value < least or flag != "--seed" and value > MAX_ROWS:
            bound = f"at least {least}" if flag == "--seed" else f"between {least} and {MAX_ROWS:,}"
            raise UserError(f"{flag} must be {bound}, not {value:,}")

    write_instruction_dataset(args.output_dir, args.seed, args.num_train, args.num_heldout)
    return 0
