"""Write vocab.json, merges.txt and tokenizer_config.json of a Qwen1.5 tokenizer.

By default the real Qwen1.5 tokenizer (151,643 tokens + 3 special) is rebuilt offline from the vendored
qwen.tiktoken ranks. With --train_from and --vocab_size, a small byte-level BPE tokenizer in the same format is
trained instead, on the ChatML text of alpaca or ChatML rows (.json/.jsonl files, arrays or JSON Lines);
files with other suffixes are read as plain text.
"""

from __future__ import annotations

from qwenbuild.data.corpus import corpus_texts
from qwenbuild.errors import UserError
from qwenbuild.store import output_path
from qwenbuild.tokenizer import build_qwen_tokenizer, train_tokenizer


def add_arguments(parser) -> None:
    parser.add_argument("--output_dir", required=True, help="directory to write the three tokenizer files into")
    parser.add_argument("--tiktoken_file", default=None,
                        help="ranks file to rebuild from (default: the vendored qwen.tiktoken)")
    parser.add_argument("--train_from", nargs="+", default=None, metavar="FILE",
                        help="train a small tokenizer on these alpaca/ChatML files instead")
    parser.add_argument("--vocab_size", type=int, default=None,
                        help="size of the trained tokenizer, the 3 special tokens included")


def _output_dir(args) -> None:
    """Refused before the work: the output directory replaces a whole path, never one with an input in it."""
    output_path(args.output_dir, directory=True, inputs=[*(args.train_from or []), args.tiktoken_file])


def main(args) -> int:
    if args.train_from:
        if args.vocab_size is None:
            raise UserError("--train_from needs --vocab_size", hint="e.g. --vocab_size 640")
        _output_dir(args)
        train_tokenizer(corpus_texts(args.train_from), args.vocab_size, args.output_dir)
        return 0
    if args.vocab_size is not None:
        raise UserError("--vocab_size only applies with --train_from",
                        hint="the real Qwen1.5 tokenizer always has 151,646 tokens")
    _output_dir(args)
    build_qwen_tokenizer(args.output_dir, args.tiktoken_file)
    return 0
