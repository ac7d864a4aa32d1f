"""``dotattn engines``: the support matrix, read from what each registered engine declares.

Nothing here names an engine: a newly registered one shows up by itself.
"""

from __future__ import annotations

import argparse

import torch

import dotattn
from dotattn import engines
from dotattn.engines import Engine
from dotattn._text import table
from dotattn.engines.base import dtype_name

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# the dtypes whose `detail` is worth showing: those the CPU engines have more than one way to run
DETAIL_DTYPES = (torch.float32, torch.bfloat16)


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("engines", help="print what every registered engine supports")
    p.set_defaults(run=run)


def runs_on_cpu(engine: Engine) -> bool:
    devices = engine.support.devices
    return devices is None or "cpu" in devices


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _dtype_cell(s, dtype: torch.dtype) -> str:
    """yes, no, or the devices that take ``dtype`` when only some of them do."""
    if s.dtypes_on is None or dtype not in s.dtypes:
        return _yes(dtype in s.dtypes)
    on = [device for device, dtypes in s.dtypes_on.items() if dtype in dtypes]
    return "yes" if len(on) == len(s.dtypes_on) else ", ".join(on)


def _row(engine: Engine) -> list[str]:
    s = engine.support
    masks = "all" if s.mask_kinds is None else ", ".join(k.__name__ for k in s.mask_kinds)
    return [
        engine.name,
        str(engine.priority),
        "any" if s.devices is None else ", ".join(s.devices),
        *(_dtype_cell(s, d) for d in DTYPES),
        masks,
        _yes(s.dropout),
        _yes(s.backward),
        _yes(s.weights),
        "any" if s.max_head_dim is None else str(s.max_head_dim),
    ]


def _detail(engine: Engine, dtype: torch.dtype) -> str:
    """How ``engine`` runs a tiny CPU problem in ``dtype`` (e.g. compiled kernel or fallback)."""
    q, k, v = (torch.zeros(1, 2, 8, 16, dtype=dtype) for _ in range(3))
    why = dotattn.explain(q, k, v, engine=engine.name)
    if why.engine is None:
        return "cannot run it: " + "; ".join(r for reasons in why.rejected.values() for r in reasons)
    return why.detail or "one way only"


def run(args: argparse.Namespace) -> int:
    header = ["engine", "priority", "devices", *(dtype_name(d) for d in DTYPES),
              "masks", "dropout", "backward", "weights", "max head dim"]
    registered = engines.available()
    print(table(header, [_row(e) for e in registered]))
    print()
    for e in registered:
        print(f"{e.name}: {e.description}")
        if runs_on_cpu(e):
            for dtype in DETAIL_DTYPES:
                if dtype in e.support.dtypes:
                    print(f"  cpu {dtype_name(dtype)}, B1 H2 L8 E16: {_detail(e, dtype)}")
    return 0
