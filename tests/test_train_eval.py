"""Held-out evaluation: batched cached greedy decoding equals the network's plain greedy loop; exact-match scoring."""

from __future__ import annotations

import json

import pytest

from qwenbuild.errors import UserError
from qwenbuild.train.evaluate import read_heldout

ROWS = [
    {"instruction": "Repeat the words.", "input": "cat dog", "output": "?", "task": "copy_words"},
    {"instruction": "What is 12 + 3?", "input": "", "output": "?", "task": "add_small"},
    {"instruction": "Reverse the letters.", "input": "a b c", "output": "?", "task": "reverse_letters"},
]


@pytest.mark.slow
def test_heldout_accuracy_counts_exact_greedy_answers(tmp_path):
    import mindspore as ms

    from qwenbuild.data.instructions import eval_examples, tokenizer_corpus
    from qwenbuild.model.config import QwenConfig
    from qwenbuild.model.network import QwenForCausalLM, greedy_generate
    from qwenbuild.tokenizer.files import ENDOFTEXT, IM_END
    from qwenbuild.tokenizer.load import load_tokenizer
    from qwenbuild.tokenizer.train import train_tokenizer
    from qwenbuild.train.evaluate import evaluate_heldout

    rows = [dict(r, output=o) for r in ROWS for o in ("cat dog", "15", "c b a")]
    train_tokenizer(tokenizer_corpus(rows) * 3, 290, tmp_path / "tok")
    tokenizer = load_tokenizer(tmp_path / "tok")
    cfg = QwenConfig(vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, n_kv_heads=2,
                     intermediate_size=64, max_position_embeddings=256)
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.set_seed(11)
    net = QwenForCausalLM(cfg)
    ms.save_checkpoint(net, str(tmp_path / "w.ckpt"))
    eos = {tokenizer.convert_tokens_to_ids(t) for t in (IM_END, ENDOFTEXT)}
    expected = []
    for text, _ in eval_examples(ROWS):
        new = greedy_generate(net, tokenizer.encode(text, add_special_tokens=False), 6, eos)
        expected.append(tokenizer.decode([t for t in new if t not in eos], skip_special_tokens=True))
    heldout = [dict(ROWS[0], output=expected[0]), dict(ROWS[1], output=expected[1] + " wrong"),
               dict(ROWS[2], output=expected[2])]
    (tmp_path / "heldout.json").write_text(json.dumps(heldout, ensure_ascii=False))
    (tmp_path / "metrics.json").write_text(json.dumps({"loss": [1.0]}))

    result = evaluate_heldout(tmp_path / "w.ckpt", cfg, tmp_path / "tok", tmp_path / "heldout.json",
                              metrics_path=tmp_path / "metrics.json", max_new_tokens=6,
                              samples_path=tmp_path / "samples.jsonl")
    assert result["heldout_correct"] == 2 and result["heldout_total"] == 3
    assert result["heldout_accuracy"] == pytest.approx(2 / 3)
    assert result["heldout_by_task"] == {"add_small": 0.0, "copy_words": 1.0, "reverse_letters": 1.0}
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["loss"] == [1.0] and metrics["heldout_accuracy"] == pytest.approx(2 / 3)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["answer"] for s in samples] == expected


def test_heldout_file_errors_name_the_row(tmp_path):
    (tmp_path / "h.json").write_text(json.dumps([{"instruction": "x", "output": "y"}, {"instruction": "z"}]))
    with pytest.raises(UserError, match=r"h.json: row 1 lacks"):
        read_heldout(tmp_path / "h.json")
    with pytest.raises(UserError, match="does not exist"):
        read_heldout(tmp_path / "nope.json")
