"""LoRA without training: the manifest's checks, the adapters' names, shapes, splits and first values, the strategy
files, the merge, the PEFT adapter through peft itself, and MindFormers' LoRA built from the generated YAML."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from hf_tiny import tiny_hf_model
from qwenbuild.manifest import ManifestError, load_manifest
from qwenbuild.model import lora as names
from qwenbuild.model.config import QwenConfig
from qwenbuild.model.lora import LoraConfig, TARGETS

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
# a shape no other test uses: 6 query heads over 3 KV heads of 8, FFN 72, 3 layers
SHAPE = dict(hidden=48, heads=6, n_kv_heads=3, intermediate=72, layers=3, vocab=96)
EVERY_TARGET = tuple(TARGETS)


def _cfg(**over) -> QwenConfig:
    return QwenConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"], num_layers=SHAPE["layers"],
                      num_heads=SHAPE["heads"], n_kv_heads=SHAPE["n_kv_heads"],
                      intermediate_size=SHAPE["intermediate"], **over)


def test_the_manifest_names_each_bad_lora_setting_at_its_line(tmp_path):
    # the tiny preset: k_proj and v_proj are [64, 128], so rank 64 does not fit them
    text = (REPO / "qwen.toml").read_text(encoding="utf-8").replace("seed = 42", 'seed = 42\nmethod = "lora"')
    for table, key, words in [
            ('[train.lora]\nrank = 64\ntargets = ["q_proj", "k_proj"]', "train.lora.rank",
             ["rank 64 is not below 64", "k_proj [64, 128]"]),
            ('[train.lora]\ntargets = ["q_proj", "qkv_proj"]', "train.lora.targets[1]",
             ["'qkv_proj'", '"o_proj"', '"down_proj"']),
            ('[train.lora]\ndropout = 1.0', "train.lora.dropout", ["< 1"]),
            ('[train.lora]\nalpha = 0', "train.lora.alpha", ["> 0"]),
            ('[train.lora]\nrank = 0', "train.lora.rank", [">= 1"]),
            ('[train.lora]\ntargets = []', "train.lora.targets", ["at least 1"])]:
        manifest = tmp_path / "qwen.toml"
        manifest.write_text(text.replace("[export]", f"{table}\n\n[export]", 1), encoding="utf-8")
        with pytest.raises(ManifestError) as info:
            load_manifest(manifest)
        [problem] = info.value.problems
        line = manifest.read_text(encoding="utf-8").splitlines()[problem.line - 1]
        assert problem.key == key, (table, problem)
        assert line.split("=")[0].strip() == key.split(".")[-1].split("[")[0], (table, line)
        for word in words:
            assert word in problem.message, (table, problem.message)


def test_the_same_settings_with_method_full_are_not_checked(tmp_path):
    text = (REPO / "qwen.toml").read_text(encoding="utf-8").replace("[export]", "[train.lora]\nrank = 64\n\n[export]")
    (tmp_path / "qwen.toml").write_text(text, encoding="utf-8")
    m = load_manifest(tmp_path / "qwen.toml")
    assert m.train.method == "full" and m.train.lora_config is None and m.value("train.lora.rank") == 64


def test_adapter_shapes_splits_and_count_agree_with_peft(tmp_path):
    cfg, lora = _cfg(), LoraConfig(5, 10, 0.0, EVERY_TARGET)
    shapes = names.adapter_shapes(cfg, lora)
    q, kv = SHAPE["heads"] * 8, SHAPE["n_kv_heads"] * 8
    assert shapes["model.layers.2.attention.wk.mindpet_delta_lora_a"] == (5, 48)
    assert shapes["model.layers.2.attention.wk.mindpet_delta_lora_b"] == (kv, 5)
    assert shapes["model.layers.0.attention.wo.mindpet_delta_lora_a"] == (5, q)
    assert shapes["model.layers.1.feed_forward.w2.mindpet_delta_lora_a"] == (5, 72)
    # peft on transformers' model of the same shape trains exactly as many parameters
    from peft import LoraConfig as PeftLora, get_peft_model

    hf = tiny_hf_model(tmp_path, hidden=48, heads=6, n_kv_heads=3, intermediate=72, layers=3, vocab=96)
    peft_model = get_peft_model(hf, PeftLora(r=5, lora_alpha=10, target_modules=list(EVERY_TARGET)))
    trainable = {n: tuple(p.shape) for n, p in peft_model.named_parameters() if p.requires_grad}
    assert names.trainable_parameters(cfg, lora) == sum(math.prod(s) for s in trainable.values())
    assert {names.peft_key(n).replace(".weight", ".default.weight"): s for n, s in shapes.items()} == trainable
    # a column-parallel weight (split on its rows) splits B's rows; a row-parallel one A's columns
    assert names.split_dim("x.attention.wq.mindpet_delta_lora_b", 0) == 0
    assert names.split_dim("x.attention.wq.mindpet_delta_lora_a", 0) is None
    assert names.split_dim("x.attention.wo.mindpet_delta_lora_a", 1) == 1
    assert names.split_dim("x.attention.wo.mindpet_delta_lora_b", 1) is None
    assert names.summed_over_model_parallel("x.attention.wq.mindpet_delta_lora_a", 0)
    assert not names.summed_over_model_parallel("x.attention.wq.mindpet_delta_lora_a", None)
    per_device = names.layer_adapter_parameters(cfg, LoraConfig(5, 10, 0.0, ("q_proj", "o_proj")), 2)
    assert per_device == 5 * 48 + q * 5 / 2 + 5 * q / 2 + 48 * 5


def test_first_adapters_are_drawn_as_peft_draws_them():
    a = names.initial_value("model.layers.0.attention.wq.mindpet_delta_lora_a", (8, 400), seed=3)
    assert a.dtype == np.float32 and np.abs(a).max() <= 1 / math.sqrt(400)
    assert np.array_equal(a, names.initial_value("model.layers.0.attention.wq.mindpet_delta_lora_a", (8, 400), 3))
    assert not np.array_equal(a, names.initial_value("model.layers.1.attention.wq.mindpet_delta_lora_a", (8, 400), 3))
    # torch's kaiming_uniform_(a=sqrt(5)), which peft uses for lora_A, has the same bound and distribution
    theirs = torch.nn.init.kaiming_uniform_(torch.empty(8, 400), a=math.sqrt(5)).numpy()
    assert abs(np.abs(theirs).max() - np.abs(a).max()) < 2e-3 and abs(theirs.std() - a.std()) < 2e-3
    assert not names.initial_value("model.layers.0.attention.wq.mindpet_delta_lora_b", (400, 8), 3).any()


def test_strategy_files_split_adapters_as_their_weights(tmp_path):
    from qwenbuild.parallel.rank_layout import process_layout
    from qwenbuild.parallel.strategy import strategy_files, weight_layouts_digest, write_strategy_files

    cfg = _cfg()
    write_strategy_files(cfg, 2, 3, 1, tmp_path / "lora", lora_targets=("v_proj", "down_proj"))
    write_strategy_files(cfg, 2, 3, 1, tmp_path / "full")
    layout = process_layout(tmp_path / "lora", 4, 6, 1)  # MindSpore reads the files
    assert layout.split("model.layers.1.attention.wv.mindpet_delta_lora_b") == 0
    assert layout.split("model.layers.1.attention.wv.mindpet_delta_lora_a") is None
    assert layout.split("model.layers.1.feed_forward.w2.mindpet_delta_lora_a") == 1
    assert layout.split("model.layers.1.feed_forward.w2.mindpet_delta_lora_b") is None
    assert "model.layers.1.attention.wq.mindpet_delta_lora_a" not in layout.splits
    # the weights are sliced alike with and without adapters, and the rank is in no strategy file
    from qwenbuild.store import write_seal

    write_seal(tmp_path / "lora")  # as the strategy task seals its directory
    assert weight_layouts_digest(tmp_path / "lora") == weight_layouts_digest(tmp_path / "full")
    assert strategy_files(cfg, 2, 3, 1, lora_targets=("q_proj",)) == strategy_files(cfg, 2, 3, 1,
                                                                                     lora_targets=("q_proj",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A held-out-shape model converted, and adapters on every target with B drawn away from zero."""
    from qwenbuild.weights.convert import convert_weight

    root = tmp_path_factory.mktemp("lora")
    hf = tiny_hf_model(root / "hf", seed=5, hidden=48, heads=6, n_kv_heads=3, intermediate=72, layers=3, vocab=96)
    convert_weight(root / "hf", root / "base.ckpt", progress=None)
    cfg, lora = QwenConfig.from_hf_dir(root / "hf"), LoraConfig(4, 12, 0.1, EVERY_TARGET)
    rng = np.random.default_rng(1)
    adapters = {n: (names.initial_value(n, s, 7) if n.endswith(names.A) else rng.normal(0, 0.05, s))
                .astype(np.float32) for n, s in names.adapter_shapes(cfg, lora).items()}
    return root, hf, cfg, lora, adapters


