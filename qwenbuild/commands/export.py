"""Export the prefill (mindir_full_checkpoint) and decode (mindir_inc_checkpoint) MINDIR graphs, as MindFormers
r1.0 does: inputs (input_ids, batch_valid_length, batch_index, zactivate_len), the KV cache kept inside the graph.

Writes OUTPUT_DIR/mindir_{full,inc}_checkpoint/rank_N_graph.mindir (+ rank_N_variables/ for external weights)
and rank_N_graph.json describing inputs, outputs, the cache, batch_size, seq_length, vocabulary and eos ids. The
model dimensions come from the Hugging Face config.json in --torch_ckpt_dir. With --model_parallel N the
checkpoint is a directory of shards (rank_K/<name>.ckpt, cut by the strategy files in --strategy_dir: dp 1, mp N,
pp 1) and N processes under msrun write each rank's tensor-parallel graphs, all-reduces inside."""

from __future__ import annotations

import dataclasses
import json
import os

from qwenbuild.dtypes import USER
from qwenbuild.export import export_mindir
from qwenbuild.model.config import QwenConfig


def add_arguments(parser):
    parser.add_argument("--load_checkpoint", "--mindspore_ckpt_path", dest="load_checkpoint", required=True,
                        metavar="CKPT", help="MindSpore checkpoint (complete), or with --model_parallel the "
                                             "directory of shards")
    parser.add_argument("--torch_ckpt_dir", required=True, metavar="DIR",
                        help="directory with the model's config.json (the Hugging Face model it came from)")
    parser.add_argument("--output_dir", default="output", metavar="DIR", help="export root (default: output)")
    parser.add_argument("--seq_length", type=int, required=True, help="sequence length of the graphs")
    parser.add_argument("--batch_size", type=int, default=1, help="batch size of the graphs (default 1)")
    parser.add_argument("--rank", type=int, default=int(os.environ.get("RANK_ID", 0)),
                        help="rank number in the file names (default: $RANK_ID or 0)")
    parser.add_argument("--tokenizer_dir", default=None, metavar="DIR",
                        help="tokenizer whose eos/pad ids the sidecar records (default: the Qwen1.5 ids)")
    parser.add_argument("--external_weights", action="store_true",
                        help="always write weights to rank_N_variables/ (MindSpore does so above 1 GiB)")
    parser.add_argument("--model_parallel", type=int, default=1,
                        help="tensor-parallel ranks of the export (default 1: the whole model in rank --rank)")
    parser.add_argument("--strategy_dir", default=None, metavar="DIR",
                        help="with --model_parallel > 1: the strategy files the shards were cut with")
    parser.add_argument("--dtype", choices=sorted(USER), default=None,
                        help="dtype of the weights in the graphs (default: config.json's torch_dtype); the graphs "
                             "compute in float32 and cast each weight on use")


def main(args):
    cfg = QwenConfig.from_hf_dir(args.torch_ckpt_dir)
    if args.dtype:
        cfg = dataclasses.replace(cfg, param_dtype=USER[args.dtype])
    summary = export_mindir(cfg, args.load_checkpoint, args.output_dir, rank=args.rank,
                            batch_size=args.batch_size, seq_length=args.seq_length,
                            tokenizer_dir=args.tokenizer_dir, external_weights=args.external_weights,
                            model_parallel=args.model_parallel, strategy_dir=args.strategy_dir,
                            inputs=[args.torch_ckpt_dir])
    print(json.dumps(summary, indent=1))
