"""Training pieces against references (MindFormers' schedule, torch's AdamW, numpy's cross entropy) and a real run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qwenbuild.errors import UserError
from qwenbuild.model.config import QwenConfig
from qwenbuild.train import checkpoint, data
from qwenbuild.train.progress import STEP_LINE, step_line
from qwenbuild.train.schedule import cosine_with_warmup, schedule
from qwenbuild.train.settings import read_run_json, settings_from_dict, write_run_json
import tb_events
from train_data import SEQ, TINY, progression_rows, settings, write_mindrecord


def test_schedule_matches_mindformers_cosine_with_warmup():
    import mindspore as ms
    from mindformers.core.lr import CosineWithWarmUpLR

    ms.set_context(mode=ms.PYNATIVE_MODE)
    theirs = CosineWithWarmUpLR(learning_rate=2e-3, warmup_ratio=0.1, total_steps=50)
    ours = schedule(50, 2e-3, 0.1)
    for step in (0, 1, 4, 5, 6, 20, 49):
        assert ours[step] == pytest.approx(float(theirs(ms.Tensor(step, ms.int32)).asnumpy()), rel=1e-5, abs=1e-9)
    assert ours[0] == 0.0 and ours[5] == pytest.approx(2e-3)
    assert cosine_with_warmup(50, 50, 2e-3, 0.1) == 0.0


@pytest.mark.parametrize("decayed", [(False, True, False), (True, False, True)], ids=["w-big-undecayed", "b-undecayed"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("mode", ["GRAPH_MODE", "PYNATIVE_MODE"])
def test_adamw_matches_torch_adamw(mode, fused, decayed):
    """float32 parameters take the fused in-place kernel, or without it: small ones AdamWeightDecay (bias correction
    folded into its inputs), large ones an in-place decay and the Adam kernel; float16 ones the update spelled out;
    all as torch's AdamW on the gradients times the clipping factor, each path with and without weight decay (torch's
    parameter groups). The large one is split over threads."""
    import mindspore as ms
    import torch

    from qwenbuild.train.optimizer import TWO_KERNELS_FROM, AdamW

    ms.set_context(mode=getattr(ms, mode))
    rng = np.random.default_rng(0)
    shapes = ((3, 4), (5,), (8 * TWO_KERNELS_FROM // 63, 63))  # the last above two threads' share of the kernel
    starts = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    grads = [[rng.standard_normal(s.shape).astype(np.float32) for s in starts] for _ in range(4)]
    scales = [1.0, 0.5, 0.25, 1.0]
    params = [ms.Parameter(ms.Tensor(starts[0]), name="w"),
              ms.Parameter(ms.Tensor(starts[1], ms.float16), name="b"),
              ms.Parameter(ms.Tensor(starts[2]), name="big")]
    ours = AdamW(params, weight_decay=0.1, fused=fused, decayed=decayed)
    kernels = (ours.in_place, ours.adam_weight_decay, ours.spelled, ours.decayed_adam)
    assert kernels == (((0, 2), (), (1,), ()) if fused else ((), (0,), (1,), (2,)))
    refs = [torch.nn.Parameter(torch.tensor(starts[0])),
            torch.nn.Parameter(torch.tensor(starts[1]).half().float()),
            torch.nn.Parameter(torch.tensor(starts[2]))]
    groups = [{"params": [r for r, d in zip(refs, decayed) if d == on], "weight_decay": 0.1 if on else 0.0}
              for on in (True, False)]
    theirs = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for step_grads, scale in zip(grads, scales):
        ours(tuple(ms.Tensor(g) for g in step_grads), ms.Tensor(np.float32(1e-2)), ms.Tensor(np.float32(scale)))
        for ref, g in zip(refs, step_grads):
            ref.grad = torch.tensor(g) * scale
        theirs.step()
        with torch.no_grad():  # the float16 parameter is stored rounded after every step
            refs[1].copy_(refs[1].half().float())
    np.testing.assert_allclose(params[0].asnumpy(), refs[0].detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ops_float(params[1]), refs[1].detach().numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(params[2].asnumpy(), refs[2].detach().numpy(), rtol=1e-5, atol=1e-6)
    for i, ref in enumerate(refs):
        np.testing.assert_allclose(ours.moments1[i].asnumpy(), theirs.state[ref]["exp_avg"].numpy(), rtol=1e-5,
                                   atol=1e-7)
        np.testing.assert_allclose(ours.moments2[i].asnumpy(), theirs.state[ref]["exp_avg_sq"].numpy(), rtol=1e-5,
                                   atol=1e-9)
    assert [m.name for m in (*ours.moments1, *ours.moments2)] == ["adam_m.w", "adam_m.b", "adam_m.big", "adam_v.w",
                                                                  "adam_v.b", "adam_v.big"]
    assert int(ours.global_step.asnumpy()) == 4


@pytest.mark.parametrize("mode", ["GRAPH_MODE", "PYNATIVE_MODE"])
def test_clipping_norm_of_gradients_of_any_shape_and_dtype(mode):
    """Large gradients (a matrix, 3-D) summed each on its own, small ones and one of a size no multiple of the row
    width joined and padded, a float16 one in float32: the norm equals float64 numpy's."""
    import mindspore as ms
    from mindspore import nn

    from qwenbuild.train.optimizer import AdamW
    from qwenbuild.train.step import ONE_VECTOR_UP_TO, TrainStep

    ms.set_context(mode=getattr(ms, mode))
    shapes = ((7,), (3, 5), (301, 257), (ONE_VECTOR_UP_TO * 2,), (40, 41, 128), (13,))
    dtypes = (np.float32,) * 5 + (np.float16,)
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(shape).astype(dtype) for shape, dtype in zip(shapes, dtypes)]
    params = [ms.Parameter(ms.Tensor(np.zeros_like(g)), name=f"p{i}") for i, g in enumerate(grads)]
    step = TrainStep(nn.Identity(), AdamW(params), grad_clip=1.0)
    assert step.joined == (True, True, True, False, False, True)

    class Norm(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.step = step

        def construct(self, gradients):
            return self.step.global_norm(gradients)

    norm = Norm()(tuple(ms.Tensor(g) for g in grads))
    expected = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads))
    assert float(norm.asnumpy()) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("clip", [0.1, 0.0])
