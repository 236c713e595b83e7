"""The experiments' tables (markdown, in the style of the paper's Tables 3, 7 and 8) and plots.

Every figure is computed from the run results passed in; nothing is typed in by hand.
"""

from __future__ import annotations

import math
import statistics
import textwrap
from collections.abc import Sequence

import numpy as np

INIT_LABELS = {"lsuv": "LSUV", "orthonormal": "OrthoNorm", "xavier": "Xavier", "msra": "MSRA"}
CHANCE_LOSS = math.log(10.0)  # cross-entropy of a uniform guess over the 10 digits
NC_LOSS = 0.9 * CHANCE_LOSS  # a final training loss above this: "n/c", the net did not learn
DEFAULT_TOL = 0.1  # onnx-lsuv's Tol_var: the study's; other values are the Tol_var study's


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
    """The runs whose config matches ``where``, by seed: the paper's LSUV at the default
    Tol_var, without BatchNormalization, unless ``variant``, ``tol`` or ``bn`` is named (runs
    written before these existed have none of them)."""
    where.setdefault("variant", "")
    where.setdefault("bn", "")
    if where.get("init") == "lsuv":
        where.setdefault("tol", DEFAULT_TOL)
    missing = {"tol": DEFAULT_TOL}  # what a config without the field was run with
    out = [r for r in results
           if all(r["config"].get(k, missing.get(k, "")) == v for k, v in where.items())]
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


# ---- the paper's figures beside ours (experiments/paper.py holds them, quoted) ----

def _paper_row(label: str, cells: Sequence[str]) -> str:
    return f"| {label} | " + " | ".join(cells) + " |"


def table3_with_paper(results: Sequence[dict], arch: str, activations: Sequence[str],
                      inits: Sequence[str], threshold: float, lsuv_batch: int,
                      paper: dict[str, dict[str, str]], table: int) -> str:
    """``table3`` with, under each init's row, the paper's row of the same table."""
    ours = table3(results, arch, activations, inits, threshold, lsuv_batch).splitlines()
    lines = ours[:2]
    for init, row in zip(inits, ours[2:]):
        lines.append(row)
        lines.append(_paper_row(f"{INIT_LABELS[init]}, paper (Table {table})",
                                [paper.get(init, {}).get(act, "") for act in activations]))
    return "\n".join(lines)


def convergence_agreement(results: Sequence[dict], arch: str, activations: Sequence[str],
                          inits: Sequence[str], lsuv_batch: int,
                          paper: dict[str, dict[str, str]], table: int) -> str:
    """One line: in how many init x activation cells "learned / n/c" agrees with the paper
    (a cell of ours learned when any seed did), and the cells where it does not."""
    from paper import converged

    same, differ = 0, []
    for init in inits:
        for act in activations:
            runs = _select(results, arch=arch, activation=act, init=init,
                           lsuv_batch=lsuv_batch)
            if not runs or act not in paper.get(init, {}):
                continue
            ours = any(not not_converged(r) for r in runs)
            theirs = converged(paper[init][act])
            if ours == theirs:
                same += 1
            else:
                differ.append(f"{INIT_LABELS[init]} {act} (ours "
                              f"{'learns' if ours else 'n/c'}, paper "
                              f"{'learns' if theirs else 'n/c'})")
    total = same + len(differ)
    return (f"Converges or not, as in the paper's Table {table}: {same} of {total} cells"
            + (f"; differs in {', '.join(differ)}." if differ else "."))


def table7_with_paper(results: Sequence[dict], arch: str, activation: str,
                      sizes: Sequence[int], threshold: float, paper: dict[int, str]) -> str:
    """``table7`` with the paper's Table 7 row (CIFAR-10 final accuracy) under ours."""
    return table7(results, arch, activation, sizes, threshold) + "\n" + _paper_row(
        "paper (Table 7), CIFAR-10 final accuracy, %", [paper.get(n, "") for n in sizes])


