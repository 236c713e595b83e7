"""The one judgement of a layer: is its output variance on target?

Every path that decides a layer's status (the one-pass solve, the re-measurement, the try loop,
the final check and ``--check``) calls :func:`judge`. A zero, negative, NaN or infinite variance
has one meaning everywhere: the layer is *degenerate*, it cannot be rescaled and it is not on
target. The in-graph solve (``measure_graph.normalizing_model``) applies a factor exactly where
:func:`needs_factor` is true; it decides nothing else, since every status comes from a
measurement of the written model judged here.
"""

from __future__ import annotations

import math

import numpy as np

# A layer's status, one word each.
CONVERGED = "converged"  # |var - target| < tol on the batch, measured on the written model
NOT_CONVERGED = "not_converged"  # a finite variance still off target after max_iter tries
SKIPPED = "skipped"  # degenerate (zero or non-finite) output variance: not rescaled
NOT_SCALED = "not_scaled"  # no data pass: --init orthonormal or a baseline
OFF_TARGET = "off_target"  # check mode: |var - target| >= tol, or a degenerate variance
STATUSES = (CONVERGED, NOT_CONVERGED, SKIPPED, NOT_SCALED, OFF_TARGET)
# Statuses that leave the run's verdict true: on target, or no verdict asked for.
GOOD = (CONVERGED, NOT_SCALED)


def degenerate(var: float) -> str | None:
    """Why ``var`` cannot be rescaled (zero, negative or not finite), or None."""
    if not math.isfinite(var):
        return f"output variance is {var}"
    if var <= 0:
        return "output variance is 0 (constant output)"
    return None


def on_target(var: float, target: float, tol: float) -> bool:
    """|var - target| < tol for a finite, positive variance (NaN is never on target)."""
    return degenerate(var) is None and abs(var - target) < tol


def needs_factor(var: float, target: float, tol: float) -> bool:
    """Whether the solve rescales a layer with this variance: finite, positive, off target."""
    return degenerate(var) is None and not abs(var - target) < tol


def judge(var: float, target: float, tol: float, *, check: bool = False,
          tries: int | None = None) -> tuple[str, str]:
    """The status of a layer whose measured output variance is ``var``, and why.

    Args:
        var: The variance measured on the written (or checked) model.
        target: The target variance.
        tol: The tolerance (the paper's Tol_var).
        check: Check mode (``--check``): anything not on target is ``off_target``. Defaults to
            False (initialisation: ``skipped`` for a degenerate variance, ``not_converged`` for
            a finite one off target).
        tries: Tries spent, named in the message of a layer that did not converge. Defaults
            to None.

    Returns:
        (status, message); the message is empty for a converged layer.
    """
    problem = degenerate(var)
    if problem is None and abs(var - target) < tol:
        return CONVERGED, ""
    if check:
        return OFF_TARGET, problem or f"|var - target| = {abs(var - target):.4g} >= {tol}"
    if problem is not None:
        return SKIPPED, problem
    spent = f" after {tries} tries" if tries is not None else ""
    return NOT_CONVERGED, f"|var - target| = {abs(var - target):.4g} >= {tol}{spent}"


def mean_tolerance(tol: float, target: float) -> float:
    """How near a target mean must be: tol / sqrt(target), the variance's tolerance in units
    of the output (tol itself at the default target variance 1)."""
    return tol / math.sqrt(target)


def judge_units(var, mean, target: float, target_mean: float | None, tol: float, *,
                check: bool = False, tries: int | None = None
                ) -> tuple[str, str, float, float, int]:
    """The status of one report row from the variances (and means) of its parts: one for a
    layer, block or gate; one per channel with ``per_channel``. Parts whose variance is
    degenerate (a constant channel: a dead ReLU unit) cannot be rescaled and are counted, not
    judged, unless every part is. A target mean is met when |mean - target_mean| is below
    ``mean_tolerance``.

    Returns:
        (status, message, the variance shown (the part farthest from target), the mean shown
        (the part farthest from the target mean, or that part's), the count of constant parts).
    """
    var = np.atleast_1d(np.asarray(var, np.float64))
    mean = np.atleast_1d(np.asarray(mean, np.float64))
    live = np.array([degenerate(float(v)) is None for v in var])
    dead = int((~live).sum())
    if not live.any():
        status, message = judge(float(var[0]), target, tol, check=check, tries=tries)
        if var.size > 1:
            message = f"every one of its {var.size} channels: {message}"
        return status, message, float(var[0]), float(mean[0]), dead
    idx = np.flatnonzero(live)
    worst = idx[np.argmax(np.abs(var[idx] - target))]
    status, message = judge(float(var[worst]), target, tol, check=check, tries=tries)
    shown_mean, culprit = float(mean[worst]), worst
    if target_mean is not None:
        worst_m = idx[np.argmax(np.abs(mean[idx] - target_mean))]
        shown_mean = float(mean[worst_m])
        off = abs(shown_mean - target_mean)
        mean_tol = mean_tolerance(tol, target)
        if status == CONVERGED and not off < mean_tol:
            spent = f" after {tries} tries" if tries is not None and not check else ""
            status = OFF_TARGET if check else NOT_CONVERGED
            message = f"|mean - target_mean| = {off:.4g} >= {mean_tol:.4g}{spent}"
            culprit = worst_m
    if var.size > 1 and status != CONVERGED:
        message = f"channel {int(culprit)}: {message}"
    if dead and var.size > 1:
        message = (message + "; " if message else "") + \
            f"{dead} of {var.size} channels constant (not scaled)"
    return status, message, float(var[worst]), shown_mean, dead
