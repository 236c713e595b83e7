"""The experiments' tables (markdown, in the style of the paper's Tables 3, 7 and 8) and plots.

Every figure is computed from the run results passed in; nothing is typed in by hand.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np

INIT_LABELS = {"lsuv": "LSUV", "orthonormal": "OrthoNorm", "xavier": "Xavier", "msra": "MSRA"}
CHANCE_LOSS = math.log(10.0)  # cross-entropy of a uniform guess over the 10 digits
NC_LOSS = 0.9 * CHANCE_LOSS  # a final training loss above this: "n/c", the net did not learn


def not_converged(run: dict) -> bool:
    """The paper's "n/c": the loss went non-finite, or never fell clearly below chance."""
    return run["diverged"] or not run["train_loss"] or run["train_loss"][-1] > NC_LOSS


def epochs_to(run: dict, threshold: float) -> int | None:
    """The first epoch (1-based) whose test accuracy reached ``threshold``."""
    return next((i + 1 for i, a in enumerate(run["test_acc"]) if a >= threshold), None)


def _cell(runs: Sequence[dict], threshold: float) -> str:
    """Mean final test accuracy over the seeds that learned, then per seed the epoch at which
    the test accuracy reached ``threshold`` ("-": never, "n/c": did not converge)."""
    learned = [r for r in runs if not not_converged(r)]
    if not learned:
        return "n/c"
    acc = statistics.mean(r["test_acc"][-1] for r in learned) * 100
    marks = ["n/c" if not_converged(r) else str(epochs_to(r, threshold) or "-") for r in runs]
    return f"{acc:.1f} ({', '.join(marks)})"


def table3(results: Sequence[dict], arch: str, activations: Sequence[str],
           inits: Sequence[str], threshold: float, lsuv_batch: int) -> str:
    """Init x activation: final test accuracy (epochs to ``threshold``), or n/c."""
    head = "| init | " + " | ".join(activations) + " |"
    lines = [head, "|---|" + "---|" * len(activations)]
    for init in inits:
        cells = []
        for act in activations:
            runs = _select(results, arch=arch, activation=act, init=init,
                           lsuv_batch=lsuv_batch)
            cells.append(_cell(runs, threshold) if runs else "")
        lines.append(f"| {INIT_LABELS[init]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table7(results: Sequence[dict], arch: str, activation: str, sizes: Sequence[int],
           threshold: float) -> str:
    """LSUV's batch size x (accuracy, epochs, how well the batch's variance held)."""
    lines = ["| LSUV batch | " + " | ".join(map(str, sizes)) + " |",
             "|---|" + "---|" * len(sizes)]
    per_size = [_select(results, arch=arch, activation=activation, init="lsuv",
                        lsuv_batch=size) for size in sizes]
    lines.append(f"| test accuracy, % (epochs to {threshold * 100:.0f}%) | "
                 + " | ".join(_cell(runs, threshold) if runs else "" for runs in per_size)
                 + " |")
    lines.append("| worst \\|var - 1\\| of a layer output, held-out test images | "
                 + " | ".join(f"{max(r['test_var_worst'] for r in runs):.2f}" if runs else ""
                              for runs in per_size) + " |")
    return "\n".join(lines)


def table8(results: Sequence[dict], arch: str, columns: Sequence[tuple[str, str]],
           lsuv_batch: int, field: str = "weight_std") -> str:
    """A per-layer figure at initialisation (``field``: the weight std, or the gradient
    ratio), one column per (activation, init), seed 0."""
    picked = []
    for act, init in columns:
        runs = _select(results, arch=arch, activation=act, init=init, lsuv_batch=lsuv_batch,
                       seed=0)
        picked.append(runs[0] if runs else None)
    names = next((r[field] for r in picked if r is not None), {})
    head = "| layer | " + " | ".join(f"{INIT_LABELS[i]} ({a})" for a, i in columns) + " |"
    lines = [head, "|---|" + "---:|" * len(columns)]
    for name in names:
        cells = [f"{r[field][name]:.4g}" if r is not None else "" for r in picked]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gain_table(results: Sequence[dict], arch: str, activations: Sequence[str],
               inits: Sequence[str], lsuv_batch: int, fan_ins: dict[str, dict[str, int]],
               analytic: dict[str, float | None]) -> str:
    """Init x activation: the median over the hidden layers (all but the first and the last)
    of std(W) * sqrt(fan_in), seed 0: the gain an init gives a layer, in the units of
    ``torch.nn.init.calculate_gain`` (``analytic``, per activation; None where it has none)."""
    lines = ["| init | " + " | ".join(activations) + " |",
             "|---|" + "---:|" * len(activations)]
    for init in inits:
        cells = []
        for act in activations:
            runs = _select(results, arch=arch, activation=act, init=init,
                           lsuv_batch=lsuv_batch, seed=0)
            if not runs:
                cells.append("")
                continue
            hidden = list(runs[0]["weight_std"].items())[1:-1]
            gains = [std * math.sqrt(fan_ins[act][label]) for label, std in hidden]
            cells.append(f"{statistics.median(gains):.2f}")
        lines.append(f"| {INIT_LABELS[init]} | " + " | ".join(cells) + " |")
    lines.append("| calculate_gain | " + " | ".join(
        "" if analytic.get(act) is None else f"{analytic[act]:.2f}" for act in activations)
        + " |")
    return "\n".join(lines)