def _seed0(results: Sequence[dict], arch: str, act: str, init: str, lsuv_batch: int):
    runs = _select(results, arch=arch, activation=act, init=init, lsuv_batch=lsuv_batch,
                   seed=0)
    return runs[0] if runs else None


def table_layers_with_paper(results: Sequence[dict], arch: str,
                            columns: Sequence[tuple[str, str]], lsuv_batch: int,
                            paper: dict[tuple[str, str], dict[str, float]],
                            paper_layers: Sequence[str], field: str = "weight_std",
                            fmt: str = ".3g") -> str:
    """A per-layer figure at init, seed 0 (``field``), ours and the paper's side by side, one
    pair of columns per (activation, init). Our layers are matched to ``paper_layers`` in
    graph order (ours has one more: the classifier, which the paper's tables leave out)."""
    picked = [_seed0(results, arch, act, init, lsuv_batch) for act, init in columns]
    names = list(next((r[field] for r in picked if r is not None), {}))
    head = "| layer (paper's) | " + " | ".join(
        f"{INIT_LABELS[i]} ({a}) | paper" for a, i in columns) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(columns)]
    for k, name in enumerate(names):
        theirs = paper_layers[k] if k < len(paper_layers) else None
        cells = []
        for col, r in zip(columns, picked):
            cells.append(f"{r[field][name]:{fmt}}" if r is not None and name in r[field]
                         else "")
            cells.append(f"{paper[col][theirs]:{fmt}}" if theirs in paper.get(col, {})
                         else "")
        lines.append(f"| {name} ({theirs or '-'}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gain_pattern_with_paper(results: Sequence[dict], arch: str,
                            columns: Sequence[tuple[str, str]], lsuv_batch: int,
                            fan_ins: dict[str, dict[str, int]],
                            paper: dict[tuple[str, str], dict[str, float]],
                            paper_fan_ins: dict[str, dict[str, int]],
                            paper_layers: Sequence[str], after_pool: Sequence[int]) -> str:
    """Width-free patterns of the per-layer stds, ours against the paper's, per (activation,
    init): the median gain std x sqrt(fan_in) over the hidden convs (all but the first conv,
    the fc layers left out), and the gain of the convs right after a pool (at positions
    ``after_pool`` among the convs) relative to that median. ``fan_ins`` are ours and
    ``paper_fan_ins`` the paper's net's, per activation, by our layer labels (the same order
    as ``paper_layers``)."""
    lines = ["| figure | " + " | ".join(f"{INIT_LABELS[i]} ({a}) | paper" for a, i in columns)
             + " |", "|---|" + "---:|---:|" * len(columns)]
    median_row, pool_row = [], []
    for col in columns:
        act, init = col
        r = _seed0(results, arch, act, init, lsuv_batch)
        labels = [lab for lab in fan_ins[act] if lab.startswith("conv")]
        for stds, fans, names in (
                (r["weight_std"] if r else None, fan_ins[act], labels),
                ({lab: paper[col][paper_layers[k]] for k, lab in enumerate(labels)}
                 if col in paper else None, paper_fan_ins[act], labels)):
            if stds is None:
                median_row.append("")
                pool_row.append("")
                continue
            gains = [stds[lab] * math.sqrt(fans[lab]) for lab in names]
            med = statistics.median(gains[1:])
            median_row.append(f"{med:.2f}")
            pool_row.append(", ".join(f"{gains[i] / med:.2f}" for i in after_pool))
    lines.append("| median gain, hidden convs | " + " | ".join(median_row) + " |")
    lines.append("| gain after each pool / median | " + " | ".join(pool_row) + " |")
    return "\n".join(lines)


