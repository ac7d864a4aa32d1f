"""``dotattn diagnose``: the real all-MiniLM-L6-v2 run through dotattn under a ``diagnostics.Monitor``.

Every sentence is run on its own (no padding rows to blur the statistics) and the calls
add up per layer; the table has one line per layer and head, and heads that are
saturated, near-uniform, sinks on the first token, or saw masked or non-finite rows are
flagged. A heatmap of the three key statistics (layers x heads) goes to ``--out``.

``--train`` instead trains a small transformer twice on CPU at a high learning rate, with
plain attention and with QK-layernorm, under a watching Monitor, and reports how far ahead
of the plain run's loss spike the first alert came (``dotattn.cli.instability``); the plot
goes to ``--out``.

``--logs DIR`` instead reads what ``Monitor.to_tensorboard`` wrote during a training run:
per layer, the recorded steps, the lowest head entropy and the max logit, and the early
warnings of ``diagnostics.Watch`` (``--entropy-below``, ``--logit-growth``, ``--window``).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

import dotattn
from dotattn.cli.demo import SENTENCE
from dotattn.cli.explain import load_model
from dotattn._text import table
from dotattn.diagnostics import Monitor

SENTENCES = (
    SENTENCE,
    "The animal didn't cross the street because it was too tired.",
    "Attention is what teams reach for when they debug a model in production.",
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("diagnose", help="per layer and head attention statistics of a real model, with flags")
    p.add_argument("sentences", nargs="*", default=list(SENTENCES), help="default: three example sentences")
    p.add_argument("--engine", default="auto", help="engine that runs the model's attention (default auto)")
    p.add_argument("--saturated", type=float, default=0.9, help="flag heads whose mean max prob exceeds this")
    p.add_argument("--uniform", type=float, default=0.9, help="flag heads whose normalized entropy exceeds this")
    p.add_argument("--sink", type=float, default=0.5, help="flag heads whose first-token mass exceeds this")
    p.add_argument("--out", type=Path, default=Path("out/diagnose"), help="folder for the PNG (default out/diagnose)")
    p.add_argument("--train", action="store_true",
                   help="train a small transformer into instability and back it with QK-layernorm, under a watch")
    p.add_argument("--seed", type=int, default=0, help="with --train: the seed of both runs")
    p.add_argument("--logs", type=Path, help="read a training run's TensorBoard logs (Monitor.to_tensorboard) instead")
    p.add_argument("--entropy-below", type=float, default=0.1, help="with --logs: alert below this head entropy (nats)")
    p.add_argument("--logit-growth", type=float, default=5.0,
                   help="with --logs: alert when a max logit rises more than this within --window steps")
    p.add_argument("--window", type=int, default=100, help="with --logs: the logit-growth window, in steps")
    p.set_defaults(run=run)


def read_logs(args: argparse.Namespace) -> int:
    """Summarise a run's TensorBoard logs and replay the early-warning rules over them."""
    from dotattn.diagnostics import Watch, read_tensorboard

    series = read_tensorboard(args.logs)
    if not series:
        raise ValueError(f"no attention scalars under {args.logs}; write them with Monitor.to_tensorboard(writer)")
    watch = Watch(args.entropy_below, args.logit_growth, args.window)
    rows, alerts = [], []
    for layer, figures in series.items():
        entropy, logit = dict(figures.get("entropy_min", [])), dict(figures.get("max_logit", []))
        for step in sorted(entropy.keys() & logit.keys()):
            alerts += watch.check(step, layer, torch.tensor([entropy[step]]), torch.tensor([logit[step]]), [None])
        steps = sorted(entropy)
        low = min(entropy.items(), key=lambda kv: kv[1]) if entropy else (None, float("nan"))
        rows.append([layer, str(len(steps)), f"{steps[0]}-{steps[-1]}" if steps else "",
                     f"{low[1]:.3f} (step {low[0]})", f"{logit[max(logit)]:.2f}" if logit else "",
                     f"{max(logit.values()):.2f}" if logit else ""])
    print(f"attention figures in {args.logs} (entropy in nats, over each layer's heads):")
    print(table(["layer", "recorded steps", "steps", "lowest entropy", "last max logit", "highest max logit"], rows))
    print(f"\nearly warnings (entropy below {args.entropy_below}, max logit rising over {args.logit_growth} "
          f"within {args.window} steps): {len(alerts)}")
    for alert in sorted(alerts, key=lambda a: a.step):
        print(f"  {alert}")
    return 0


def diagnose(sentences: list[str], engine: str = "auto") -> Monitor:
    """A Monitor that saw all-MiniLM-L6-v2 run every sentence through dotattn (the ``engine``)."""
    import dotattn.hf

    tokenizer, model = load_model()
    previous = model.config._attn_implementation
    model.set_attn_implementation(dotattn.hf.register())
    try:
        with Monitor(model) as monitor, dotattn.use_engine(engine), torch.no_grad():
            for sentence in sentences:
                model(**tokenizer(sentence, return_tensors="pt"))
    finally:
        model.set_attn_implementation(previous)
    return monitor


def train(args: argparse.Namespace) -> int:
    """Both instability runs under a watching Monitor, their reports and the plot."""
    from dotattn.cli import instability

    print("a 2-layer transformer on a copy task, AdamW lr 0.2, under Monitor(model).watch(entropy_below="
          f"{instability.ENTROPY_BELOW}, logit_growth={instability.LOGIT_GROWTH:g}, window={instability.WINDOW})\n")
    runs = [instability.train(qk_norm, args.seed) for qk_norm in (False, True)]
    for run in runs:
        print(instability.report(run) + "\n")
    try:
        path = args.out / "instability.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        instability.plot(runs, str(path), f"lr 0.2, warmup 100, seed {args.seed}")
        print(f"wrote {path}")
    except ImportError:
        print("matplotlib is not installed, so no plot (pip install 'dotattn[plots]')")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.logs is not None:
        return read_logs(args)
    if args.train:
        return train(args)
    if not args.sentences:
        raise ValueError("give at least one sentence, or none for the defaults")
    monitor = diagnose(args.sentences, args.engine)
    print(f"all-MiniLM-L6-v2 through dotattn (engine {args.engine}), {len(args.sentences)} sentence(s):")
    for s in args.sentences:
        print(f"  {s}")
    print("\nper layer and head, over every query row (entropy in nats; normalized: 1 = uniform, 0 = one-hot):")
    print(monitor.table())
    flags = monitor.flags(args.saturated, args.uniform, args.sink)
    counts = Counter(f.what for f in flags)
    heads = sum(s.heads for s in monitor)
    print(f"\nflags: {len(flags)} on {heads} heads" + ("" if not flags else ": " + ", ".join(
        f"{n} {what}" for what, n in counts.items())))
    for f in flags:
        print(f"  {f}")
    path = monitor.plot(args.out / "diagnose.png", f"all-MiniLM-L6-v2, {len(args.sentences)} sentence(s)")
    print(f"\nwrote {path}")
    return 0
