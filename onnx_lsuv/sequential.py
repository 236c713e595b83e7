"""The layer-sequential solve from per-channel statistics (strategy "sequential").

What the targets beyond the paper's and a stream of batches need, on top of the same
in-graph statistics (``measure_graph.sums_model``): every measurement is a pass of the data,
batch by batch, that accumulates each measured layer's per-channel sum, sum of squares and
element count in float64; mean and variance per layer, block or channel follow from those
sums exactly, so a stream of batches gives the statistics of the batches concatenated.

From the first layer to the last (the paper's order), each layer is measured with the final
weights upstream of it, solved, and measured again; the pass that re-measures a layer also
measures the next one, so a layer costs about one pass of the data. A layer's output is
y = r z + b + d for a weight factor r and a bias shift d (per control: a channel with
per_channel, else a block), so any variance and mean of it is reached exactly in one step
(``_linear``; with a kept bias of one value per unit too). After an activation:

* the variance alone: secant steps on log r (``_Secant``), exact in one step after Relu,
  LeakyRelu or PRelu (positively homogeneous) without a bias;
* variance and mean after those: a bracketed secant search on the output's mean / std, with
  the std's step exact for them (``_ShiftSearch``); after any other activation, Broyden's
  method on the output's (std, mean) (``_Broyden``); each try set exactly by ``_linear``.

A layer's status comes from its last measurement, on the written model (its upstream weights
final, its downstream ones irrelevant to it). Where a weight is tied or read upstream, a later
layer can move an earlier one: then one more pass measures every layer again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import onnx

from .data import Stream
from .layers import Layer, recurrent_rule
from .measure_graph import Point, sums_model
from .strategies import feeding, kept_note, solve_scale
from .verdict import CONVERGED, NOT_CONVERGED, NOT_SCALED, judge_units, mean_tolerance

log = logging.getLogger("onnx_lsuv")

# Activations with f(a x) = a f(x) for a > 0: after them the ratio mean / std depends on the
# output's mean / std alone (``_ShiftSearch``).
HOMOGENEOUS = {"Relu", "LeakyRelu", "PRelu"}


@dataclass
class Stats:
    """Per-channel sums of one layer's measured tensor over every batch so far (float64)."""

    s1: np.ndarray
    s2: np.ndarray
    n: float

    def __add__(self, other: Stats) -> Stats:
        return Stats(self.s1 + other.s1, self.s2 + other.s2, self.n + other.n)

    def moments(self, groups: int) -> tuple[np.ndarray, np.ndarray]:
        """(mean, variance) per group of equal, contiguous channels (``groups`` = channels:
        per channel; 1: the whole layer)."""
        per = self.n / groups
        s1 = self.s1.reshape(groups, -1).sum(axis=1)
        s2 = self.s2.reshape(groups, -1).sum(axis=1)
        with np.errstate(all="ignore"):
            mean = s1 / per
            return mean, s2 / per - mean * mean


def measure(run, skeleton: onnx.ModelProto,
            items: list[tuple[Layer, Point]]) -> list[Stats]:
    """One pass of the data: the per-channel sums of each (layer, point) of ``items``."""
    model, outs = sums_model(skeleton, items)
    session = run.session(model, biases=True)
    names = list(dict.fromkeys(x for o in outs for x in (o.s1, o.s2, o.n)))
    total: list[Stats] | None = None
    for feeds in batches(run):
        values = dict(zip(names, session.run(feeds, names)))
        got = [Stats(np.asarray(values[o.s1], np.float64).reshape(-1),
                     np.asarray(values[o.s2], np.float64).reshape(-1),
                     float(values[o.n])) for o in outs]
        total = got if total is None else [a + b for a, b in zip(total, got)]
    run.report.timings["passes"] = run.report.timings.get("passes", 0) + 1
    return total


def batches(run):
    """The run's data, batch after batch: its stream, or its one batch."""
    return run.feeds if isinstance(run.feeds, Stream) else [run.feeds]