def test_the_merge_adds_the_scaled_product_to_the_targets_only(trained, tmp_path):
    from qwenbuild.errors import UserError
    from qwenbuild.model.params import LORA_ENTRY
    from qwenbuild.weights.lora import merge_lora, read_adapters
    from qwenbuild.weights.mindspore_ckpt import read_array, read_tensors, read_text

    root, _, cfg, lora, adapters = trained
    few = LoraConfig(4, 12, 0.1, ("k_proj", "up_proj"))
    chosen = {n: v for n, v in adapters.items() if n in names.adapter_shapes(cfg, few)}
    merge_lora(root / "base.ckpt", chosen, few, tmp_path / "merged.ckpt", progress=None)
    base = {t.name: t for t in read_tensors(root / "base.ckpt")}
    merged = {t.name: t for t in read_tensors(tmp_path / "merged.ckpt")}
    assert set(merged) == set(base) | {LORA_ENTRY}
    assert json.loads(read_text(merged[LORA_ENTRY]))["scale"] == 3.0
    for name, t in base.items():
        if t.type_name == "str":
            continue
        cell = names.cell_of(name)
        if f"{cell}.{names.A}" in chosen and name.endswith(".weight"):
            expected = read_array(t) + 3.0 * chosen[f"{cell}.{names.B}"] @ chosen[f"{cell}.{names.A}"]
            np.testing.assert_allclose(read_array(merged[name]), expected, rtol=0, atol=1e-6, err_msg=name)
        else:
            assert b"".join(merged[name].chunks()) == b"".join(t.chunks()), name
    # adapters recorded as another run's are never merged with this run's scale
    from qwenbuild.weights.mindspore_ckpt import write_checkpoint

    with pytest.raises(UserError, match="trained with"):
        path = tmp_path / "other.ckpt"
        write_checkpoint(path, [], texts={LORA_ENTRY: json.dumps(dataclasses.asdict(
            dataclasses.replace(few, rank=2)))})
        read_adapters(path, few, cfg)


