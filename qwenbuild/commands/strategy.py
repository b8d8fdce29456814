"""Write one strategy file per rank (output_dir/ckpt_strategy_rank_N.json) for a Qwen1.5 model and a parallel plan.

The layouts follow MindFormers' sharding of LlamaForCausalLM: q/k/v, w1, w3 and their biases split on the output
dimension by model_parallel, wo and w2 on the input dimension, embedding and lm_head on the vocabulary unless
--vocab_emb_dp, norms whole; layers go to pipeline stages by MindFormers' rule (num_layers // pipeline_stage each,
plus --offset). With -c qwen.toml the model and the plan come from the manifest (the files the `strategy` task
builds); with --model_dir from that config.json and the flags. Strategy files compiled on Ascend with
only_save_strategy are checked with --check DIR instead."""

from __future__ import annotations

import json
from pathlib import Path

from qwenbuild.errors import UserError
from qwenbuild.manifest import load_manifest
from qwenbuild.model.config import QwenConfig
from qwenbuild.parallel import strategy as st
from qwenbuild.store import output_path


def add_arguments(parser):
    parser.add_argument("-c", "--config", default=None, metavar="PATH",
                        help="take the model and the parallel plan from this qwen.toml (default when --model_dir is "
                             "not given: ./qwen.toml)")
    parser.add_argument("--model_dir", help="Hugging Face model directory whose config.json gives the dimensions")
    parser.add_argument("--data_parallel", type=int, default=1)
    parser.add_argument("--model_parallel", type=int, default=1)
    parser.add_argument("--pipeline_stage", type=int, default=1)
    parser.add_argument("--vocab_emb_dp", action="store_true", help="keep embedding and lm_head whole on every rank")
    parser.add_argument("--offset", default="0", help="extra layers per stage, e.g. [0,1,1,0] (default 0)")
    parser.add_argument("--output_dir", default="output/strategy", help="where to write (default output/strategy)")
    parser.add_argument("--check", metavar="DIR", help="check a directory of compiled strategy files and exit")
    parser.add_argument("--world_size", type=int, help="with --check: the number of ranks expected")


def main(args):
    if args.check:
        files = st.collect_strategy_files(args.check, args.world_size)
        print(f"{args.check}: {len(files)} strategy files readable by MindSpore")
        return 0
    if args.config or not args.model_dir:
        return _from_manifest(args)
    try:
        offset = json.loads(args.offset)
    except json.JSONDecodeError:
        offset = None
    if not (type(offset) is int or isinstance(offset, list) and all(type(o) is int for o in offset)):
        raise UserError(f"--offset {args.offset!r} must be an integer or a list like [0,1,1,0]")
    output_path(args.output_dir, directory=True, inputs=[args.model_dir])
    cfg = QwenConfig.from_hf_dir(args.model_dir)
    files = st.write_strategy_files(cfg, args.data_parallel, args.model_parallel, args.pipeline_stage,
                                    args.output_dir, vocab_emb_dp=args.vocab_emb_dp, offset=offset)
    print(f"wrote {len(files)} strategy files to {args.output_dir}")


def _from_manifest(args) -> int:
    if not args.config and not Path("qwen.toml").exists():
        raise UserError("no ./qwen.toml to take the model and plan from, and no --model_dir",
                        hint="pass -c PATH, or --model_dir DIR with --data_parallel/--model_parallel/--pipeline_stage")
    m = load_manifest(args.config or "qwen.toml")
    output_path(args.output_dir, directory=True, inputs=[m.path])
    par = m.parallel
    files = st.write_strategy_files(m.model.config, par.data_parallel, par.model_parallel, par.pipeline_stage,
                                    args.output_dir, vocab_emb_dp=par.vocab_emb_dp, offset=par.stage_offset)
    print(f"wrote {len(files)} strategy files to {args.output_dir} for the plan of {m.path}")
    return 0
