"""Write the project's own instruction dataset: train.json and heldout.json in alpaca format.

Small English and Chinese tasks with short exact answers (copy, reverse, uppercase, next letter or number, small
addition, unit conversion, digits in Chinese), generated deterministically from --seed. Held-out prompts never
occur in the training file.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train", type=int, default=4000)
    parser.add_argument("--num_heldout", type=int, default=400)


def main(args) -> int:
    from qwenbuild.data.instructions import write_instruction_dataset

    write_instruction_dataset(args.output_dir, args.seed, args.num_train, args.num_heldout)
    return 0
