"""Per-layer plot of a report, after the paper's Table 8: output variance before and after
(log scale) and the final weight standard deviation. Needs matplotlib (``pip install
matplotlib``, or the ``plot`` extra)."""

from __future__ import annotations

import os

from .errors import InputError
from .report import Report


def require_matplotlib():
    """matplotlib.pyplot on the Agg backend; InputError when matplotlib is missing (checked
    before any work by the CLI, so that a missing optional package costs nothing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise InputError("--plot needs matplotlib: pip install matplotlib (or, from a checkout, "
                         "pip install '.[plot]')") from err
    return plt


def plot_report(report: Report, path: str | os.PathLike) -> None:
    """Draw ``report`` into a PNG at ``path``.

    Raises:
        InputError: matplotlib is not installed.
    """
    plt = require_matplotlib()

    recs = report.layers
    x = list(range(len(recs)))
    labels = [f"{r.index} {r.name}" if len(r.name) <= 18 else f"{r.index} {r.name[:16]}.."
              for r in recs]
    target = report.options.get("target_var", 1.0)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7.0, 0.45 * len(recs) + 2), 7),
                                      sharex=True)
    before = [r.var_before if r.var_before else float("nan") for r in recs]
    after = [r.var_after if r.var_after else float("nan") for r in recs]
    top.semilogy(x, before, "o-", color="tab:gray", label="before (after orthonormal init)")
    top.semilogy(x, after, "s-", color="tab:blue", label="after LSUV")
    top.axhline(target, color="tab:green", linestyle="--", linewidth=1, label=f"target {target}")
    top.set_ylabel("output variance (log)")
    top.set_title("Per-layer output variance on the batch")
    top.legend(loc="best", fontsize=8)
    top.grid(True, which="both", alpha=0.3)
    stds = [r.weight_std if r.weight_std is not None else float("nan") for r in recs]
    bottom.bar(x, stds, color="tab:orange")
    bottom.set_ylabel("final weight std")
    bottom.set_title("Final weight std per layer (cf. the paper's Table 8)")
    bottom.set_xticks(x)
    bottom.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    bottom.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=120, format="png")
    plt.close(fig)
