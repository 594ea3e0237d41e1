"""A picture of a training run: python -m tritonmoe.dsv3.plot RUN_DIR [--out FILE.png]

In: RUN_DIR/metrics.jsonl as the trainer writes it. Out: one PNG (default RUN_DIR/run.png) with
- the loss curves against trained tokens: training LM and MTP losses, and the validation loss where measured;
- the expert load of the newest full count (the last --load-every window the trainer recorded): a heatmap of MoE
  layers (MTP layers included) x experts, each layer's counts divided by its mean (1 = balanced);
- every MoE layer's max/mean token load over tokens.
matplotlib is an optional extra (pip install 'tritonmoe[plot]'); it runs without a display (the Agg backend).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .run_dir import METRICS_FILE, read_metrics


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's PNG; returns its path. ValueError naming the file when there is nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import EngFormatter, MaxNLocator
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install 'tritonmoe[plot]'") from None
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        raise ValueError(f"{metrics} does not exist: RUN_DIR must be a training run's output folder")
    records = read_metrics(metrics)
    if not records:
        raise ValueError(f"{metrics} holds no step yet")
    out = Path(out) if out is not None else run_dir / "run.png"

    tokens = [r.get("tokens", r["step"]) for r in records]
    x_label = "tokens trained" if "tokens" in records[0] else "step"
    full = [r for r in records if "expert_counts" in r]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), gridspec_kw={"width_ratios": [1.2, 1.2, 1]})
    ax = axes[0]
    ax.plot(tokens, [r["lm_loss"] for r in records], label="train LM", lw=1.2)
    if any(r.get("mtp_loss") for r in records):
        ax.plot(tokens, [r["mtp_loss"] for r in records], label="train MTP (mean over depths)", lw=1.0, alpha=0.8)
    val = [(t, r["val_loss"]) for t, r in zip(tokens, records) if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="validation LM", ms=4)
    ax.set(xlabel=x_label, ylabel="loss (nats)", title=f"{run_dir.name}: losses")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.legend()
    ax.grid(alpha=0.3)

    ax = axes[1]
    if full:
        counts = full[-1]["expert_counts"]
        heat = [[c / max(sum(row) / len(row), 1e-12) for c in row] for row in counts]
        im = ax.imshow(heat, aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, label="tokens / mean")
        ax.set_yticks(range(len(counts)))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="expert", ylabel="MoE layer (MTP last)", title=f"expert load, step {full[-1]['step']}")
    else:
        ax.text(0.5, 0.5, "no full expert counts recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()

    ax = axes[2]
    loads = [r["layer_load"] for r in records if "layer_load" in r]
    if loads:
        load_tokens = [t for t, r in zip(tokens, records) if "layer_load" in r]
        for i in range(len(loads[0])):
            ax.plot(load_tokens, [ld[i]["max_over_mean"] for ld in loads], label=f"MoE layer {i}", lw=1)
        ax.set(xlabel=x_label, ylabel="max / mean tokens per expert", title="load imbalance per MoE layer")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
    else:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tritonmoe.dsv3.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a training run's output folder (holding metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG to write (default RUN_DIR/run.png)")
    args = p.parse_args(argv)
    try:
        print(plot_run(args.run_dir, args.out))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