def table10_with_paper(results: Sequence[dict], arch: str, activation: str,
                       inits: Sequence[str], lsuv_batch: int,
                       paper: dict[str, dict[str, float]],
                       paper_layers: Sequence[str]) -> str:
    """The paper's Table 10 statistic (``grad_var``: the gradient's variance per layer over
    the first mini-batches), ours and the paper's, seed 0, and two patterns: the spread over
    the convs (largest / smallest) and the last conv's over the first's."""
    cols = [(activation, i) for i in inits]
    body = table_layers_with_paper(results, arch, cols, lsuv_batch,
                                   {(activation, i): paper[i] for i in inits if i in paper},
                                   paper_layers, field="grad_var", fmt=".2e")
    spread, slope = [], []
    for init in inits:
        r = _seed0(results, arch, activation, init, lsuv_batch)
        for conv in ([v for k, v in r["grad_var"].items() if k.startswith("conv")]
                     if r and r.get("grad_var") else None,
                     [paper[init][k] for k in paper_layers if k.startswith("conv")]
                     if init in paper else None):
            if not conv:
                spread.append("")
                slope.append("")
                continue
            spread.append(f"{max(conv) / min(conv):.3g}")
            slope.append(f"{conv[-1] / conv[0]:.3g}")
    return "\n".join([body, "| largest / smallest, convs | " + " | ".join(spread) + " |",
                      "| last conv / first conv | " + " | ".join(slope) + " |"])


# ---- Table 5 and Figure 3: batch normalisation against LSUV; Tol_var; the modern net ----

def _epoch_s(runs: Sequence[dict]) -> float:
    """Mean training seconds per epoch over ``runs`` (the epochs each ran)."""
    return statistics.mean(r["epoch_s"][-1] / len(r["epoch_s"]) for r in runs)


def table5(results: Sequence[dict], arch: str, activations: Sequence[str],
           positions: Sequence[str], bn_init: str, threshold: float, lsuv_batch: int,
           paper_bn: dict[str, dict[str, str]], paper_lsuv: dict[str, str]) -> str:
    """Per activation: BN-FitNet (``bn_init``, BN before / after the non-linearity) and the
    LSUV FitNet without BN; accuracy (epochs to the threshold), the paper's beside each (its
    Tables 5 and 3), and the training seconds per epoch."""
    head = ["| activation"]
    for pos in positions:
        head.append(f"BN {pos} ({INIT_LABELS[bn_init]}) | paper (Table 5)")
    head += ["LSUV, no BN | paper (Table 3)"] + [f"s / epoch, BN {p}" for p in positions] + [
        "s / epoch, LSUV"]
    ncols = 2 * len(positions) + 2 + len(positions) + 1
    lines = [" | ".join(head) + " |", "|---|" + "---|" * ncols]
    for act in activations:
        cells, times = [], []
        for pos in positions:
            runs = _select(results, arch=arch, activation=act, init=bn_init,
                           lsuv_batch=lsuv_batch, bn=pos)
            cells += [_cell(runs, threshold) if runs else "", paper_bn.get(act, {}).get(pos, "")]
            times.append(f"{_epoch_s(runs):.2f}" if runs else "")
        lsuv = _select(results, arch=arch, activation=act, init="lsuv", lsuv_batch=lsuv_batch)
        cells += [_cell(lsuv, threshold) if lsuv else "", paper_lsuv.get(act, "")]
        times.append(f"{_epoch_s(lsuv):.2f}" if lsuv and lsuv[0].get("epoch_s") else "")
        lines.append(f"| {act} | " + " | ".join(cells + times) + " |")
    return "\n".join(lines)


