"""Generate text with the exported MINDIR graphs (prefill once, then one decode call per token).

The prompt is wrapped in ChatML with the system turn "You are a helpful assistant." unless --raw is given.
Greedy by default; --do_sample draws from the distribution after repetition penalty, temperature, top_k and
top_p, with a seeded numpy generator. Generation stops at <|im_end|> or <|endoftext|> (ids taken from the
tokenizer), after --max_new_tokens, or when the exported seq_length is full.

Backends: graphcell (MindSpore nn.GraphCell on CPU) or lite (mindspore_lite on Ascend with the GE provider
and --ge_config_path lite.ini); auto picks lite when mindspore_lite imports and a lite.ini is given.
--batch_size/--seq_length, when given, must equal the export (read from rank_N_graph.json).

The flags of the original run_qwen1_5_mslite_infer.py work as written: --mindir_root_dir --seq_length --batch_size
--do_sample --vocab_file --merge_file --ge_config_path --predict_data --predict_length --device_id."""

from __future__ import annotations

import json
import os
import sys

from qwenbuild.build_dir import BuildDir
from qwenbuild.errors import UserError
from qwenbuild.flags import str2bool
from qwenbuild.infer.backends import resolve_backend
from qwenbuild.infer.runtime import generate, generate_on_ranks, join_ranks, print_progress
from qwenbuild.manifest import load_manifest
from qwenbuild.processes import follow_parent
from qwenbuild.tokenizer.load import load_tokenizer_files


def add_arguments(parser):
    parser.add_argument("-c", "--config", default=None, metavar="PATH",
                        help="take the export dir, tokenizer, batch and seq_length from this qwen.toml's build "
                             "(the default when --mindir_root_dir and --tokenizer_dir are not given: ./qwen.toml)")
    parser.add_argument("--mindir_root_dir", default=None, metavar="DIR",
                        help="export root holding mindir_full_checkpoint/ and mindir_inc_checkpoint/")
    parser.add_argument("--tokenizer_dir", default=None, metavar="DIR",
                        help="vocab.json, merges.txt and tokenizer_config.json of the model")
    parser.add_argument("--vocab_file", default=None, metavar="PATH", help="the model's vocab.json (with --merge_file, "
                                                                           "instead of --tokenizer_dir)")
    parser.add_argument("--merge_file", default=None, metavar="PATH", help="the model's merges.txt")
    parser.add_argument("--predict_data", required=True, metavar="TEXT", help="the prompt")
    parser.add_argument("--max_new_tokens", type=int, default=512, metavar="N",
                        help="stop after N new tokens (default 512; never past the exported seq_length)")
    parser.add_argument("--predict_length", type=int, default=None, metavar="N",
                        help="stop when prompt and answer reach N tokens (the original's max_length)")
    parser.add_argument("--do_sample", type=str2bool, nargs="?", const=True, default=False,
                        help="sample instead of greedy (also accepts --do_sample True/False)")
    parser.add_argument("--top_k", type=int, default=3, help="sampling: keep the k most likely tokens, 0 = all "
                                                              "(default 3, as the original script)")
    parser.add_argument("--top_p", type=float, default=0.85, help="sampling: nucleus mass, 1 = off (default 0.85)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling: divide logits by T (default 1)")
    parser.add_argument("--repetition_penalty", type=float, default=1.0,
                        help="penalise tokens already in the row, 1 = off (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    parser.add_argument("--raw", action="store_true", help="feed the text as is, without the chat template")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: prompt_ids, generated_ids, text, tokens_per_s")
    parser.add_argument("--backend", choices=("auto", "graphcell", "lite"), default="auto",
                        help="graphcell (MindSpore, CPU) or lite (mindspore_lite, Ascend); default auto")
    parser.add_argument("--ge_config_path", default=None, metavar="lite.ini", help="MindSpore Lite config file")
    parser.add_argument("--batch_size", type=int, default=None, help="must equal the export's (checked)")
    parser.add_argument("--seq_length", type=int, default=None, help="must equal the export's (checked)")
    parser.add_argument("--rank", type=int, default=int(os.environ.get("RANK_ID", 0)),
                        help="which rank's graphs to run (default: $RANK_ID or 0)")
    parser.add_argument("--device_id", type=int, default=int(os.environ.get("DEVICE_ID", 0)),
                        help="lite backend: Ascend device (default: $DEVICE_ID or 0)")


def _from_manifest(args) -> None:
    """Fill unset paths and shapes from the manifest's build, so `qwenbuild infer --predict_data ...` just works."""
    m = load_manifest(args.config or "qwen.toml")
    build = BuildDir(m.build_dir)
    args.mindir_root_dir = args.mindir_root_dir or str(build.export)
    args.tokenizer_dir = args.tokenizer_dir or str(build.tokenizer)
    args.batch_size = args.batch_size or m.export.batch_size
    args.seq_length = args.seq_length or m.export.seq_length
    if args.ge_config_path is None and build.lite_ini.is_file():
        args.ge_config_path = str(build.lite_ini)


def main(args):
    if (args.vocab_file is None) != (args.merge_file is None):
        raise UserError("--vocab_file and --merge_file go together", hint="pass both, or --tokenizer_dir")
    files = args.vocab_file is not None
    if args.config or args.mindir_root_dir is None or (args.tokenizer_dir is None and not files):
        _from_manifest(args)
    tokenizer = load_tokenizer_files(args.vocab_file, args.merge_file) if files else args.tokenizer_dir
    if os.environ.get("MS_ROLE"):  # one rank of several under msrun (lite_infer.sh starts one per export rank)
        follow_parent()
        if resolve_backend(args.backend, args.ge_config_path) == "graphcell":
            args.rank = join_ranks()  # the graphs' all-reduces need the other ranks' processes
    # an export of several tensor-parallel ranks runs them all under msrun here, unless this is one of them
    on_ranks = not files and args.backend != "lite" and not os.environ.get("MS_ROLE")
    run = generate_on_ranks if on_ranks else generate
    result = run(args.mindir_root_dir, tokenizer, args.predict_data, max_new_tokens=args.max_new_tokens,
                 max_length=args.predict_length, do_sample=args.do_sample, top_k=args.top_k,
                 top_p=args.top_p, temperature=args.temperature, repetition_penalty=args.repetition_penalty,
                 seed=args.seed, raw=args.raw, backend=args.backend, ge_config_path=args.ge_config_path,
                 batch_size=args.batch_size, seq_length=args.seq_length, rank=args.rank,
                 device_id=args.device_id, progress=None if args.json else print_progress)
    if args.json:
        doc = result.to_json()
        doc.update(prompt_ids=doc["prompt_ids"][0], generated_ids=doc["generated_ids"][0], text=doc["text"][0])
        print(json.dumps(doc, ensure_ascii=False))
    else:
        print(result.texts[0])
    sys.stdout.flush()
