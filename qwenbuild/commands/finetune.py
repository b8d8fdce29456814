"""Fine-tune Qwen1.5 on a MindRecord with the settings of a run.json, over CPU workers via msrun.

run.json holds plain settings (model dims, train_data, init_checkpoint, output_dir, seq_length, batch_size per
data-parallel rank, learning_rate, warmup_ratio, weight_decay, epochs or steps, grad_clip, seed, save_steps,
data_parallel, model_parallel, pipeline_stage, strategy_dir). msrun starts data_parallel x model_parallel
workers; with model or pipeline parallel each takes its slice from the strategy files in strategy_dir and its
shards from init_checkpoint/rank_N/. Checkpoints go to <output_dir>/checkpoint/rank_N/; a rerun resumes from the
last one the workers all saved.
"""

from qwenbuild.train.msrun import run_msrun
from qwenbuild.train.settings import read_run_json


def add_arguments(parser):
    parser.add_argument("--config", required=True, help="run.json with the training settings")
    parser.add_argument("--log_dir", default="output/msrun_log", help="msrun worker logs (default: %(default)s)")
    parser.add_argument("--master_port", type=int, default=None, help="msrun scheduler port (default: a free one)")


def main(args):
    settings = read_run_json(args.config)
    run_msrun(settings.processes, args.config, args.log_dir, args.master_port)
    return 0
