"""The dotattn command."""

from __future__ import annotations

import subprocess
import sys

from dotattn.cli import main


def test_demo_walks_through_the_four_steps(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "'Bill is going to the theatre to watch a new movie'  (11 tokens" in out
    for step in ["shape (11, 64)", "step 1, first matmul", "shape (11, 11)", "step 2, scale",
                 "step 3, row softmax", "step 4, second matmul", "shape (11, 24)"]:
        assert step in out
    # the literal steps and the library agree to float32 rounding
    line = next(l for l in out.splitlines() if l.startswith("dotattn.scaled_dot_product_attention"))
    assert float(line.split("max |difference| ")[1].split()[0]) < 1e-5


def test_demo_causal_hides_later_words(capsys):
    assert main(["demo", "the cat sat", "--causal"]) == 0
    out = capsys.readouterr().out
    row = next(l for l in out.splitlines() if l.strip().startswith("the ") and "0.00" in l)
    assert row.split()[1:] == ["1.00", "0.00", "0.00"]


def test_console_script_entry_point():
    done = subprocess.run([sys.executable, "-m", "dotattn.cli", "demo", "a b"], capture_output=True, text=True)
    assert done.returncode == 0 and "step 4" in done.stdout