def plot_wallclock(results: Sequence[dict], arch: str, activations: Sequence[str],
                   positions: Sequence[str], bn_init: str, lsuv_batch: int, path: str,
                   title: str) -> None:
    """Figure 3's axes: test accuracy against wall-clock seconds (the init's and the
    training's, on one core each), LSUV without BN against the BN nets, one panel per
    activation; seed 0 solid, other seeds faint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(activations), figsize=(4 * len(activations), 3.6),
                             squeeze=False)
    styles = [("LSUV, no BN", "tab:red", dict(init="lsuv"))] + [
        (f"BN {p}, {INIT_LABELS[bn_init]}", c, dict(init=bn_init, bn=p))
        for p, c in zip(positions, ("tab:green", "tab:blue"))]
    for ax, act in zip(axes[0], activations):
        for label, color, where in styles:
            for r in _select(results, arch=arch, activation=act, lsuv_batch=lsuv_batch,
                             **where):
                if not r.get("epoch_s"):
                    continue
                first = r["config"]["seed"] == 0
                ax.plot([0.0] + [r["init_s"] + s for s in r["epoch_s"]],
                        [0.0] + [a * 100 for a in r["test_acc"]], color=color, lw=1.4,
                        alpha=1.0 if first else 0.3, label=label if first else None)
        ax.set_title(act)
        ax.set_xlabel("wall-clock seconds (init + training)")
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("test accuracy, %")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table_tol(results: Sequence[dict], arch: str, activation: str, tols: Sequence[float],
              threshold: float, lsuv_batch: int) -> str:
    """LSUV at each Tol_var: accuracy (epochs to the threshold), the rescaling tries onnx-lsuv
    counted over all layers (per seed), onnx-lsuv's verdict, the init's seconds, and the worst
    |var - 1| of a layer output on the held-out images."""
    lines = [f"| Tol_var | test accuracy, % (epochs to {threshold * 100:.0f}%) | tries, all "
             "layers, per seed | every layer converged | init time, s | worst \\|var - 1\\|, "
             "held-out |", "|---|---|---|---|---:|---:|"]
    for tol in tols:
        runs = _select(results, arch=arch, activation=activation, init="lsuv",
                       lsuv_batch=lsuv_batch, tol=tol)
        if not runs:
            continue
        tries = ", ".join("" if r.get("lsuv_tries") is None else str(r["lsuv_tries"])
                          for r in runs)
        ok = sum(bool(r["lsuv_converged"]) for r in runs)
        lines.append(f"| {tol:g} | {_cell(runs, threshold)} | {tries} | {ok} of {len(runs)} | "
                     f"{np.mean([r['init_s'] for r in runs]):.2f} | "
                     f"{max(r['test_var_worst'] for r in runs):.3f} |")
    return "\n".join(lines)


MODERN_LABELS = {"default": "PyTorch's default init", "lsuv": "LSUV (onnx-lsuv, round trip)"}


def table_modern(results: Sequence[dict], arch: str, inits: Sequence[str],
                 threshold: float) -> str:
    """The modern net per init: the cell (mean accuracy, epochs to the threshold per seed),
    each seed's final accuracy, the mean training loss after the first epoch and at the end,
    and the init's seconds."""
    lines = [f"| init | test accuracy, % (epochs to {threshold * 100:.0f}%) | final accuracy "
             "per seed, % | training loss, epoch 1 | training loss, last | init time, s |",
             "|---|---|---|---:|---:|---:|"]
    for init in inits:
        runs = _select(results, arch=arch, init=init)
        if not runs:
            continue
        per_seed = ", ".join(f"{r['test_acc'][-1] * 100:.1f}" for r in runs)
        lines.append(
            f"| {MODERN_LABELS.get(init, init)} | {_cell(runs, threshold)} | {per_seed} | "
            f"{np.mean([r['train_loss'][0] for r in runs]):.3f} | "
            f"{np.mean([r['train_loss'][-1] for r in runs]):.3f} | "
            f"{np.mean([r['init_s'] for r in runs]):.2f} |")
    return "\n".join(lines)


def plot_modern(results: Sequence[dict], arch: str, inits: Sequence[str], path: str,
                title: str) -> None:
    """The modern net's curves: a line per init."""
    lines = [(MODERN_LABELS.get(init, init), color, _select(results, arch=arch, init=init))
             for init, color in zip(inits, ("tab:gray", "tab:red"))]
    _plot_columns([("AdamW", lines)], path, title)


# ---- issue 28: three inits on three transformers (transformer_study.py) ----

TRANSFORMER_LABELS = {"default": "PyTorch's default", "paper": "paper LSUV (`policy=\"paper\"`)",
                      "transformer": "`policy=\"transformer\"`"}