def test_training_step_equals_torch_with_and_without_clipping(tmp_path, clip):
    """Two whole steps (loss, gradient norm, clipping, AdamW) at a size that takes the training-shaped kernels equal
    transformers + torch's clip_grad_norm_ and AdamW. Unclipped, the in-place updates still wait for every gradient:
    a weight updated before its last read would show here."""
    import mindspore as ms
    import torch

    from hf_tiny import tiny_hf_model
    from qwenbuild.model.cpu_kernels import large
    from qwenbuild.model.network import QwenForCausalLM
    from qwenbuild.model.params import ms_to_hf
    from qwenbuild.train.optimizer import AdamW
    from qwenbuild.train.step import TrainStep
    from qwenbuild.weights import convert_weight
    from qwenbuild.weights.mindspore_ckpt import load_weights

    ms.set_context(mode=ms.GRAPH_MODE)
    hf = tiny_hf_model(tmp_path / "hf")
    convert_weight(tmp_path / "hf", tmp_path / "model.ckpt", progress=None)
    cfg = QwenConfig.from_hf_dir(tmp_path / "hf")
    batch, seq = 4, 160
    assert large(batch * seq, cfg.hidden_size) and batch * seq > cfg.hidden_size
    net = QwenForCausalLM(cfg)
    load_weights(net, tmp_path / "model.ckpt")
    ours = TrainStep(net, AdamW(net.trainable_params(), weight_decay=0.1), grad_clip=clip)
    hf.train()
    theirs = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    rng = np.random.default_rng(2)
    for lr in (1e-3, 5e-4):
        ids = rng.integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
        loss, norm = ours(ms.Tensor(ids), ms.Tensor(ids), ms.Tensor(np.float32(lr)))
        logits = hf(input_ids=torch.from_numpy(ids[:, :-1].astype(np.int64))).logits
        their_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                       torch.from_numpy(ids[:, 1:].astype(np.int64)).reshape(-1))
        theirs.zero_grad()
        their_loss.backward()
        their_norm = float(torch.nn.utils.clip_grad_norm_(hf.parameters(), clip or float("inf")))
        for group in theirs.param_groups:
            group["lr"] = lr
        theirs.step()
        assert their_norm > clip > 0 or clip == 0  # clipped: the scale is not 1
        assert float(loss.asnumpy()) == pytest.approx(float(their_loss.detach()), abs=1e-5)
        assert float(norm.asnumpy()) == pytest.approx(their_norm, rel=1e-4)
    hf_params = dict(hf.named_parameters())
    # Adam divides by sqrt(v): on a near-zero gradient float32 rounding moves a weight by up to 1% of a 1e-3 step
    for w in net.trainable_params():
        np.testing.assert_allclose(w.asnumpy(), hf_params[ms_to_hf(w.name)].detach().numpy(), atol=1e-5, rtol=1e-4,
                                   err_msg=w.name)


