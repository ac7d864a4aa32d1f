"""dotattn.diagnostics.Monitor in training and serving: statistics the kernel computes while it
runs (against the tile-pass oracle), sampling, step reports, exporters and early warnings."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

import dotattn
from dotattn import diagnostics, engines, masks
from dotattn._inputs import prepare
from dotattn.engines import _tiled_kernel
from dotattn.nn import MultiHeadAttention
from tests.conftest import TRITON_MISSING, qkv

FUSED_MASKS = {
    "none": None,
    "causal": masks.causal(),
    "padding": masks.padding([70, 0, 33]) & masks.causal(align="bottom_right"),
    "window": masks.sliding_window(20),
    "documents": masks.documents(torch.tensor([0] * 30 + [1] * 40 + [2] * 30)),
    "prefix": masks.prefix_lm(25),
    "float_bias": masks.dense(torch.randn(3, 1, 100, 100, generator=torch.Generator().manual_seed(1))),
    "block_sparse": masks.block_sparse(torch.rand(2, 2, generator=torch.Generator().manual_seed(2)) > 0.4, 64),
}


# the masks a decoding step brings to the split-K kernel: one span of keys per query
SPLIT_K_MASKS = {
    "none": None,
    "cache": masks.causal(align="bottom_right"),
    "left_padding": masks.padding([700, 0, 301], side="left") & masks.causal(align="bottom_right"),
    "window": masks.sliding_window(200, 0, align="bottom_right"),
    "first_key_hidden": masks.sliding_window(600, 0, align="bottom_right"),
}


def _fused_and_oracle(q, k, v, engine="tiled", **kwargs):
    problem = dataclasses.replace(prepare(q, k, v, enable_gqa=True, return_lse=True, **kwargs), stats=True)
    result = engines.get(engine).run(problem)
    assert "row_stats" in problem.derived, f"the {engine} kernel left no row statistics"
    return (diagnostics.measure_fused(problem, result, problem.derived["row_stats"], "x"),
            diagnostics.measure(problem, result, "x"))


def _assert_equal_stats(fused, oracle):
    assert (fused.name, fused.calls) == (oracle.name, oracle.calls)
    for name in ("rows", "masked_rows", "nonfinite_rows", "pairs"):
        assert torch.equal(getattr(fused, name), getattr(oracle, name)), name
    # the figures a monitor reports, each within the rule relative to its size (at least 1)
    for name in ("entropy", "normalized_entropy", "max_prob", "first_token_mass", "score_mean", "score_std",
                 "max_logit"):
        a, b = getattr(fused, name), getattr(oracle, name)
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), name
        ok = torch.isfinite(b)
        err = ((a - b).abs() / b.abs().clamp(min=1.0))[ok]
        tol = 1e-4 if "entropy" in name else 1e-5
        assert err.numel() == 0 or err.max().item() <= tol, (name, err.max().item())


@pytest.mark.skipif(_tiled_kernel.MISSING is not None, reason="the compiled kernel is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask_name", list(FUSED_MASKS))
def test_kernel_statistics_equal_the_tile_pass(mask_name, dtype):
    q, k, v = qkv(3, 4, 100, 16, Hkv=2, dtype=dtype)
    _assert_equal_stats(*_fused_and_oracle(q, k, v, mask=FUSED_MASKS[mask_name]))


@pytest.mark.skipif(_tiled_kernel.MISSING is not None, reason="the compiled kernel is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask_name", list(SPLIT_K_MASKS))
@pytest.mark.parametrize("Lq", [1, 3])
def test_split_k_statistics_equal_the_tile_pass(mask_name, dtype, Lq):
    # 700 keys: two or more parts per (batch, kv head), merged with their statistics
    q, k, v = qkv(3, 8, Lq, 64, Hkv=1, Lk=700, dtype=dtype)
    fused, oracle = _fused_and_oracle(q, k, v, engine="split_k", mask=SPLIT_K_MASKS[mask_name])
    problem = prepare(q, k, v, enable_gqa=True, mask=SPLIT_K_MASKS[mask_name])
    split_k = engines.get("split_k")
    assert split_k.fallback_reason(problem) is None and split_k.parts(problem) >= 2  # the kernel's own figures
    _assert_equal_stats(fused, oracle)


# "triton" as a parameter: conftest runs the engine in Triton's interpreter for such tests (float32;
# its bfloat16 runs upcast there)
TRITON = [pytest.param("triton", marks=pytest.mark.skipif(TRITON_MISSING is not None, reason=str(TRITON_MISSING)))]


@pytest.mark.parametrize("engine", TRITON)
@pytest.mark.parametrize("mask_name", list(FUSED_MASKS))
def test_triton_statistics_equal_the_tile_pass(mask_name, engine):
    q, k, v = qkv(3, 4, 100, 16, Hkv=2)
    _assert_equal_stats(*_fused_and_oracle(q, k, v, engine=engine, mask=FUSED_MASKS[mask_name]))


@pytest.mark.parametrize("engine", [pytest.param("split_k_triton", marks=TRITON[0].marks)])
@pytest.mark.parametrize("mask_name", ["none", "left_padding", "first_key_hidden"])
def test_split_k_triton_statistics_equal_the_tile_pass(mask_name, engine):
    # the split-K engine's CUDA kernels in the interpreter; 700 keys in two parts, merged
    q, k, v = qkv(3, 8, 1, 64, Hkv=1, Lk=700)
    problem = dataclasses.replace(prepare(q, k, v, enable_gqa=True, return_lse=True, mask=SPLIT_K_MASKS[mask_name]),
                                  stats=True)
    from dotattn.engines.triton import launch
    launch.split_k_decode(problem, parts=2)
    result = engines.get(engine).run(dataclasses.replace(problem, stats=False))
    _assert_equal_stats(diagnostics.measure_fused(problem, result, problem.derived["row_stats"], "x"),
                        diagnostics.measure(problem, result, "x"))


@pytest.mark.parametrize("engine", TRITON)
def test_triton_statistics_with_softcap_and_dropout(engine):
    q, k, v = qkv(2, 2, 40, 8, Lk=50)
    mask = masks.padding([50, 20], q_lengths=[40, 10])
    for extra in ({"softcap": 5.0}, {"dropout_p": 0.3, "generator": torch.Generator().manual_seed(0)}):
        fused, oracle = _fused_and_oracle(q * 6, k, v, engine=engine, mask=mask, **extra)
        _assert_equal_stats(fused, oracle)  # dropout: the statistics of the weights before it


@pytest.mark.skipif(_tiled_kernel.MISSING is not None, reason="the compiled kernel is not built")
def test_split_k_statistics_with_softcap():
    q, k, v = qkv(2, 4, 1, 32, Hkv=1, Lk=600)
    fused, oracle = _fused_and_oracle(q * 6, k, v, engine="split_k", softcap=5.0,
                                      mask=masks.padding([600, 77], side="left"))
    _assert_equal_stats(fused, oracle)
    assert (fused.max_logit <= 5.0).all()


@pytest.mark.skipif(_tiled_kernel.MISSING is not None, reason="the compiled kernel is not built")
def test_kernel_statistics_with_softcap_and_fully_masked_rows():
    q, k, v = qkv(2, 2, 40, 8, Lk=50)
    q = q * 6
    mask = masks.padding([50, 20], q_lengths=[40, 10])
    fused, oracle = _fused_and_oracle(q, k, v, mask=mask, softcap=5.0)
    assert fused.masked_rows.tolist() == oracle.masked_rows.tolist() == [30.0, 30.0]
    for name in ("entropy_sum", "max_prob_sum", "first_mass_sum", "score_sum", "max_logit"):
        torch.testing.assert_close(getattr(fused, name), getattr(oracle, name), atol=1e-4, rtol=1e-5, msg=name)
    assert (fused.max_logit <= 5.0).all()


def test_every_n_steps_records_those_steps_only():
    q, k, v = qkv(1, 2, 16, 8)
    with diagnostics.Monitor(every=3) as monitor:
        recorded = []
        for _ in range(7):
            recorded.append(monitor.recording)
            dotattn.scaled_dot_product_attention(q, k, v)
            monitor.step()
    assert recorded == [True, False, False, True, False, False, True]
    assert [r.step for r in monitor.history] == [0, 3, 6]
    assert monitor.layers["call 0"].calls == 3  # unnamed calls are numbered within their step


def test_sampling_is_seeded_and_records_about_its_share():
    def steps(seed):
        monitor = diagnostics.Monitor(sample=0.25, seed=seed)
        out = []
        for _ in range(400):
            out.append(monitor.recording)
            monitor.step()
        return out

    a = steps(1)
    assert a == steps(1) and a != steps(2)
    assert 0.18 < sum(a) / len(a) < 0.32


def test_each_forward_of_the_model_is_a_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(MultiHeadAttention(16, 4), MultiHeadAttention(16, 2))
    x = torch.randn(2, 10, 16)
    seen = []
    plain = model(x)
    with diagnostics.Monitor(model, every=2) as monitor:
        monitor.add_exporter(seen.append)
        for _ in range(5):
            assert torch.equal(model(x), plain)  # the step-ending hook leaves the output alone
    assert [r.step for r in seen] == [0, 2, 4]
    assert list(seen[0].layers) == ["0", "1"] and seen[0].layers["1"].heads == 2
    assert monitor.layers["0"].calls == 3


def test_logging_exporter_writes_each_layer(caplog):
    q, k, v = qkv(1, 2, 16, 8)
    with caplog.at_level(logging.INFO, logger="dotattn"):
        with diagnostics.Monitor().to_logging():
            dotattn.scaled_dot_product_attention(q, k, v)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("attention step 0 call 0: entropy min") and "max logit" in line


def test_tensorboard_exporter_event_file_reads_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    q, k, v = qkv(1, 4, 16, 8)
    writer = SummaryWriter(tmp_path)
    with diagnostics.Monitor().to_tensorboard(writer) as monitor:
        for scale in (1.0, 2.0, 4.0):
            dotattn.scaled_dot_product_attention(q * scale, k, v)
            monitor.step()
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert "attention/call 0/entropy_min" in tags["scalars"]
    logits = [e.value for e in events.Scalars("attention/call 0/max_logit")]
    assert [e.step for e in events.Scalars("attention/call 0/max_logit")] == [0, 1, 2]
    assert logits[0] < logits[1] < logits[2]
    torch.testing.assert_close(torch.tensor(logits[-1]), monitor.history[-1].layers["call 0"].max_logit.max().float())
    assert {"attention/entropy", "attention/max_logit"} <= set(tags["images"])


def test_watch_flags_entropy_collapse_and_logit_growth_once_per_head():
    q, k, v = qkv(1, 2, 32, 8)
    alerts = []
    monitor = diagnostics.Monitor().watch(entropy_below=0.5, logit_growth=10.0, window=3)
    monitor.add_exporter(lambda r: alerts.extend(r.alerts))
    with monitor, pytest.warns(diagnostics.AttentionInstabilityWarning, match="head 1: "):
        for step in range(6):
            q_step = q.clone()
            q_step[:, 1] *= 1 + 3 * step  # head 1's logits grow step by step; head 0 stays
            dotattn.scaled_dot_product_attention(q_step, k, v)
            monitor.step()
    kinds = {(a.head, a.what) for a in alerts}
    assert (1, "logit growth") in kinds and (1, "entropy collapse") in kinds
    assert not any(a.head == 0 for a in alerts)
    assert len(alerts) == len(kinds)  # each head and kind alerts once
    first = min(a.step for a in alerts if a.what == "logit growth")
    assert 0 < first < 5


def test_a_steady_run_raises_no_alert():
    q, k, v = qkv(1, 2, 32, 8)
    with diagnostics.Monitor().watch(entropy_below=0.5, logit_growth=10.0) as monitor:
        for _ in range(5):
            dotattn.scaled_dot_product_attention(q, k, v)
            monitor.step()
    assert all(not r.alerts for r in monitor.history) and len(monitor.history) == 5


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="every must be a positive int"):
        diagnostics.Monitor(every=0)
    with pytest.raises(ValueError, match="sample must be a probability"):
        diagnostics.Monitor(sample=1.5)
    with pytest.raises(ValueError, match="'forward' with a model"):
        diagnostics.Monitor(steps="forward")
    with pytest.raises(ValueError, match="entropy_below=, logit_growth="):
        diagnostics.Monitor().watch()


def test_trainer_callback_records_every_n_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import dotattn.hf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32,
                                      attn_implementation=dotattn.hf.register())
    model = transformers.LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (12, 16), generator=g)]
    seen = []
    callback = dotattn.hf.MonitorCallback(diagnostics.Monitor(every=2).add_exporter(seen.append))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=2,
                                          report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert [r.step for r in seen] == [0, 2, 4]
    assert list(seen[0].layers) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert seen[0].layers["model.layers.0.self_attn"].heads == 4
    assert diagnostics.active() is None and callback.monitor.model is None
    with pytest.raises(ValueError, match="without a model"):
        dotattn.hf.MonitorCallback(diagnostics.Monitor(model))


def test_diagnose_reads_the_logs_back_and_replays_the_watch(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    from dotattn.cli import main

    q, k, v = qkv(1, 4, 32, 8)
    writer = SummaryWriter(tmp_path)
    with diagnostics.Monitor().to_tensorboard(writer) as monitor:
        for step in range(8):
            grown = q.clone()
            grown[:, 1] *= 1 + 2 * step  # one head of call 0 grows its logits; call 1 stays
            dotattn.scaled_dot_product_attention(grown, k, v)
            dotattn.scaled_dot_product_attention(q, k, v)
            monitor.step()
    writer.close()
    series = diagnostics.read_tensorboard(tmp_path)
    assert set(series) == {"call 0", "call 1"} and [s for s, _ in series["call 0"]["max_logit"]] == list(range(8))
    assert main(["diagnose", "--logs", str(tmp_path), "--window", "4", "--logit-growth", "8",
                 "--entropy-below", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "early warnings" in out and "call 0 a head: logit growth" in out and "call 0 a head: entropy collapse" in out
    assert "call 1 a head" not in out


def test_the_watch_flags_the_diverging_run_ahead_of_its_spike_and_not_the_stable_one():
    from dotattn.cli import instability

    plain = instability.train(qk_norm=False, seed=0, steps=100)
    stable = instability.train(qk_norm=True, seed=0, steps=100)
    assert plain.spike is not None and plain.flag is not None
    assert plain.spike - plain.flag.step >= 20  # seed 0: alert at 43, spike at 85
    assert stable.spike is None and stable.flag is None
    assert plain.max_logit[plain.spike].max() > 10 * stable.max_logit[plain.spike].max()
