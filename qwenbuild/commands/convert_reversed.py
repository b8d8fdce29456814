"""Convert a MindSpore Qwen1.5 checkpoint (MindFormers names) back to a Hugging Face model directory.

Writes safetensors (sharded with model.safetensors.index.json above 5 GB) and a Qwen1.5 config.json that
transformers' Qwen2ForCausalLM.from_pretrained loads; a --torch_ckpt_path ending in .bin gets one torch state dict
instead, as the original script writes. Optimizer state (adam_m/adam_v, global_step, ...) is dropped.
Without --config the dimensions come from the config.json stored in the checkpoint (convert_weight and finetune
store it), else from the tensor shapes (published Qwen1.5 sizes only).
"""

from qwenbuild.weights.reverse import convert_reversed


def add_arguments(parser):
    parser.add_argument("--mindspore_ckpt_path", required=True, help="MindSpore .ckpt to convert")
    parser.add_argument("--torch_ckpt_path", required=True,
                        help="output Hugging Face model directory, or a .bin file for one torch state dict")
    parser.add_argument("--config", default=None,
                        help="config.json (or a directory holding it) describing the model; default: infer it")


def main(args):
    convert_reversed(args.mindspore_ckpt_path, args.torch_ckpt_path, args.config)
    return 0
