"""Convert a Hugging Face Qwen1.5 checkpoint directory to one MindSpore checkpoint with MindFormers names.

Reads model.safetensors (single or sharded with model.safetensors.index.json) or pytorch_model*.bin (never
executing pickled code), checks every tensor against config.json, and streams tensor by tensor, so memory stays
small whatever the model size. Tensors keep their dtype unless --dtype is given. Nothing is written on any error.
"""

from qwenbuild.dtypes import SHORT
from qwenbuild.weights.convert import convert_weight


def add_arguments(parser):
    parser.add_argument("--torch_ckpt_dir", required=True, help="Hugging Face model directory (with config.json)")
    parser.add_argument("--mindspore_ckpt_path", default="transform.ckpt", help="output .ckpt (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(SHORT.values()), default=None,
                        help="cast every tensor to this dtype (default: keep the source dtype)")


def main(args):
    convert_weight(args.torch_ckpt_dir, args.mindspore_ckpt_path, args.dtype)
    return 0
