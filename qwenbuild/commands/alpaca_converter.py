"""Convert alpaca rows (instruction, input, output) into ChatML conversations, one JSON object per line.

Same text as MindFormers' alpaca_converter.py: system prompt "You are a helpful assistant."; with a non-empty
input, one trailing "." is dropped from the instruction and the user turn is "instruction: input". Accepts a JSON
array or JSON Lines, writes UTF-8 without escapes, and names every bad row (missing or non-string fields, empty
instruction, invalid UTF-8). Bad rows stop the run unless --skip_bad_rows; the output is never left half-written.
"""

from __future__ import annotations

from qwenbuild.data.alpaca import convert_alpaca


def add_arguments(parser) -> None:
    parser.add_argument("--data_path", default="alpaca-data.json", help="alpaca JSON array or JSON Lines file")
    parser.add_argument("--output_path", default="alpaca-data-conversation.json",
                        help="ChatML JSON Lines file to write")
    parser.add_argument("--skip_bad_rows", action="store_true", help="convert the good rows and report the bad")


def main(args) -> int:
    convert_alpaca(args.data_path, args.output_path, skip_bad_rows=args.skip_bad_rows)
    return 0
