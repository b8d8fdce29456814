"""Merge per-node rank tables into one RANK_TABLE_FILE; rank ids follow the order the files are given in.

Copy the merged file to every node."""

from __future__ import annotations

import logging

from qwenbuild.parallel import rank_table as rt

logger = logging.getLogger(__name__)


def add_arguments(parser):
    parser.add_argument("files", nargs="+", metavar="FILE", help="per-node hccl_*.json files, in node order")
    parser.add_argument("--output", default="", metavar="PATH", help="where to write (default: ./hccl_<k>s_<n>p.json)")


def main(args):
    merged = rt.merge_rank_tables([rt.read_rank_table(f) for f in args.files], args.files)
    path = rt.write_rank_table(merged, args.output or rt.merged_file_name(merged), inputs=args.files)
    ranks = sum(len(s["device"]) for s in merged["server_list"])
    logger.info(f"wrote {path}: {merged['server_count']} servers, {ranks} ranks")
    print(path)