def ops_float(param):
    import mindspore as ms

    return param.astype(ms.float32).asnumpy()


def test_loss_is_shifted_cross_entropy_over_unmasked_targets():
    import mindspore as ms
    from mindspore import nn

    from qwenbuild.train.step import CausalLMLoss

    ms.set_context(mode=ms.PYNATIVE_MODE)
    rng = np.random.default_rng(1)
    table = rng.standard_normal((7, 5, 11)).astype(np.float32)

    class Fixed(nn.Cell):
        def construct(self, tokens):
            return ms.Tensor(table[:tokens.shape[0], :tokens.shape[1]])

    input_ids = rng.integers(0, 11, (2, 6)).astype(np.int32)
    target_ids = input_ids.copy()
    target_ids[0, 4:] = -100
    loss = float(CausalLMLoss(Fixed())(ms.Tensor(input_ids), ms.Tensor(target_ids)).asnumpy())
    logits = table[:2]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    labels = target_ids[:, 1:]
    terms = [-logp[b, t, labels[b, t]] for b in range(2) for t in range(5) if labels[b, t] != -100]
    assert loss == pytest.approx(np.mean(terms), rel=1e-5)


def test_rank_slices_make_up_the_global_batch_and_replay_from_any_step():
    one = [data.rank_rows(50, 8, 3, step, 0, 8) for step in range(12)]
    two = [np.concatenate([data.rank_rows(50, 8, 3, step, r, 4) for r in (0, 1)]) for step in range(12)]
    assert all((a == b).all() for a, b in zip(one, two))
    assert sorted(np.concatenate(one[:6])) == sorted(data.epoch_order(50, 3, 0)[:48])
    assert not (one[0] == one[6]).all()  # the next epoch is another order
    full = sum(data.rank_rows_by_epoch(50, 8, 3, 0, 12, 1, 4), [])
    assert sum(data.rank_rows_by_epoch(50, 8, 3, 5, 12, 1, 4), []) == full[5 * 4:]


def test_checkpoint_names_follow_mindformers_and_resume_needs_every_rank(tmp_path):
    assert checkpoint.file_name("qwen2", 1, 10, 4) == "qwen2_rank_1-3_2.ckpt"
    assert checkpoint.file_name("qwen2", 0, 8, 4) == "qwen2_rank_0-2_4.ckpt"
    for rank, steps in ((0, (4, 8)), (1, (4,))):
        d = checkpoint.rank_dir(tmp_path, rank)
        d.mkdir(parents=True)
        for s in steps:
            (d / checkpoint.file_name("qwen2", rank, s, 4)).write_bytes(b"")
        (d / "meta.json").write_text(json.dumps({"run_digest": "A"}))
    assert checkpoint.resume_step(tmp_path, 2, "qwen2", 4, "A") == 4
    assert checkpoint.resume_step(tmp_path, 1, "qwen2", 4, "A") == 8
    assert checkpoint.resume_step(tmp_path, 2, "qwen2", 4, "B") == 0


def test_run_json_round_trip_and_errors_name_the_key(tmp_path):
    s = settings(tmp_path / "d.mindrecord", tmp_path / "out")
    path = write_run_json(tmp_path / "run.json", s)
    assert read_run_json(path) == s
    values = json.loads(path.read_text())
    with pytest.raises(UserError, match="'learning_rate'"):
        settings_from_dict({**values, "learning_rate": -1})
    with pytest.raises(UserError, match="unknown key.*lr"):
        settings_from_dict({**values, "lr": 1})
    with pytest.raises(UserError, match="model_parallel=2.*need strategy_dir"):
        settings_from_dict({**values, "model_parallel": 2})
    with pytest.raises(UserError, match="warmup_ratio"):
        settings_from_dict({**values, "warmup_ratio": 2.0})
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "run.json").write_text(json.dumps({**values, "train_data": "d.mindrecord"}))
    assert read_run_json(tmp_path / "sub" / "run.json").train_data == str(tmp_path / "sub" / "d.mindrecord")


