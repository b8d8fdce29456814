"""Where every artifact lives inside the build dir, in the places MindFormers users know (output/checkpoint, ...).

MindFormers owns whatever is below its output_dir: it writes strategy/, checkpoint*/ and log/ there and, with
auto_trans_ckpt, empties strategy/ and transformed_checkpoint/. So each MindFormers run has a directory of its own
that holds nothing another task built: `output/` is the finetune's (the original's layout: checkpoint/rank_N/,
strategy/ it compiles, log/rank_N/), `predict/output/` the online predict's. What qwenbuild builds before training
(the planned strategy files, the shards) and after it (the export) lives beside `output/`, never below it."""

from __future__ import annotations

from pathlib import Path


class BuildDir:
    def __init__(self, root: Path):
        self.root = Path(root)

    # bookkeeping
    @property
    def lock(self) -> Path:
        return self.root / "qwen.lock"

    @property
    def doit_db(self) -> Path:
        return self.root / ".doit.db"

    @property
    def owner(self) -> Path:
        """Names the process building here; held with flock so a second build waits."""
        return self.root / ".build-owner"

    # data and tokenizer
    @property
    def dataset(self) -> Path:
        return self.root / "data" / "instructions"

    @property
    def alpaca_messages(self) -> Path:
        return self.root / "data" / "alpaca-messages.json"

    @property
    def heldout(self) -> Path:
        return self.dataset / "heldout.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def mindrecord(self) -> Path:
        return self.root / "data" / "mindrecord"

    @property
    def mindrecord_file(self) -> Path:
        return self.mindrecord / "alpaca-messages.mindrecord"

    # weights
    @property
    def init_weights(self) -> Path:
        return self.root / "weights" / "hf_init"

    @property
    def converted(self) -> Path:
        return self.root / "weights" / "qwen.ckpt"

    @property
    def output(self) -> Path:
        """The finetune's run directory: MindFormers' output_dir of the finetune, and qwenbuild's trainer's."""
        return self.root / "output"

    @property
    def strategy(self) -> Path:
        """The plan's strategy files (ckpt_strategy_rank_N.json, or copies of parallel.strategy_dir's)."""
        return self.root / "strategy"

    @property
    def compiled_strategy(self) -> Path:
        """Where MindFormers' Trainer saves the strategies it compiles during the finetune (Ascend)."""
        return self.output / "strategy"

    @property
    def transformed(self) -> Path:
        """The converted checkpoint sliced per rank: transformed_checkpoint/qwen/rank_N/checkpoint_N.ckpt."""
        return self.root / "transformed_checkpoint" / self.converted.stem

    @property
    def checkpoint(self) -> Path:
        return self.output / "checkpoint"

    @property
    def merged(self) -> Path:
        """The finetuned per-rank checkpoints merged into one complete checkpoint (rank_0/checkpoint_0.ckpt)."""
        return self.output / "merged_checkpoint"

    @property
    def merged_file(self) -> Path:
        return self.merged / "rank_0" / "checkpoint_0.ckpt"

    @property
    def adapter(self) -> Path:
        """The trained LoRA adapters in PEFT's format: adapter_config.json, adapter_model.safetensors."""
        return self.root / "adapter"

    @property
    def export(self) -> Path:
        """The export root (--mindir_root_dir): the graphs and the weights cut for them."""
        return self.root / "export"

    @property
    def export_shards(self) -> Path:
        """The weights cut for the export topology: strategy/ (dp 1 x export.model_parallel) and shards/rank_N/."""
        return self.export / "export_checkpoint"

    @property
    def export_rank_table(self) -> Path:
        """The export topology's RANK_TABLE_FILE (Ascend): the first export.model_parallel devices of node 0."""
        return self.root / "export_rank_table.json"

    @property
    def predict(self) -> Path:
        """Online predict with MindFormers: predict_qwen1_5.yaml and predict.sh (msrun on node 0)."""
        return self.root / "predict"

    @property
    def predict_yaml(self) -> Path:
        return self.predict / "predict_qwen1_5.yaml"

    @property
    def predict_script(self) -> Path:
        return self.predict / "predict.sh"

    @property
    def predict_output(self) -> Path:
        """MindFormers' output_dir of the online predict (its strategy/, transformed_checkpoint/, log/)."""
        return self.predict / "output"

    @property
    def lite_infer(self) -> Path:
        """MindSpore Lite inference on the export topology: lite_infer.sh (one process per rank) and its logs."""
        return self.root / "lite_infer"

    @property
    def lite_infer_script(self) -> Path:
        return self.lite_infer / "lite_infer.sh"

    @property
    def msrun_log(self) -> Path:
        return self.output / "msrun_log"

    @property
    def metrics(self) -> Path:
        return self.output / "metrics.json"

    @property
    def mindir_full(self) -> Path:
        return self.export / "mindir_full_checkpoint"

    @property
    def mindir_inc(self) -> Path:
        return self.export / "mindir_inc_checkpoint"

    # cluster files
    @property
    def rank_table(self) -> Path:
        return self.root / "rank_table"

    @property
    def launch(self) -> Path:
        return self.root / "launch"

    @property
    def mindformers_yaml(self) -> Path:
        return self.root / "run_qwen1_5.yaml"

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def lite_ini(self) -> Path:
        return self.root / "lite.ini"

    @property
    def infer(self) -> Path:
        return self.root / "infer" / "answer.json"