class _Goal:
    """One layer's targets over its controls: the units that get a factor and a shift each
    (every channel with per_channel, else every block)."""

    def __init__(self, run, lay: Layer, point: Point, mean_on: bool) -> None:
        opts = run.options
        self.units = lay.layout.output_units
        self.controls = self.units if opts.per_channel else len(lay.blocks)
        self.target, self.tol = opts.target_var, opts.tol
        self.mean_tol = mean_tolerance(opts.tol, opts.target_var)
        self.mean = opts.target_mean if mean_on else None
        self.point = point

    def expand(self, values: np.ndarray) -> np.ndarray:
        """Per control -> per output unit."""
        return np.repeat(values, self.units // self.controls)

    def off(self, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
        """Controls that need a step: a finite, positive variance off target, or a mean off."""
        live = np.isfinite(var) & (var > 0)
        bad = ~(np.abs(var - self.target) < self.tol)
        if self.mean is not None:
            bad |= ~(np.abs(mean - self.mean) < self.mean_tol)
        return live & bad

    def distance(self, mean: np.ndarray, var: np.ndarray, live: np.ndarray) -> float:
        """How far a try is from the targets: the worst of the controls in ``live`` (those live
        before the solve), in units of each target's tolerance: |log(var / target)| against
        log(1 + tol / target) (far below is as far as far above), |mean - target| against the
        mean's tolerance. A control made constant counts as infinitely far."""
        with np.errstate(all="ignore"):
            d = np.abs(np.log(var / self.target)) / np.log1p(self.tol / self.target)
        d = np.where(np.isfinite(var) & (var > 0), d, np.inf)
        if self.mean is not None:
            d = np.maximum(d, np.abs(mean - self.mean) / self.mean_tol)
        d = d[live]
        return float(d.max()) if d.size else 0.0


def _linear(goal: _Goal, pre: Stats, beta: np.ndarray, active: np.ndarray,
            var_t: np.ndarray, mean_t: np.ndarray | None, keep_within: bool):
    """The weight factor r and bias shift d per control that give the layer's output
    y = r z + b + d the variance ``var_t`` and (unless None) the mean ``mean_t``, from the
    channel statistics ``pre`` of y (z = y - b, b the current bias per unit, ``beta``).

    Within a control of several channels, var(r) = A r^2 + 2 B r + C, with A the pooled
    variance of z, B the covariance of z's channel means with b, C the variance of b over the
    channels, and a uniform shift leaves it alone: the positive root, else (no factor reaches
    it) the factor of the smallest variance, -B / A, or sqrt(var_t / A) where that is not
    positive. With ``keep_within`` (the paper's loop), a control whose variance
    is already within tol keeps r = 1, and one whose mean is within its tolerance keeps
    d = 0."""
    mean_c, var_c = pre.moments(goal.units)
    mu = (mean_c - beta).reshape(goal.controls, -1)
    b = beta.reshape(goal.controls, -1)
    with np.errstate(all="ignore"):
        a = var_c.reshape(goal.controls, -1).mean(axis=1) + mu.var(axis=1)
        bb = ((mu - mu.mean(axis=1, keepdims=True)) * (b - b.mean(axis=1, keepdims=True))
              ).mean(axis=1)
        c = b.var(axis=1)
        disc = bb * bb - a * (c - var_t)
        root = (np.sqrt(np.maximum(disc, 0)) - bb) / a
        vertex = -bb / a  # no root: the bias keeps every factor above var_t; the closest
        r = np.where((disc >= 0) & (root > 0), root,
                     np.where(vertex > 0, vertex, np.sqrt(var_t / a)))
        var_now = a + 2 * bb + c
    use = active & np.isfinite(r) & (r > 0)
    if keep_within:
        use &= ~(np.abs(var_now - var_t) < goal.tol)
    r = np.where(use, r, 1.0)
    d = np.zeros(goal.controls)
    if mean_t is not None:
        new_mean = r * mu.mean(axis=1) + b.mean(axis=1)
        shift = active & np.isfinite(new_mean)
        if keep_within:
            shift &= ~(np.abs(new_mean - mean_t) < goal.mean_tol)
        d = np.where(shift, mean_t - new_mean, 0.0)
    return r, d


def _log(x: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.log(x)


class _Secant:
    """The variance after an activation by the weight factor alone: steps on log r against
    F = log(var / target), with the slope dF/dlog r from the last two tries (2 at first:
    exact for Relu, LeakyRelu and PRelu without a bias), kept within [0.5, 8]."""

    def __init__(self, goal: _Goal) -> None:
        self.goal = goal
        self.x = np.zeros(goal.controls)  # log r, relative to the start
        self.f: np.ndarray | None = None
        self.slope = np.full(goal.controls, 2.0)

    def step(self, var: np.ndarray, active: np.ndarray) -> np.ndarray:
        f = _log(var / self.goal.target)
        if self.f is not None:
            with np.errstate(all="ignore"):
                p = (f - self.f) / (self.x - self.x_prev)
            ok = np.isfinite(p) & (self.x != self.x_prev)
            self.slope = np.where(ok, np.clip(p, 0.5, 8.0), self.slope)
        dx = np.where(active & np.isfinite(f), np.clip(-f / self.slope, -2.0, 2.0), 0.0)
        self.f, self.x_prev = f, self.x.copy()
        self.x = self.x + dx
        return np.exp(dx)


class _Bracketed:
    """The variance alone (at the output or after an activation) of a weight whose uses feed
    each other or that is read upstream (``strategies.feeding``: a filter bank cascaded over
    octaves), where neither ``_linear``'s quadratic nor a secant on log r
    holds: per control, ``strategies.solve_scale`` on the tries so far (the factor since the
    start, the variance), which expands until two tries straddle the target and then solves
    within the bracket."""

    def __init__(self, goal: _Goal, uses: int) -> None:
        self.goal = goal
        self.uses = uses
        self.level = np.ones(goal.controls)  # each control's factor since the start
        self.points: list[list[tuple[float, float]]] = [[] for _ in range(goal.controls)]

    def step(self, var: np.ndarray, active: np.ndarray) -> np.ndarray:
        r = np.ones(self.goal.controls)
        for c, (points, level, v) in enumerate(zip(self.points, self.level, var)):
            points.append((float(level), float(v)))
            if active[c]:
                r[c] = solve_scale(points, self.goal.target, self.uses) / level
        self.level = self.level * r
        return r


class _ShiftSearch:
    """Mean and variance after Relu, LeakyRelu or PRelu, with a target mean. The layer's
    output (before the activation) is set exactly to a std s and a mean t s by ``_linear``;
    these activations are positively homogeneous, so after them the ratio mean / std is a
    function R(t) of t alone and the variance is s^2 V(t). Each try takes a secant step on t
    for R (slope 1 at first, the linear case; kept positive, R being monotone), bisecting
    within the bracket of t seen on either side, and sets s = sqrt(target / V(t)) with log V
    extrapolated along its own secant in t. A control that a step made constant (pushed below
    zero everywhere) goes back halfway to its last live t."""

    def __init__(self, goal: _Goal) -> None:
        self.goal = goal
        k = goal.controls
        self.lo, self.hi = np.full(k, -np.inf), np.full(k, np.inf)
        self.slope = np.ones(k)  # dR/dt
        self.v_slope = np.zeros(k)  # d log V / dt
        self.t_prev = np.full(k, np.nan)  # the last live try's t, R error and log V
        self.f_prev = np.full(k, np.nan)
        self.logv_prev = np.full(k, np.nan)

    def step(self, pre_mean, pre_var, mean, var, active) -> tuple[np.ndarray, np.ndarray]:
        """The output's target (variance, mean) per control for the next try."""
        g = self.goal
        with np.errstate(all="ignore"):
            s = np.sqrt(pre_var)
            t = pre_mean / s
            live = np.isfinite(var) & (var > 0)
            f = mean / np.sqrt(var) - g.mean / np.sqrt(g.target)
            logv = np.log(var) - 2 * np.log(s)
            self.lo = np.where(live & (f < 0), np.maximum(self.lo, t), self.lo)
            self.hi = np.where(live & (f >= 0), np.minimum(self.hi, t), self.hi)
            dt = t - self.t_prev
            moved = live & (np.abs(dt) > 1e-6)
            p = (f - self.f_prev) / dt
            self.slope = np.where(moved & np.isfinite(p) & (p > 0), np.clip(p, 0.05, 20.0),
                                  self.slope)
            q = (logv - self.logv_prev) / dt
            self.v_slope = np.where(moved & np.isfinite(q), np.clip(q, -20.0, 20.0),
                                    self.v_slope)
            t_new = t - f / self.slope
            inside = (t_new > self.lo) & (t_new < self.hi)
            bounded = np.isfinite(self.lo) & np.isfinite(self.hi)
            t_new = np.where(bounded & ~inside, (self.lo + self.hi) / 2, t_new)
            t_new = np.clip(t_new, t - 1.0, t + 1.0)
            s_new = np.sqrt(g.target / np.exp(logv + self.v_slope * (t_new - t)))
            s_new = np.clip(s_new, s * np.exp(-2.0), s * np.exp(2.0))
            back = np.where(np.isfinite(self.t_prev), (t + self.t_prev) / 2, t + 0.5)
            t_new = np.where(live, t_new, back)
            s_new = np.where(live, s_new, s)
            self.t_prev = np.where(live, t, self.t_prev)
            self.f_prev = np.where(live, f, self.f_prev)
            self.logv_prev = np.where(live, logv, self.logv_prev)
        ok = active & np.isfinite(t_new) & np.isfinite(s_new) & (s_new > 0)
        s_new, t_new = np.where(ok, s_new, s), np.where(ok, t_new, t)
        return s_new * s_new, t_new * s_new


class _Broyden:
    """Mean and variance after an activation that is not positively homogeneous (Tanh,
    Sigmoid, Gelu, a maxout's Max, ...), with a target mean: Broyden's method on the output's
    (log std, mean), each try set exactly by ``_linear``, against F = (log(var / target),
    mean - target_mean) after the activation, from the Jacobian [[2, 0], [0, 1]] of the
    linear case, with steps kept within 1 and a control that a step made constant sent back
    halfway to its last live point."""

    J0 = np.array([[2.0, 0.0], [0.0, 1.0]])

    def __init__(self, goal: _Goal) -> None:
        self.goal = goal
        k = goal.controls
        self.jac = np.tile(self.J0, (k, 1, 1))
        self.x = np.full((k, 2), np.nan)  # the last live try
        self.f = np.full((k, 2), np.nan)

    def step(self, pre_mean, pre_var, mean, var, active) -> tuple[np.ndarray, np.ndarray]:
        """The output's target (variance, mean) per control for the next try."""
        g = self.goal
        with np.errstate(all="ignore"):
            x = np.stack([0.5 * np.log(pre_var), pre_mean], axis=1)
            live = np.isfinite(var) & (var > 0)
            f = np.stack([np.log(var / g.target), mean - g.mean], axis=1)
            dx, df = x - self.x, f - self.f
            norm = np.einsum("ki,ki->k", dx, dx)
            upd = np.einsum("ki,kj->kij", df - np.einsum("kij,kj->ki", self.jac, dx),
                            dx) / norm[:, None, None]
            ok = live & (norm > 1e-12) & np.isfinite(upd).all(axis=(1, 2))
            jac = np.where(ok[:, None, None], self.jac + np.nan_to_num(upd), self.jac)
            sane = (jac[:, 0, 0] > 0.05) & (jac[:, 1, 1] > 0.01) & (
                np.abs(np.linalg.det(jac)) > 1e-8)
            self.jac = np.where(sane[:, None, None], jac, self.J0)
            step = -np.linalg.solve(self.jac, np.nan_to_num(f)[:, :, None])[:, :, 0]
            step = np.clip(step, -1.0, 1.0)
            back = np.where(np.isfinite(self.x), (x + self.x) / 2, x)
            new = np.where(live[:, None], x + step, back)
            self.x = np.where(live[:, None], x, self.x)
            self.f = np.where(live[:, None], f, self.f)
        ok = active & np.isfinite(new).all(axis=1)
        new = np.where(ok[:, None], new, x)
        return np.exp(2 * new[:, 0]), new[:, 1]


def _activation_input(goal: _Goal, pre: Stats, point: Point):
    """Mean and variance per control of what the activation reads: the layer's output y, or
    a y + b per channel through a BatchNormalization; and the map of a (variance, mean) wanted
    there back to y's (exact per channel; for a control of several channels, through the
    BatchNormalization's mean factor, which the next try corrects)."""
    mean, var = pre.moments(goal.controls)
    if point.bn is None:
        return mean, var, lambda v, m: (v, m)
    a, b = (np.asarray(x, np.float64) for x in point.bn)
    mean_c, var_c = pre.moments(goal.units)
    t_mean = (a * mean_c + b).reshape(goal.controls, -1)
    t_var = (a * a * var_c).reshape(goal.controls, -1)
    in_mean = t_mean.mean(axis=1)
    in_var = t_var.mean(axis=1) + t_mean.var(axis=1)
    if goal.controls == goal.units:
        return in_mean, in_var, lambda v, m: (v / (a * a), (m - b) / a)
    a_mean = a.reshape(goal.controls, -1).mean(axis=1)

    def to_output(v, m):
        with np.errstate(all="ignore"):
            return v * var / in_var, mean + (m - in_mean) / a_mean

    return in_mean, in_var, to_output


def _live(stats: Stats, goal: _Goal) -> np.ndarray:
    """Controls whose variance is finite and positive (not constant)."""
    _, var = stats.moments(goal.controls)
    return np.isfinite(var) & (var > 0)


def _record(run, lay: Layer, goal: _Goal, stats: Stats, tries: int, first: bool,
            check: bool = False, killed: np.ndarray | None = None) -> bool:
    """Judge the layer's rows from ``stats``; whether every row is converged. ``killed``:
    controls that were live before the solve and are constant after it (not converged)."""
    mean, var = stats.moments(goal.controls)
    blocks = len(lay.blocks)
    per_row = goal.controls // blocks
    scale = run.state.total_scale(lay)
    scale = np.repeat(scale, goal.units // scale.size).reshape(blocks, -1)
    good = True
    for b, rec in enumerate(run.rows(lay)):
        part = slice(b * per_row, (b + 1) * per_row)
        status, message, v, m, dead = judge_units(
            var[part], mean[part], goal.target, goal.mean, goal.tol, check=check,
            tries=None if check else tries)
        if lay.multiplies_state:  # never scaled: its variance is shown, not judged
            status, message = NOT_SCALED, recurrent_rule(run.options.init, check)
        lost = int(killed[part].sum()) if killed is not None else 0
        if lost:
            status = NOT_CONVERGED
            message = (f"{lost} channel(s) made constant by the bias shift after {tries} tries"
                       + (f"; {message}" if message else ""))
        if first:
            rec.var_before, rec.mean_before = v, m
        rec.var_after, rec.mean_after, rec.status, rec.message = v, m, status, message
        if run.options.per_channel:
            rec.channels, rec.channels_constant = per_row, dead
        rec.point = goal.point.op or "output"
        if not check:
            rec.tries = tries
            rec.scale = float(np.exp(np.mean(np.log(scale[b]))))  # geometric mean per row
        good &= status == CONVERGED
    return good


SETTLING_SWEEPS = 3


def scale_sequential(run, points: dict[int, Point], mean_off: dict[int, str]) -> None:
    """Every layer in order, solved from its statistics over all the data; then one pass
    measures the written model and judges every layer. Where a later layer moved an earlier
    one off its target (a tied weight, a recurrence, two layers read at one maxout's Max), up
    to ``SETTLING_SWEEPS`` sweeps redo the layers found off, from the first that moved, each
    with its remaining tries, and the final pass measures again.

    Args:
        run: The ``strategies.Run``.
        points: Layer index -> where its statistics are read (default: its output).
        mean_off: Layer index -> why its mean target is not applied (no bias it can take,
            one that is not per unit: ``lsuv._mean_off``); grows where a bias turns out not
            to take a shift.
    """
    t = time.perf_counter()
    layers = run.layers
    skeleton = run.state.skeleton(run.work)
    ahead: dict[int, list[Stats]] = {}
    for k, lay in enumerate(layers):
        nxt = layers[k + 1] if k + 1 < len(layers) else None
        _solve(run, skeleton, lay, nxt, points, mean_off, ahead, first=True)
        run.progress("scaling", k + 1, len(layers), lay.name)
    moved = final_measure(run, skeleton, points, mean_off)
    for _ in range(SETTLING_SWEEPS):
        if not moved:
            break
        again = [lay for lay in layers[min(moved):]
                 if any(rec.status != CONVERGED for rec in run.rows(lay))
                 and run.rows(lay)[0].tries < run.options.max_iter]
        if not again:
            break
        log.info("settling %d layer(s) that later layers moved off target", len(again))
        for lay in again:
            _solve(run, skeleton, lay, None, points, mean_off, {}, first=False)
        moved = final_measure(run, skeleton, points, mean_off)
    run.report.timings["sequential_s"] = time.perf_counter() - t


def _items(points: dict[int, Point], lay: Layer) -> list[tuple[Layer, Point]]:
    """What a try measures of a layer: its output, and its activation's."""
    point = points.get(lay.index, Point())
    return [(lay, Point())] + ([(lay, point)] if point.after_activation else [])


def _solve(run, skeleton: onnx.ModelProto, lay: Layer, nxt: Layer | None,
           points: dict[int, Point], mean_off: dict[int, str], ahead: dict[int, list[Stats]],
           first: bool) -> None:
    """The try loop of one layer: measure, step, until on target or out of tries (those
    spent before count); the pass after each step also measures ``nxt`` into ``ahead``."""
    state, opts = run.state, run.options
    point = points.get(lay.index, Point())
    # A recurrent op is measured at W x, which holds no bias.
    beta = np.zeros(lay.layout.output_units) if lay.is_recurrent else state.unit_bias(lay)
    goal = _Goal(run, lay, point, opts.target_mean is not None and lay.index not in mean_off)
    stats = ahead.pop(lay.index, None) or measure(run, skeleton, _items(points, lay))
    outer = None
    steep = feeding(state, lay)
    if steep and goal.mean is None:
        outer = _Bracketed(goal, steep)
    elif point.after_activation:
        outer = _Secant(goal) if goal.mean is None else _ShiftSearch(goal) \
            if set(point.op.split("/")) <= HOMOGENEOUS else _Broyden(goal)
    tries = 0 if first else run.rows(lay)[0].tries
    if first:
        _record(run, lay, goal, stats[-1], tries, first=True)
    was_live = _live(stats[-1], goal)
    best = None  # (distance, tries, scale, bias, stats): the closest try, kept if no try lands
    while True:
        mean, var = stats[-1].moments(goal.controls)
        active = goal.off(mean, var)
        if isinstance(outer, (_ShiftSearch, _Broyden)):  # a control a shift killed: undo
            active |= was_live & ~_live(stats[-1], goal)
        far = goal.distance(mean, var, was_live)
        if best is None or far < best[0]:
            bias = state.bias[lay.index]
            best = (far, tries, state.scale[lay.index].copy(),
                    None if bias is None else bias.copy(), stats)
        if not active.any() or tries >= opts.max_iter or lay.multiplies_state:
            break
        if beta is not None and not lay.is_recurrent:
            beta = state.unit_bias(lay)  # as shifted by the last try
        if isinstance(outer, (_Secant, _Bracketed)):
            r, d = outer.step(var, active), np.zeros(goal.controls)
        elif beta is None:  # at the output, a bias of another shape: the paper's step
            with np.errstate(all="ignore"):
                r = np.where(active, np.sqrt(goal.target / var), 1.0)
            d = np.zeros(goal.controls)
        elif isinstance(outer, (_ShiftSearch, _Broyden)):
            pre_mean, pre_var, to_output = _activation_input(goal, stats[0], point)
            var_t, mean_t = to_output(*outer.step(pre_mean, pre_var, mean, var, active))
            r, d = _linear(goal, stats[0], beta, active, var_t, mean_t, keep_within=False)
        else:
            r, d = _linear(goal, stats[0], beta, active, np.full(goal.controls, goal.target),
                           None if goal.mean is None else np.full(goal.controls, goal.mean),
                           keep_within=True)
        state.multiply(lay, r)
        if goal.mean is not None and np.any(d != 0):
            why = state.shift_bias(lay, goal.expand(d))
            if why:
                _no_mean(run, lay, mean_off, why)
                goal.mean = None
        tries += 1
        measured = measure(run, skeleton, _items(points, lay) + (
            _items(points, nxt) if nxt else []))
        stats = measured[:len(_items(points, lay))]
        if nxt:  # measured with this layer's weights as they now are
            ahead[nxt.index] = measured[len(stats):]
    kept = None
    if active.any() and best[1] != tries:  # an earlier try was closer than the last: back to it
        _, kept, state.scale[lay.index], state.bias[lay.index], stats = best
        if nxt is not None:
            ahead.pop(nxt.index, None)  # measured with the last try's weights
    _record(run, lay, goal, stats[-1], tries, first=False,
            killed=was_live & ~_live(stats[-1], goal))
    if kept is not None:
        kept_note(run.report, lay.name, kept, tries)
    log.debug("layer %s: %d tries", lay.name, tries)


def _no_mean(run, lay: Layer, mean_off: dict[int, str], why: str) -> None:
    mean_off[lay.index] = why
    run.report.notes.append(f"layer {lay.name}: target mean not applied: {why}")
    log.info("%s", run.report.notes[-1])


def final_measure(run, skeleton: onnx.ModelProto, points: dict[int, Point],
                  mean_off: dict[int, str], check: bool = False) -> list[int]:
    """One pass that measures every layer of the written weights and judges it, and
    ``--check``'s measurement.

    Returns:
        The layers that were converged before and are not now: a later layer moved them.
    """
    opts = run.options
    measured = measure(run, skeleton, [(lay, points.get(lay.index, Point()))
                                       for lay in run.layers])
    moved = []
    for lay, stats in zip(run.layers, measured):
        goal = _Goal(run, lay, points.get(lay.index, Point()),
                     opts.target_mean is not None and lay.index not in mean_off)
        before = [rec.status for rec in run.rows(lay)]
        _record(run, lay, goal, stats, run.rows(lay)[0].tries, first=False, check=check)
        for rec, status in zip(run.rows(lay), before):
            if not check and status == CONVERGED and rec.status != status:
                rec.message += " in the final re-measurement: a later layer changed it (a " \
                               "tied weight, a recurrence, a maxout's other piece)"
                moved.append(lay.index)
    return sorted(set(moved))
