"""Score a checkpoint on held-out alpaca rows: greedy answers to the ChatML prompts, exact match with the output.

Writes heldout_accuracy (and per-task figures) into --metrics when given.
"""

from pathlib import Path

from qwenbuild.jsonfile import read_json
from qwenbuild.model.config import QwenConfig
from qwenbuild.store import output_path
from qwenbuild.train.evaluate import evaluate_heldout
from qwenbuild.train.progress import read_metrics
from qwenbuild.train.settings import read_run_json


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True, help="MindSpore .ckpt (a training checkpoint is fine)")
    parser.add_argument("--config", required=True, help="run.json (its model dims) or a Hugging Face config.json")
    parser.add_argument("--tokenizer_dir", required=True, help="directory with vocab.json and merges.txt")
    parser.add_argument("--heldout", required=True, help="held-out alpaca JSON array")
    parser.add_argument("--metrics", default=None, help="metrics.json to merge the results into")
    parser.add_argument("--max_new_tokens", type=int, default=32)


def main(args):
    if args.metrics:  # merged into, so it may exist (a JSON object); never one of the inputs
        output_path(args.metrics, inputs=[args.checkpoint, args.config, args.tokenizer_dir, args.heldout])
        read_metrics(args.metrics)
    path = Path(args.config)
    doc = read_json(path, "--config", hint="run.json of a build, or a Hugging Face config.json")
    is_hf = isinstance(doc, dict) and "model_type" in doc
    cfg = QwenConfig.from_hf_dir(path.parent) if is_hf else read_run_json(path).model
    evaluate_heldout(args.checkpoint, cfg, args.tokenizer_dir, args.heldout, args.metrics, args.max_new_tokens)
    return 0
