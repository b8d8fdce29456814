"""Tasks of training: the run configuration (run.json, MindFormers YAML) and finetune itself."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from qwenbuild.errors import UserError
from qwenbuild.store import write_seal
from qwenbuild.tasks._spec import Context, TaskSpec
from qwenbuild.tasks.distributed import PLAN_KEYS
from qwenbuild.tasks.weights import MODEL_KEYS

TRAIN_KEYS = ("train.learning_rate", "train.warmup_ratio", "train.weight_decay", "train.beta1", "train.beta2",
              "train.eps", "train.grad_clip", "train.epochs", "train.steps", "train.batch_size", "train.seed",
              "train.save_steps", "dataset.seq_length", "dataset.file_partition", "hardware.device",
              "parallel.micro_batch_num")


def run_settings(m, lay):
    from qwenbuild.data.mindrecord import shard_files
    from qwenbuild.train.settings import TrainSettings

    t, par = m.data["train"], m.data["parallel"]
    # MindDataset finds the other shards of a MindRecord from any one of them
    train_data = shard_files(lay.mindrecord_file, m.data["dataset"]["file_partition"])[0]
    return TrainSettings(
        model=m.model, train_data=str(train_data), output_dir=str(lay.output),
        seq_length=m.data["dataset"]["seq_length"], batch_size=t["batch_size"], learning_rate=t["learning_rate"],
        init_checkpoint=str(lay.transformed), workers=par["data_parallel"], warmup_ratio=t["warmup_ratio"],
        weight_decay=t["weight_decay"], beta1=t["beta1"], beta2=t["beta2"], eps=t["eps"], epochs=t["epochs"],
        steps=t.get("steps"), grad_clip=t["grad_clip"], seed=t["seed"], save_steps=t["save_steps"],
        model_parallel=par["model_parallel"], pipeline_stage=par["pipeline_stage"],
        device_target="Ascend" if m.data["hardware"]["device"] == "ascend" else "CPU")


def _run_config(ctx: Context) -> None:
    from qwenbuild.tokenizer import special_ids
    from qwenbuild.tokenizer.files import read_vocab
    from qwenbuild.train.settings import write_run_json
    from qwenbuild.train.mindformers_yaml import RunYaml, default_target, write_yaml

    m, lay = ctx.manifest, ctx.layout
    settings = run_settings(m, lay)
    write_run_json(lay.run_json, settings)
    ids = special_ids(read_vocab(lay.tokenizer / "vocab.json"))
    run = RunYaml(settings, micro_batch_num=m.data["parallel"]["micro_batch_num"],
                  vocab_file=str(lay.tokenizer / "vocab.json"), merges_file=str(lay.tokenizer / "merges.txt"),
                  pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"])
    target = default_target(settings)
    write_yaml(lay.mindformers_yaml, run, target)
    print(f"run_config: {lay.run_json.name} and {lay.mindformers_yaml.name} ({target}) -> {lay.root}", file=sys.stderr)


def _this_node(m) -> int:
    """Index of the node this machine is in hardware.nodes, by host name or address."""
    names = {socket.gethostname(), socket.getfqdn()}
    try:
        addresses = set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        addresses = set()
    for i, node in enumerate(m.data["hardware"]["nodes"]):
        if node["host"] in names or node["ip"] in addresses:
            return i
    raise UserError(f"this machine ({socket.gethostname()}) is none of hardware.nodes",
                    hint="run `doit finetune` on every node of the cluster, or launch build/launch/node_K.sh by hand")


def drop_damaged_checkpoints(lay) -> None:
    """Delete files of a finished run that no longer match its seal: resuming must never start from damaged bytes."""
    from qwenbuild.lock import Lock, check_artifact
    from qwenbuild.store import read_seal

    members = read_seal(lay.checkpoint)
    if members is None:
        return
    stats = Lock(lay.lock).read_stats()
    for rel, digest in members.items():
        path = lay.checkpoint / rel
        if path.is_file() and check_artifact(path, {"kind": "file", "digest": digest}, stats):
            print(f"finetune: {path} changed since it was saved; training resumes without it", file=sys.stderr)
            path.unlink()


def _finetune(ctx: Context) -> None:
    from qwenbuild.train.settings import read_run_json

    m, lay = ctx.manifest, ctx.layout
    settings = read_run_json(lay.run_json)  # refuses model/pipeline parallel on CPU with the reason
    drop_damaged_checkpoints(lay)
    # unsealed while training: a killed run is resumed, never taken as complete
    lay.sealed(lay.checkpoint).unlink(missing_ok=True)
    if m.data["hardware"]["device"] == "ascend":
        node = _this_node(m)
        script = lay.launch / f"node_{node}.sh"
        print(f"finetune: running {script} (node {node} of {len(m.data['hardware']['nodes'])})", file=sys.stderr)
        if subprocess.run(["bash", str(script)]).returncode:
            raise UserError(f"{script} failed", hint=f"see the worker logs in {lay.output / 'msrun_log'}")
    else:
        from qwenbuild.train.launch import run_msrun

        run_msrun(settings.workers, lay.run_json, lay.output / "msrun_log", python_bin_dir=Path(sys.executable).parent)
        if m.data["dataset"]["source"] == "builtin" and m.data["dataset"]["num_heldout"]:
            _evaluate(m, lay)
    write_seal(lay.checkpoint)


def _evaluate(m, lay) -> None:
    from qwenbuild.tasks.deploy import finetuned_checkpoint
    from qwenbuild.train.evaluate import evaluate_heldout

    result = evaluate_heldout(finetuned_checkpoint(lay, 0), m.model, lay.tokenizer, lay.heldout,
                              metrics_path=lay.metrics, max_new_tokens=m.data["train"]["eval_max_new_tokens"],
                              samples_path=lay.output / "heldout_answers.jsonl")
    print(f"finetune: held-out accuracy {result['heldout_accuracy']:.1%} ({result['heldout_correct']}/"
          f"{result['heldout_total']})", file=sys.stderr)


def specs(m, lay) -> list[TaskSpec]:
    ascend = m.data["hardware"]["device"] == "ascend"
    builtin = m.data["dataset"]["source"] == "builtin"
    return [
        TaskSpec("run_config", "run.json for qwenbuild's workers and the MindFormers YAML (run_qwen1_5.yaml)",
                 _run_config, keys=MODEL_KEYS + PLAN_KEYS + TRAIN_KEYS, inputs=[lay.sealed(lay.tokenizer)],
                 outputs=[lay.run_json, lay.mindformers_yaml], packages=("mindformers",)),
        TaskSpec("finetune", "train on the MindRecord from the per-rank shards (msrun; launch scripts on Ascend)",
                 _finetune, inputs=[lay.run_json, lay.sealed(lay.mindrecord), lay.sealed(lay.transformed)]
                 + ([lay.sealed(lay.launch)] if ascend else [])
                 + ([lay.sealed(lay.dataset), lay.sealed(lay.tokenizer)] if builtin else []),
                 keys=("train.eval_max_new_tokens",), dir_outputs=[lay.checkpoint], reports=[lay.metrics],
                 packages=("mindspore", "numpy")),
    ]