def _select(results: Sequence[dict], **where) -> list[dict]:
    """The runs whose config matches ``where``, by seed; the paper's LSUV unless a
    ``variant`` is named (runs written before variants existed have none)."""
    where.setdefault("variant", "")
    out = [r for r in results
           if all(r["config"].get(k, "") == v for k, v in where.items())]
    return sorted(out, key=lambda r: r["config"]["seed"])


VARIANT_LABELS = {"": "LSUV (the paper)", "mean0": "LSUV, target mean 0 (`target_mean=0`)",
                  "per_channel": "LSUV per channel (`per_channel=True`)"}


def table_variants(results: Sequence[dict], arch: str, activation: str,
                   variants: Sequence[str], threshold: float, lsuv_batch: int) -> str:
    """LSUV and its variants on one net and activation: accuracy (epochs to the threshold),
    onnx-lsuv's verdict, the time of the init, the worst |var - 1| of a layer output on the
    held-out images (``training.worst_variance_error``)."""
    lines = [f"| init | test accuracy, % (epochs to {threshold * 100:.0f}%) | every layer "
             "converged | init time, s | worst \\|var - 1\\|, held-out |",
             "|---|---|---|---:|---:|"]
    for variant in ("", *variants):
        runs = _select(results, arch=arch, activation=activation, init="lsuv",
                       lsuv_batch=lsuv_batch, variant=variant)
        if not runs:
            continue
        ok = sum(bool(r["lsuv_converged"]) for r in runs)
        lines.append(f"| {VARIANT_LABELS[variant]} | {_cell(runs, threshold)} | {ok} of "
                     f"{len(runs)} | {np.mean([r['init_s'] for r in runs]):.2f} | "
                     f"{max(r['test_var_worst'] for r in runs):.2f} |")
    return "\n".join(lines)


def plot_curves(results: Sequence[dict], arch: str, activations: Sequence[str],
                inits: Sequence[str], lsuv_batch: int, path: str, title: str) -> None:
    """The main grid's curves: one column per activation, a line per init."""
    colors = dict(zip(INIT_LABELS, ("tab:red", "tab:blue", "tab:green", "tab:purple")))
    columns = [(act, [(INIT_LABELS[init], colors[init],
                       _select(results, arch=arch, activation=act, init=init,
                               lsuv_batch=lsuv_batch)) for init in inits])
               for act in activations]
    _plot_columns(columns, path, title)


def plot_batch_sizes(results: Sequence[dict], arch: str, activation: str,
                     sizes: Sequence[int], path: str, title: str) -> None:
    """The Table 7 runs' curves: a line per LSUV batch size."""
    cmap = ("tab:gray", "tab:olive", "tab:cyan", "tab:red", "tab:brown")
    lines = [(f"batch {n}", cmap[i % len(cmap)],
              _select(results, arch=arch, activation=activation, init="lsuv", lsuv_batch=n))
             for i, n in enumerate(sizes)]
    _plot_columns([(f"LSUV, {activation}", lines)], path, title)


def _plot_columns(columns, path: str, title: str) -> None:
    """Training loss (top) and test accuracy (bottom) per epoch; per column, lines given as
    (label, color, runs): seed 0 solid, other seeds faint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(columns), figsize=(3.2 * max(len(columns), 2), 5.6),
                             squeeze=False, sharex=True)
    for col, (name, lines) in enumerate(columns):
        loss_ax, acc_ax = axes[0][col], axes[1][col]
        for label, color, runs in lines:
            for r in runs:
                epochs = range(1, len(r["train_loss"]) + 1)
                first = r["config"]["seed"] == 0
                style = dict(color=color, alpha=1.0 if first else 0.3, lw=1.4,
                             label=label if first else None)
                loss_ax.plot(epochs, r["train_loss"], **style)
                acc_ax.plot(epochs, [a * 100 for a in r["test_acc"]], **style)
        loss_ax.set_title(name)
        loss_ax.set_yscale("log")
        acc_ax.set_ylim(0, 100)
        acc_ax.set_xlabel("epoch")
        if col == 0:
            loss_ax.set_ylabel("training loss")
            acc_ax.set_ylabel("test accuracy, %")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