TRANSFORMER_COLORS = {"default": "tab:gray", "paper": "tab:red", "transformer": "tab:blue"}


def _spread(values: Sequence[float], digits: int) -> list[str]:
    """Mean, min-max and the sample standard deviation (n - 1; "-" for one value)."""
    sd = f"{statistics.stdev(values):.{digits}f}" if len(values) > 1 else "-"
    return [f"{statistics.mean(values):.{digits}f}",
            f"{min(values):.{digits}f}-{max(values):.{digits}f}", sd]


def _study_runs(results: Sequence[dict], arch: str, init: str, variant: str = "") -> list[dict]:
    return _select(results, arch=arch, init=init, variant=variant, study="transformers")


def table_transformer_digits(results: Sequence[dict], arch: str, inits: Sequence[str],
                             threshold: float) -> str:
    """Per init: the final test accuracy (mean, min-max, std over the seeds, and per seed),
    the epoch and the training seconds at which each seed first reached ``threshold``, and
    the mean training loss after the first and the last epoch."""
    thr = f"{threshold * 100:.0f}%"
    lines = ["| init | test accuracy, mean % | min-max | std | per seed, % | epochs to "
             f"{thr}, per seed | training s to {thr}, mean | training loss, epoch 1 | "
             "training loss, last |", "|---|---:|---|---:|---|---|---:|---:|---:|"]
    for init in inits:
        runs = _study_runs(results, arch, init)
        if not runs:
            continue
        acc = [r["test_acc"][-1] * 100 for r in runs]
        reached = [epochs_to(r, threshold) for r in runs]
        secs = [r["epoch_s"][e - 1] for r, e in zip(runs, reached) if e]
        lines.append(
            f"| {TRANSFORMER_LABELS[init]} | " + " | ".join(_spread(acc, 1)) + " | "
            + ", ".join(f"{a:.1f}" for a in acc) + " | "
            + ", ".join(str(e or "-") for e in reached) + " | "
            + (f"{statistics.mean(secs):.1f}" if secs else "-") + " | "
            f"{statistics.mean(r['train_loss'][0] for r in runs):.3f} | "
            f"{statistics.mean(r['train_loss'][-1] for r in runs):.3f} |")
    return "\n".join(lines)


def steps_to(run: dict, threshold: float) -> int | None:
    """The training steps after which the validation loss first was at or below
    ``threshold`` (validation runs after each epoch of ``steps`` mini-batches)."""
    steps = run["config"]["budget"]["steps"]
    return next(((i + 1) * steps for i, v in enumerate(run["val_loss"]) if v <= threshold),
                None)


def table_transformer_lm(results: Sequence[dict], arch: str, inits: Sequence[str],
                         threshold: float) -> str:
    """Per init: the final validation loss (nats per character; mean, min-max, std, per seed),
    the steps to a validation loss of ``threshold`` per seed, the last epoch's training
    loss."""
    lines = ["| init | validation loss, mean | min-max | std | per seed | steps to "
             f"{threshold:g}, per seed | training loss, last |",
             "|---|---:|---|---:|---|---|---:|"]
    for init in inits:
        runs = _study_runs(results, arch, init)
        if not runs:
            continue
        loss = [r["val_loss"][-1] for r in runs]
        lines.append(
            f"| {TRANSFORMER_LABELS[init]} | " + " | ".join(_spread(loss, 3)) + " | "
            + ", ".join(f"{v:.3f}" for v in loss) + " | "
            + ", ".join(str(steps_to(r, threshold) or "-") for r in runs) + " | "
            f"{statistics.mean(r['train_loss'][-1] for r in runs):.3f} |")
    return "\n".join(lines)


def _per_block(runs: Sequence[dict], key: str, digits: int) -> str:
    """A per-block health statistic, each block's mean over the seeds, block 1 first."""
    blocks = zip(*(r["health"][key] for r in runs))
    return ", ".join(f"{statistics.mean(b):.{digits}f}" for b in blocks)