def test_the_peft_adapter_gives_the_merged_models_logits_through_peft(trained, tmp_path):
    """peft loads adapter/ onto the Hugging Face base; its logits equal qwenbuild's merged checkpoint's and those
    of qwenbuild's network running the adapters unmerged."""
    import mindspore as ms
    from peft import PeftModel

    from qwenbuild.model.adapters import add_adapters
    from qwenbuild.model.network import QwenForCausalLM
    from qwenbuild.weights.lora import merge_lora, write_peft_adapter
    from qwenbuild.weights.mindspore_ckpt import load_weights

    root, hf, cfg, lora, adapters = trained
    merge_lora(root / "base.ckpt", adapters, lora, tmp_path / "merged.ckpt", progress=None)
    (tmp_path / "adapter").mkdir()
    write_peft_adapter(adapters, lora, str(root / "hf"), tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (4, 12, sorted(EVERY_TARGET))
    ids = np.random.default_rng(2).integers(0, 96, (2, 11)).astype(np.int32)
    model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        with model.disable_adapter():
            plain = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(theirs - plain).max() > 0.05  # the adapters change the answer
    ms.set_context(mode=ms.GRAPH_MODE)
    merged = QwenForCausalLM(cfg)
    load_weights(merged, tmp_path / "merged.ckpt")
    np.testing.assert_allclose(merged(ms.Tensor(ids)).asnumpy(), theirs, rtol=0, atol=1e-5)
    unmerged = QwenForCausalLM(cfg)
    load_weights(unmerged, root / "base.ckpt")
    for param in add_adapters(unmerged, lora, rows=ids.size):
        param.set_data(ms.Tensor(adapters[param.name]))
    unmerged.set_train(False)  # dropout acts in training only
    np.testing.assert_allclose(unmerged(ms.Tensor(ids)).asnumpy(), theirs, rtol=0, atol=1e-5)


def test_the_yaml_pet_config_puts_mindformers_lora_on_the_targets(tmp_path):
    """MindFormers' own get_pet_model, given the YAML's pet_config, adds exactly the adapters qwenbuild trains:
    the same names and shapes, on the targets only."""
    from mindformers.pet import get_pet_model

    from qwenbuild.train.mindformers_yaml import RunYaml, llama_from_yaml, write_yaml
    from qwenbuild.train.settings import TrainSettings

    cfg, lora = _cfg(), LoraConfig(6, 32, 0.05, ("k_proj", "o_proj", "gate_proj"))
    settings = TrainSettings(model=cfg, train_data="rows.mindrecord", output_dir="out", seq_length=16, batch_size=2,
                             learning_rate=1e-3, lora=lora)
    run = RunYaml(settings, micro_batch_num=1, vocab_emb_dp=True, use_seq_parallel=False, recompute=False,
                  gradient_aggregation_group=4)
    write_yaml(tmp_path / "run.yaml", run, "cpu")
    from mindformers.tools.register import MindFormerConfig

    pet = MindFormerConfig(str(tmp_path / "run.yaml")).model.model_config.pet_config
    assert (pet.pet_type, pet.lora_rank, pet.lora_alpha, pet.target_modules) == ("lora", 6, 32, ".*wk|.*wo|.*w1")
    model = get_pet_model(llama_from_yaml(tmp_path / "run.yaml"), pet)
    found = {p.name: tuple(p.shape) for p in model.get_parameters() if "mindpet_delta" in p.name}
    assert found == names.adapter_shapes(cfg, lora)
    assert {p.name for p in model.trainable_params()} == set(found)


def test_plan_counts_gradients_and_moments_of_the_adapters_only_and_the_fewest_devices(tmp_path):
    """Qwen1.5-72B on the seed's 4 x 8 cards: under LoRA each rank's gradients and AdamW moments are its adapters'
    (float32), the frozen weights stay whole, and `plan` names a plan with far fewer devices that fits."""
    import subprocess
    import sys

    from qwenbuild.manifest.edit import set_keys
    from qwenbuild.plan import fewest_devices, memory_estimate

    subprocess.run([sys.executable, "-m", "qwenbuild", "init", "--preset", "qwen1.5-72b"], cwd=tmp_path, check=True,
                   capture_output=True)
    path = tmp_path / "qwen.toml"
    full = memory_estimate(load_manifest(path))
    set_keys(path, [("train.method", '"lora"'), ("train.lora.rank", "64")])
    m = load_manifest(path)
    lora, cfg = m.train.lora_config, m.model.config
    rows = memory_estimate(m)
    # dp1 x mp8 x pp4, 20 layers a stage: rank 64 on q_proj [8192, 8192] and v_proj [8192, 8192] (no grouped KV)
    per_layer = 2 * (64 * 8192 + 8192 // 8 * 64)
    assert per_layer == names.layer_adapter_parameters(cfg, lora, 8)
    for lora_row, full_row in zip(rows, full):
        assert lora_row.component("gradients").bytes == 20 * per_layer * 4
        assert lora_row.component("optimizer").bytes == 20 * per_layer * 4 * 2
        assert lora_row.component("weights").bytes == (full_row.params + 20 * per_layer) * 4
        assert lora_row.params == full_row.params + 20 * per_layer
    assert max(r.total for r in rows) < 20 * 2**30 < max(r.total for r in full)
    assert fewest_devices(m, True) == (2, 3) and fewest_devices(m, False) == (8, 4)
    out = subprocess.run([sys.executable, "-m", "qwenbuild", "plan", "--no-status", "-c", str(path)],
                         capture_output=True, text=True, check=True).stdout
    assert "167.77M trainable parameters (0.232% of 72.288B)" in out
    assert "fewest devices that fit: LoRA dp 1 x mp 2 x pp 3 (6 devices), a full fine-tune dp 1 x mp 8 x pp 4 " \
           "(32 devices)" in out


def test_the_adapters_are_joined_by_the_strategies_mindformers_compiled(trained, tmp_path):
    """Ranks whose adapters were cut by compiled strategy files (dp1 x mp3: B of column-parallel targets and A of
    row-parallel ones split) join back to the whole adapters by those files, which the finetune takes over the
    plan's (here dp3 x mp1, every adapter whole: by it rank 0's slices are taken for whole adapters and refused)."""
    import mindspore as ms

    from qwenbuild.build_dir import BuildDir
    from qwenbuild.errors import UserError
    from qwenbuild.parallel.reshard import transform_ckpt
    from qwenbuild.parallel.strategy import write_strategy_files
    from qwenbuild.tasks.train import complete_adapters, finetune_strategies
    from test_mindformers_outputs import compiled_strategy_file

    _, _, cfg, lora, adapters = trained
    build = BuildDir(tmp_path / "build")
    write_strategy_files(cfg, 3, 1, 1, build.strategy, lora_targets=lora.targets)
    layouts = write_strategy_files(cfg, 1, 3, 1, tmp_path / "compiled_json", lora_targets=lora.targets)
    build.compiled_strategy.mkdir(parents=True)
    for path in layouts:
        compiled_strategy_file(path, build.compiled_strategy / path.with_suffix(".ckpt").name)
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(v)} for n, v in adapters.items()], str(tmp_path / "whole.ckpt"))
    transform_ckpt(None, tmp_path / "compiled_json", tmp_path / "whole.ckpt", tmp_path / "ranks", progress=None)
    for rank in range(3):
        rank_dir = build.checkpoint / f"rank_{rank}"
        rank_dir.mkdir(parents=True)
        (tmp_path / "ranks" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt").rename(rank_dir / "qwen-1_1.ckpt")
        (rank_dir / "meta.json").write_text(json.dumps({"last_ckpt_file": "qwen-1_1.ckpt"}))
    assert finetune_strategies(build, 3)[1] == "compiled"
    joined = complete_adapters(build, 3, lora, cfg, tmp_path / "work")
    assert joined.keys() == adapters.keys()
    for name, value in adapters.items():
        assert np.array_equal(joined[name], value), name
    for path in build.compiled_strategy.glob("*.ckpt"):
        path.unlink()
    assert finetune_strategies(build, 3)[1] == "planned"
    with pytest.raises(UserError, match=r"attention\.wq\.mindpet_delta_lora_b \(16, 4\) \(expected \(48, 4\)\)"):
        complete_adapters(build, 3, lora, cfg, tmp_path / "work_plan")