def test_step_line_is_parsed_back():
    line = step_line(3, 40, 2.5, 1e-3, 1234.0, 75)
    assert line == "step 3/40 loss 2.5000 lr 1.000e-03 tokens/s 1234 eta 1m15s"
    assert STEP_LINE.match(line).groups()[:2] == ("3", "40")


def test_mindrecord_with_other_seq_length_is_refused(tmp_path):
    path = write_mindrecord(tmp_path / "d.mindrecord", progression_rows(8))
    with pytest.raises(UserError, match=f"rows hold {SEQ + 1} tokens but seq_length is 32"):
        data.check_mindrecord(path, 32)


def test_event_files_read_back_and_a_new_run_replaces_the_old_curves(tmp_path):
    from qwenbuild.train import events

    with events.EventLog(events.rank_dir(tmp_path, 0)) as log:
        log.scalars(1, {"loss": 2.5, "learning-rate": 1e-3})
        log.scalars(2, {"loss": 1.25})
    assert tb_events.scalars(tmp_path / "tensorboard" / "rank_0") == {"loss": {1: 2.5, 2: 1.25},
                                                                      "learning-rate": {1: np.float32(1e-3)}}
    mine = tmp_path / "tensorboard" / "rank_1" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("kept")
    events.clear(tmp_path)
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*")) == [] and mine.read_text() == "kept"


def test_the_event_writer_does_not_load_torch_and_mindspore_still_loads_after_it():
    import subprocess
    import sys

    probe = ("import sys; from qwenbuild.train.events import summary_writer_class; summary_writer_class(); "
             "print('tensorboardX' in sys.modules, 'torch' in sys.modules); import torch, mindspore")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout == "True False\n", proc.stderr


@pytest.mark.slow
def test_loss_decreases_and_results_are_written(tmp_path):
    from qwenbuild.train.finetune import finetune

    path = write_mindrecord(tmp_path / "d.mindrecord", progression_rows(64))
    s = settings(path, tmp_path / "out", steps=40, save_steps=20)
    metrics = finetune(s)
    losses = metrics["loss"]
    assert len(losses) == 40 and np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["loss"] == losses and written["tokens_per_s"] > 0 and written["wall_s"] > 0
    assert (tmp_path / "out" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # TensorBoard's curves are the run's own values, step by step (as float32, the events' scalar type)
    logged = tb_events.scalars(tmp_path / "out" / "tensorboard" / "rank_0")
    steps = list(range(1, 41))
    assert logged["loss"] == dict(zip(steps, np.float32(losses).tolist()))
    assert logged["learning-rate"] == dict(zip(steps, np.float32(metrics["learning_rate"]).tolist()))
    assert logged["grad-norm"] == dict(zip(steps, np.float32(metrics["grad_norm"]).tolist()))
    assert sorted(logged["tokens-per-second"]) == steps and min(logged["tokens-per-second"].values()) > 0
    rank0 = tmp_path / "out" / "checkpoint" / "rank_0"
    assert sorted(p.name for p in rank0.glob("*.ckpt")) == ["qwen2_rank_0-2_4.ckpt", "qwen2_rank_0-3_8.ckpt"]
    meta = json.loads((rank0 / "meta.json").read_text())
    assert meta["last_ckpt_file"] == "qwen2_rank_0-3_8.ckpt" and meta["last_epoch"] == 3

    import mindspore as ms

    saved = ms.load_checkpoint(str(rank0 / "qwen2_rank_0-3_8.ckpt"), crc_check=True)
    assert int(saved["global_step"].asnumpy()) == 40 and int(saved["step_num"].asnumpy()) == 40
    assert {"adam_m.lm_head.weight", "adam_v.model.norm_out.weight"} <= set(saved)
    # the model's config.json rides along, so the file converts back to Hugging Face alone
    from qwenbuild.model.params import CONFIG_ENTRY

    assert QwenConfig.from_hf_dict(json.loads(saved[CONFIG_ENTRY])) == TINY
    from qwenbuild.model.network import QwenForCausalLM
    from qwenbuild.weights.mindspore_ckpt import load_weights

    net = QwenForCausalLM(TINY)
    load_weights(net, rank0 / "qwen2_rank_0-3_8.ckpt")
    np.testing.assert_array_equal(net.lm_head.weight.asnumpy(), saved["lm_head.weight"].asnumpy())