def table_health(results: Sequence[dict], arch: str, inits: Sequence[str],
                 variant: str = "") -> str:
    """Issue 28's health statistics at init, per init (means over the seeds): the stream's
    variance where block 1 reads it, per block the attention logits' std and the two
    branch / stream variance ratios, the head's logit std and the initial loss."""
    lines = ["| init | stream var, block 1 in | attention logit std, per block | Var(attn "
             "branch) / Var(stream), per block | Var(MLP branch) / Var(stream), per block | "
             "head logit std | initial loss |", "|---|---:|---|---|---|---:|---:|"]
    for init in inits:
        runs = [r for r in _study_runs(results, arch, init, variant) if r.get("health")]
        if not runs:
            continue
        h = [r["health"] for r in runs]
        lines.append(
            f"| {TRANSFORMER_LABELS[init]} | "
            f"{statistics.mean(x['stream_var'] for x in h):.3g} | "
            f"{_per_block(runs, 'logit_std', 2)} | {_per_block(runs, 'attn_ratio', 3)} | "
            f"{_per_block(runs, 'mlp_ratio', 3)} | "
            f"{statistics.mean(x['head_std'] for x in h):.3f} | "
            f"{statistics.mean(x['initial_loss'] for x in h):.3f} |")
    return "\n".join(lines)


def table_roles(results: Sequence[dict], arch: str, init: str = "transformer") -> str:
    """The roles onnx-lsuv's report gives the layers of ``arch`` under ``init`` (seed 0 of
    the main runs): per role its layers (with their block), and what the policy set them by:
    the measure, its target and the range of the values achieved, as the report says."""
    runs = _study_runs(results, arch, init)
    if not runs or not runs[0].get("lsuv_layers"):
        return ""
    by_role: dict[tuple, list[dict]] = {}
    for layer in runs[0]["lsuv_layers"]:
        key = (str(layer.get("role") or "(none)"), str(layer.get("measure") or ""),
               layer.get("target"))
        by_role.setdefault(key, []).append(layer)
    lines = ["| role | layers (block) | measure | target | achieved, min-max |",
             "|---|---|---|---:|---|"]
    for (role, measure, target), layers in by_role.items():
        names = ", ".join(layer["name"] + ("" if layer.get("role_block") is None
                                           else f" ({layer['role_block']})")
                          for layer in layers)
        got = [x["achieved"] for x in layers if x.get("achieved") is not None]
        lines.append(f"| {role} | {names} | {measure} | "
                     f"{'' if target is None else f'{target:.4g}'} | "
                     + (f"{min(got):.4g}-{max(got):.4g}" if got else "") + " |")
    return "\n".join(lines)


def table_calibration(results: Sequence[dict], arch: str, variants: dict[str, dict],
                      threshold: float) -> str:
    """The transformer policy with other options (every row kept): its keywords, the final
    test accuracy (mean, min-max, std, per seed) and the health statistics' extremes."""
    lines = ["| `policy=\"transformer\"` with | test accuracy, mean % | min-max | std | "
             "per seed, % | stream var | max attention logit std | max attn ratio | "
             "max MLP ratio | head logit std |", "|---|---:|---|---:|---|---:|---:|---:|---:|---:|"]
    for name, keywords in variants.items():
        runs = _study_runs(results, arch, "transformer", name)
        if not runs:
            continue
        acc = [r["test_acc"][-1] * 100 for r in runs]
        h = [r["health"] for r in runs]
        what = ", ".join(f"`{k}={v!r}`" for k, v in keywords.items()) or "its defaults"
        lines.append(
            f"| {what} | " + " | ".join(_spread(acc, 1)) + " | "
            + ", ".join(f"{a:.1f}" for a in acc) + " | "
            f"{statistics.mean(x['stream_var'] for x in h):.3g} | "
            f"{statistics.mean(max(x['logit_std']) for x in h):.2f} | "
            f"{statistics.mean(max(x['attn_ratio']) for x in h):.3f} | "
            f"{statistics.mean(max(x['mlp_ratio']) for x in h):.3f} | "
            f"{statistics.mean(x['head_std'] for x in h):.3f} |")
    return "\n".join(lines)


