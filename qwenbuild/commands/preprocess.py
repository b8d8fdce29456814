"""Tokenize ChatML conversations into the MindRecord that Qwen1.5 fine-tuning reads.

Each conversation is rendered as plain ChatML (<|im_start|>role, newline, content, <|im_end|>, newline), tokenized,
cut or right-padded with <|endoftext|> to seq_length + 1 tokens, and stored as input_ids / target_ids /
attention_mask (int32). target_ids is -100 on padding, and with --mask_prompt also on everything but the assistant
replies. Without --mask_prompt the rows equal those of MindFormers' qwen1_5_preprocess.py. Special-token ids come
from the vocab file, so a small trained tokenizer works too. The output bytes (the same MindSpore's FileWriter
writes) depend only on the input: never on --processes, also with --file_partition > 1, where each batch of rows is
split over the shards in order.
"""

from __future__ import annotations

from qwenbuild.data.preprocess import preprocess


def add_arguments(parser) -> None:
    parser.add_argument("--input_glob", required=True, help="ChatML JSON Lines file (or a glob of several)")
    parser.add_argument("--vocab_file", default="./vocab.json")
    parser.add_argument("--merges_file", default="./merges.txt")
    parser.add_argument("--seq_length", type=int, default=2048, help="rows hold seq_length + 1 tokens")
    parser.add_argument("--output_file", default="./alpaca-fastchat-qwen.mindrecord")
    parser.add_argument("--file_partition", type=int, default=1, help="number of MindRecord shard files")
    parser.add_argument("--mask_prompt", action="store_true", help="train on assistant replies only")
    parser.add_argument("--processes", type=int, default=None,
                        help="processes that tokenize and encode rows besides the writing one; 0 does it all in the "
                             "writing process (default: one per CPU, or 0 for inputs under 4 MiB)")


def main(args) -> int:
    preprocess(args.input_glob, args.vocab_file, args.merges_file, args.seq_length, args.output_file,
               file_partition=args.file_partition, mask_prompt=args.mask_prompt, processes=args.processes)
    return 0
