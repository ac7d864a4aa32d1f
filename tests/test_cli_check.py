"""``dotattn engines`` and ``dotattn check``."""

from __future__ import annotations

from dotattn import engines
from dotattn.cli import main
from dotattn.cli.engines import DTYPES, dtype_name, runs_on_cpu


def test_engines_lists_every_registered_engine_and_its_dtypes(capsys):
    assert main(["engines"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    names = [dtype_name(d) for d in DTYPES]
    assert names == header.split()[3:7]
    starts = [header.index(f" {name} ") + 1 for name in names] + [header.index(" masks ") + 1]
    for e in engines.available():
        line = next(line for line in out.splitlines() if line.split()[:1] == [e.name])
        cells = [line[a:b].strip() for a, b in zip(starts, starts[1:])]
        on = e.support.dtypes_on or {}
        expected = ["no" if d not in e.support.dtypes else
                    ", ".join(dev for dev, dts in on.items() if d in dts) if on and not all(d in dts for dts in on.values())
                    else "yes" for d in DTYPES]
        assert cells == expected, (e.name, cells)
        assert f"{e.name}: {e.description}" in out
    assert "cpu float32, B1 H2 L8 E16: compiled kernel" in out  # the tiled engine's detail


def test_check_quick_passes(capsys):
    assert main(["check", "--quick"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[-1].startswith("check: ") and lines[-1].endswith(" passed, 0 failed")
    assert int(lines[-1].split()[1]) > 0
    for e in engines.available():
        if not runs_on_cpu(e):  # check runs the CPU engines (triton is CUDA-only)
            continue
        assert any(line.split()[:1] == [e.name] for line in lines)
    assert "masked rows" in out and "determinism" in out


def test_check_fails_and_names_an_engine_off_by_one_percent(monkeypatch, capsys):
    engine = engines.get("tiled_torch_ops")
    exact = engine.run

    def off(problem):
        result = exact(problem)
        return result._replace(output=result.output * 1.01)

    monkeypatch.setattr(engine, "run", off)
    assert main(["check", "--quick", "--engine", "tiled_torch_ops"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "engines that fail: tiled_torch_ops" in lines
    failed = [line.split() for line in lines if "FAIL" in line]
    assert failed and all(row[0] == "tiled_torch_ops" for row in failed)
    assert ["tiled_torch_ops", "float32", "padding_small", "output"] == failed[0][:4]
    assert lines[-1].startswith("check: ") and not lines[-1].endswith(" 0 failed")