def transformer_goals(results: Sequence[dict], digits_archs: Sequence[str], lm_arch: str,
                      margin: float = 3.0) -> list[str]:
    """Issue 28's goals, checked on the results: on each digits net the transformer policy's
    mean accuracy >= the default's and >= paper LSUV's + ``margin`` points; on the language
    model its mean validation loss <= the default's; and the stretch (above the default by
    more than the seeds' spread: the policy's worst seed above the default's best)."""
    def mean_of(arch, init, key):
        runs = _study_runs(results, arch, init)
        return [r[key][-1] * (100 if key == "test_acc" else 1) for r in runs] if runs else None

    lines = []
    for arch in digits_archs:
        d, p, t = (mean_of(arch, i, "test_acc") for i in ("default", "paper", "transformer"))
        if not (d and p and t):
            continue
        md, mp, mt = statistics.mean(d), statistics.mean(p), statistics.mean(t)
        lines.append(
            f"- {arch}: transformer {mt:.1f}% against default {md:.1f}% "
            f"({'met' if mt >= md else 'NOT met'}: >= the default) and paper LSUV {mp:.1f}% "
            f"({'met' if mt >= mp + margin else 'NOT met'}: >= paper + {margin:g}); stretch "
            f"(worst transformer seed above the best default seed): "
            f"{'met' if min(t) > max(d) else 'not met'}.")
    d, p, t = (mean_of(lm_arch, i, "val_loss") for i in ("default", "paper", "transformer"))
    if d and p and t:
        md, mp, mt = statistics.mean(d), statistics.mean(p), statistics.mean(t)
        lines.append(
            f"- {lm_arch}: transformer validation loss {mt:.3f} against default {md:.3f} "
            f"({'met' if mt <= md else 'NOT met'}: <= the default) and paper LSUV {mp:.3f}; "
            f"stretch (worst transformer seed below the best default seed): "
            f"{'met' if max(t) < min(d) else 'not met'}.")
    return lines


def plot_transformer(results: Sequence[dict], arch: str, inits: Sequence[str], path: str,
                     title: str, lm: bool) -> None:
    """Per init: the training loss (top; the mean over the seeds bold, each seed faint) and
    the test accuracy or, for the language model, the validation loss (bottom), against
    epochs or steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, eval_ax) = plt.subplots(2, 1, figsize=(6.4, 6.4), sharex=True)
    key = "val_loss" if lm else "test_acc"
    for init in inits:
        runs = [r for r in _study_runs(results, arch, init) if r["train_loss"]]
        if not runs:
            continue
        per = runs[0]["config"]["budget"].get("steps") or 1
        n = min(len(r["train_loss"]) for r in runs)
        x = [(i + 1) * per for i in range(n)]
        color = TRANSFORMER_COLORS[init]
        for r in runs:
            loss_ax.plot(x, r["train_loss"][:n], color=color, alpha=0.25, lw=0.8)
            eval_ax.plot(x, [v * (1 if lm else 100) for v in r[key][:n]], color=color,
                         alpha=0.25, lw=0.8)
        loss_ax.plot(x, np.mean([r["train_loss"][:n] for r in runs], axis=0), color=color,
                     lw=1.8, label=f"{TRANSFORMER_LABELS[init]} ({len(runs)} seeds)")
        eval_ax.plot(x, np.mean([r[key][:n] for r in runs], axis=0) * (1 if lm else 100),
                     color=color, lw=1.8)
    loss_ax.set_yscale("log")
    loss_ax.set_ylabel("training loss")
    eval_ax.set_ylabel("validation loss, nats / char" if lm else "test accuracy, %")
    if not lm:
        eval_ax.set_ylim(0, 100)
    eval_ax.set_xlabel("step" if lm else "epoch")
    loss_ax.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 80), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
