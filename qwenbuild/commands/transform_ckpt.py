"""Reshard a MindSpore checkpoint from one strategy to another (the flags of MindFormers' transform_ckpt.py).

A strategy is a file, a directory of per-rank strategy files (merged across pipeline stages), or '' for complete
weights. The source is DIR/rank_N/<one>.ckpt, or a single complete .ckpt file. Output: DST/rank_N/<prefix>N.ckpt,
one rank at a time, each rank directory appearing only when complete. Merging shards back into one checkpoint is the
same command with --dst_ckpt_strategy ''."""

from __future__ import annotations

from qwenbuild.parallel.reshard import transform_ckpt


def add_arguments(parser):
    parser.add_argument("--src_ckpt_strategy", default="", help="strategy of the source ('' = complete weights)")
    parser.add_argument("--dst_ckpt_strategy", default="", help="strategy to reshard to ('' = complete weights)")
    parser.add_argument("--src_ckpt_dir", required=True, help="source: DIR/rank_N/<one>.ckpt, or a .ckpt file")
    parser.add_argument("--dst_ckpt_dir", required=True, help="destination directory")
    parser.add_argument("--prefix", default="checkpoint_", help="output file name prefix (default checkpoint_)")


def main(args):
    result = transform_ckpt(args.src_ckpt_strategy, args.dst_ckpt_strategy, args.src_ckpt_dir, args.dst_ckpt_dir,
                            prefix=args.prefix)
    print(args.dst_ckpt_dir if result["ranks"] else "")
