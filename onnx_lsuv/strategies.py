"""Step 2 of Algorithm 1, the scaling: two strategies, the paper's try loop, and the checks.

* ``scale_fast`` (default): one forward pass of a copy of the graph that normalises each layer's
  output in-graph (LSUV is batch normalisation done once) gives every factor; one more pass of
  the same copy on the written weights re-measures every layer. From the first layer found off
  its target there, every layer is redone with the try loop, and a final pass re-measures the
  written model.
* ``scale_naive``: the plain re-run, a whole forward pass per try of every layer, then the same
  final pass. The reference.

Every status comes from ``verdict.judge`` on a variance measured on the written model, except
a weight that multiplies a recurrence's previous state (``Layer.multiplies_state``): like an
LSTM op's R it is never scaled, and its measured variance is reported as ``not_scaled`` with the
rule it got (``layers.recurrent_rule``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from .engine import Engine, Session
from .graph import INDEX_OPS
from .layers import Layer, recurrent_rule
from .measure_graph import (
    MIN_WHERE_OPSET,
    WEIGHT_INPUT,
    LayerBias,
    bounded_variance,
    fetching_model,
    layer_inputs,
    layer_model,
    normalizing_model,
    stats_model,
)
from .model_io import default_opset
from .options import LSUVOptions
from .report import LayerRecord, Report
from .verdict import CONVERGED, GOOD, NOT_SCALED, degenerate, judge, needs_factor, on_target
from .weights import WeightState

log = logging.getLogger("onnx_lsuv")

# progress(stage, done, total, detail): stages "init", "scaling", "re-measure", "retry"
ProgressFn = Callable[[str, int, int, str], None]
Measure = Callable[[], np.ndarray]


def no_progress(stage: str, done: int, total: int, detail: str) -> None:
    pass


@dataclass
class Run:
    """What the strategies share for one call: the model to measure, its weights, the data."""

    engine: Engine
    work: onnx.ModelProto
    state: WeightState
    feeds: dict[str, np.ndarray]  # or a data.Stream (strategy "sequential" only)
    report: Report
    options: LSUVOptions
    progress: ProgressFn = no_progress
    # Whether the weights are written as measured (not a float32 twin of a float16 model,
    # whose written weights round differently from the ones measured).
    written_as_measured: bool = True

    def __post_init__(self) -> None:
        if self.engine.name != "cpu":  # a fed array is uploaded to the device on every run;
            self.state.fed.clear()     # an initializer once per session

    @property
    def layers(self) -> list[Layer]:
        return self.state.layers

    def rows(self, lay: Layer) -> list[LayerRecord]:
        """The report rows of ``lay``: one per block (projection or gate)."""
        return self.report.layers[lay.row:lay.row + len(lay.blocks)]

    def session(self, model: onnx.ModelProto, biases: bool = False) -> Session:
        """A session of ``model`` (derived from ``state.skeleton``) with the current weights
        (and, with ``biases``, the current biases: ones shifted since the skeleton)."""
        self.state.write_constants(model, biases)
        arrays = self.state.in_memory()
        fed = {name: arrays.pop(name) for name in self.state.fed if name in arrays}
        return self.engine.session(model, arrays, fed)

    def judge(self, lay: Layer, values: np.ndarray, check: bool = False) -> None:
        """Record ``values`` (one per block, measured on the written model) as the layer's
        final variances, with the status ``verdict.judge`` gives them."""
        for rec, value in zip(self.rows(lay), np.atleast_1d(values)):
            rec.var_after = float(value)
            if lay.multiplies_state:  # never scaled: its variance is shown, not judged
                rec.status, rec.message = NOT_SCALED, recurrent_rule(self.options.init, check)
                continue
            rec.status, rec.message = judge(rec.var_after, self.options.target_var,
                                            self.options.tol, check=check,
                                            tries=None if check else rec.tries)


class Measurer:
    """Every layer's output variances (one array per layer, one value per block) with the
    current weights, from one statistics model of every layer, built once for the run's
    scaling: the re-measurement, each try of the try loop, the settling sweeps and the final
    check all read it.

    Where every target weight reaches sessions as a graph input (``WeightState.fed_weights``:
    MatMul and Gemm weights on the CPU), one session serves them all, fed the current
    weights on each run; otherwise each measurement opens a session with them. A pass is
    run only when a weight changed since the last one: the pass after a layer's last try
    also measured the next layer, with the final weights upstream of it. On an unrolled
    decoder (6,000 nodes), opening a session took about 100 forwards: one per layer and
    try was most of the time."""

    def __init__(self, run: Run, skeleton: onnx.ModelProto) -> None:
        self.run = run
        self.model, self.names = stats_model(skeleton, run.layers)
        self.session: Session | None = None
        self.key: tuple | None = None
        self.values: list[np.ndarray] = []

    def _state_key(self) -> tuple:
        state = self.run.state
        return tuple(state.total_scale(lay).tobytes() for lay in self.run.layers)

    def all(self) -> list[np.ndarray]:
        """Every layer's variances with the weights as they are now."""
        key = self._state_key()
        if key == self.key:
            return self.values
        weights = self.run.state.fed_weights()
        if weights is None or self.session is None:
            self.session = self.run.session(self.model)
        if weights is not None:
            self.session.fed.update(weights)
        values = self.session.run(self.run.feeds, self.names)
        self.values = [np.atleast_1d(v).astype(np.float64) for v in values]
        self.key = key
        return self.values

    def of(self, lay: Layer) -> Measure:
        """A measurement of one layer: its variances from ``all``."""
        return lambda: self.all()[lay.index]


def final_check(run: Run, skeleton: onnx.ModelProto, check: bool = False,
                measurer: Measurer | None = None) -> None:
    """Re-measure the written weights and judge every layer: the run's last word. A weight
    tied to a later layer may still have moved an earlier one, which no per-layer loop sees.
    With ``measurer``, its measurement of the weights as they are (a pass of the same
    session, or the last one where no weight changed since)."""
    ties = any(lay.shared_weight_users or lay.weight_read_upstream for lay in run.layers)
    measurer = measurer or Measurer(run, skeleton)
    for lay, values in zip(run.layers, measurer.all()):
        before = [rec.status for rec in run.rows(lay)]
        run.judge(lay, values, check=check)
        for rec, status in zip(run.rows(lay), before):
            if not check and ties and status == CONVERGED and rec.status != status:
                rec.message += " in the final re-measurement: a later layer changed it (a " \
                               "tied weight, or a recurrence)"


SETTLING_SWEEPS = 3


def settle(run: Run, measurer: Measurer) -> None:
    """The final check, then, where a later layer moved an earlier one off its target (a
    weight also read upstream, the steps of a recurrence: the paper's layer order is not a
    order of dependence there), up to ``SETTLING_SWEEPS`` more passes of the try loop over the
    layers found off, each with its remaining tries, and the final check again."""
    final_check(run, measurer.model, measurer=measurer)
    for _ in range(SETTLING_SWEEPS):
        moved = [lay for lay in run.layers
                 if (lay.weight_read_upstream or lay.shared_weight_users)
                 and any(rec.status not in GOOD and rec.tries < run.options.max_iter
                         for rec in run.rows(lay))]
        first = min((lay.index for lay in moved), default=None)
        if first is None:
            return
        again = [lay for lay in run.layers[first:]
                 if any(rec.status not in GOOD for rec in run.rows(lay))]
        log.info("settling %d layer(s) that later layers moved off target", len(again))
        for lay in again:
            tries(run, lay, measurer.of(lay))
        final_check(run, measurer.model, measurer=measurer)


def _kept_biases(state: WeightState, layers: list[Layer]) -> dict[int, LayerBias]:
    """Kept non-zero biases as one value per output unit (what the one-pass solve handles).

    A Gemm bias that is not per output unit (a full (M, N) matrix), and the bias of a layer
    scaled in parts, are left out: the one-pass factor is then approximate, and the
    re-measurement sends the layer to the try loop.
    """
    biases = {}
    for lay in layers:
        if not state.has_nonzero_bias(lay) or lay.is_recurrent or len(lay.blocks) > 1:
            continue
        b = state.bias[lay.index].astype(np.float64) * lay.bias_scale
        units = lay.layout.output_units
        if b.size == 1:
            b = np.full(units, b.item())
        if not state.lines_up(lay, b):
            continue
        biases[lay.index] = LayerBias(b.reshape(units))
    return biases


def exact_in_one_pass(run: Run, lay: Layer, biases: dict[int, LayerBias]) -> bool:
    """Whether the one-pass graph's rescaled output of ``lay`` is what the written model's
    layer computes, up to rounding: its output scales with its weight (with a kept bias that
    the graph solves for: one value per output unit) and every later layer reads it rescaled.
    Not so for a recurrent op, a layer in a Loop/Scan body, a weight also read upstream or
    tied to another node (whose readers the graph may not all rescale), a bias the graph
    leaves out (a full-matrix Gemm C; a layer scaled in parts), a float16 layer (its
    output rounds differently with a rescaled weight), weights written in another
    precision than measured, or a weight or bias stored (or cast on the way) in float16 or
    bfloat16, whose written bytes round the solved factor (``WeightState.written_exactly``)."""
    return (run.written_as_measured and np.dtype(lay.dtype) in (np.float32, np.float64)
            and run.state.written_exactly(lay)
            and not lay.is_recurrent and lay.body is None
            and not lay.weight_read_upstream and not lay.shared_weight_users
            and (lay.index in biases or not run.state.has_nonzero_bias(lay)))


# The largest one-pass factor whose rescaled output is taken as the written model's (its
# variance was 1e-8 of the target before); above it, the re-measurement decides.
MAX_EXACT_FACTOR = 1e4
# The largest bound on a one-pass variance's rounding error, relative to the variance, under
# which it stands for the written model's (float64) measurement: the float32 sums of a
# typical layer are bounded at 1e-6 to 3e-5; a BatchNormalization tap with a large mean, an
# output near float32's range or a long row of elements exceeds it.
MAX_RELATIVE_ERROR = 1e-4


def trusted(var: np.ndarray, err: np.ndarray, target: float, tol: float) -> bool:
    """Whether variances measured with bounded sums (``measure_graph.bounded_variance``) are as
    good as float64 ones: each bound finite and at most ``MAX_RELATIVE_ERROR`` of its variance,
    and too small to move the variance across the edge of the tolerance (so that the
    status is the one that the exact variance would get)."""
    var, err = np.asarray(var, np.float64), np.asarray(err, np.float64)
    with np.errstate(all="ignore"):
        return bool(np.all(np.isfinite(var) & np.isfinite(err) & (err >= 0)
                           & (err <= MAX_RELATIVE_ERROR * np.abs(var))
                           & (np.abs(np.abs(var - target) - tol) > err)))


def scale_fast(run: Run) -> None:
    """The one-pass solve, its re-measurement, and the try loop from the first layer off.

    The one-pass graph also measures each layer's output as it rescales it, which later
    layers read: in float64 from its exported float32 sums, with a bound on the error
    (``measure_graph.bounded_variance``). Where that is exactly the written model's layer
    output for every layer (``exact_in_one_pass``, and every factor applied as computed) and
    every bound is small (``trusted``), those are the written model's variances, and the
    re-measurement pass is skipped; otherwise it runs, in float64."""
    layers, state, n, opts = run.layers, run.state, len(run.layers), run.options
    t = time.perf_counter()
    run.progress("scaling", 0, n, "one forward pass for every layer")
    skeleton = state.skeleton(run.work)
    biases = _kept_biases(state, layers)
    exact = all(exact_in_one_pass(run, lay, biases) for lay in layers)
    norm, outs = normalizing_model(skeleton, layers, biases, opts.target_var, opts.tol,
                                   exact=False, after=exact, bounded=True)
    exact = exact and all(o.var_after is not None or o.partials for o in outs)
    names = [x for o in outs for x in (o.var_before, o.scale)]
    after_names = [o.var_after for o in outs if o.var_after is not None] if exact else []
    sums = [x for o in outs for p in o.partials for x in (p.s1, p.s2, p.size)] if exact else []
    values = run.session(norm).run(run.feeds, names + after_names + sums)
    fetched = dict(zip(names + after_names + sums, values))
    applied = {}  # layer index -> the factors the graph applied
    for lay, k in zip(layers, range(0, len(names), 2)):
        variances = np.atleast_1d(values[k]).astype(np.float64)
        raw = np.atleast_1d(values[k + 1]).astype(np.float64)
        good = np.isfinite(raw) & (raw > 0)
        scales = np.where(good, raw, 1.0)  # never a NaN weight
        exact = exact and bool(good.all())  # else later layers read another output
        # A factor this large scales up the float32 rounding in which the one-pass graph and
        # the written model differ (s (W x) against (s W) x) with the signal: a variance
        # near the noise floor (a Relu that the rescaled weights leave all but dead) is no
        # measurement of the written model, which the re-measurement then is.
        exact = exact and bool(np.all(scales <= MAX_EXACT_FACTOR))
        for rec, var, scale in zip(run.rows(lay), variances, scales):
            rec.var_before = float(var)
            rec.tries = int(scale != 1.0)
            log.debug("layer %s: var %.4g, scale %.4g", rec.name, var, scale)
        state.multiply(lay, scales)
        applied[lay.index] = scales
    if exact:  # each layer's float64 variance, where the graph gave bounded sums
        after = []
        for lay, o in zip(layers, outs):
            if o.var_after is not None:
                after.append(fetched[o.var_after])
                continue
            var, err = bounded_variance(o.partials, fetched, lay.layout.output_units,
                                        len(lay.blocks), applied[lay.index],
                                        biases[lay.index].value if lay.index in biases else None)
            after.append(var)
            if not trusted(var, err, opts.target_var, opts.tol):
                log.info("layer %s: its one-pass variance %s is known to +-%s only: measured "
                         "again in float64", lay.name, var, err)
                exact = False
    state.fold()  # the re-measure reads the scaled weights: held once, not beside the bases
    run.progress("scaling", n, n, "")
    run.report.timings["one_pass_s"] = time.perf_counter() - t

    run.report.measured_in = "one pass" if exact else "re-measure"
    measurer = None
    if exact:
        values = after
        log.info("every layer's variance measured in the one-pass graph on its rescaled "
                 "output (float64), the written model's: no re-measurement pass")
    else:
        t = time.perf_counter()
        run.progress("re-measure", 0, 1, "one forward pass of the written weights")
        # Every variance of the written weights, in float64. Up to the first layer off its
        # target, every layer is judged from it; from that layer on the try loop redoes
        # everything, on the same statistics model, and the final check measures the written
        # model again.
        measurer = Measurer(run, skeleton)
        values = measurer.all()
        run.progress("re-measure", 1, 1, "")
        run.report.timings["verify_s"] = time.perf_counter() - t
    first_off = None
    for lay, value in zip(layers, values):
        value = np.atleast_1d(value).astype(np.float64)
        if first_off is None:
            run.judge(lay, value)
            if not lay.multiplies_state and any(
                    needs_factor(float(v), opts.target_var, opts.tol) for v in value):
                first_off = lay.index
    for lay in layers:
        for rec, scale in zip(run.rows(lay), state.total_scale(lay)):
            rec.scale = float(scale)
    if first_off is None:
        return
    log.info("layer %s is off its target after the one-pass solve: retrying it and the "
             "layers after it one at a time", layers[first_off].name)
    t = time.perf_counter()
    measurer = measurer or Measurer(run, skeleton)
    reusable = state.fed_weights() is not None
    for lay in layers[first_off:]:
        # A weight also read upstream changes the layer's own input, and a weight applied by
        # several nodes is measured over all of them: whole passes then. So is a layer in an
        # If branch, which the layer alone does not copy, and every layer where one session
        # measures any weights (a pass of it costs no new session; one pass measured the
        # layer with the final weights upstream of it already).
        measure = (measurer.of(lay)
                   if reusable or lay.weight_read_upstream or lay.more_uses or lay.branch
                   else layer_measure(run, skeleton, lay))
        tries(run, lay, measure)
        run.progress("retry", lay.index - first_off + 1, n - first_off, lay.name)
    settle(run, measurer)
    run.report.timings["retry_s"] = time.perf_counter() - t


def scale_naive(run: Run) -> None:
    """A whole forward pass per try, layer after layer; then the final check."""
    measurer = Measurer(run, run.state.skeleton(run.work))
    for lay in run.layers:
        tries(run, lay, measurer.of(lay))
        run.progress("scaling", lay.index + 1, len(run.layers), lay.name)
    settle(run, measurer)


def choose(run: Run) -> Callable[[Run], None]:
    """The strategy asked for, or naive where the model's opset has no Where (with a note)."""
    if run.options.strategy == "naive":
        return scale_naive
    opset = default_opset(run.work)
    if opset < MIN_WHERE_OPSET:
        run.report.notes.append(f"opset {opset} has no Where: the in-graph solve needs opset "
                                f"{MIN_WHERE_OPSET}; used the naive strategy")
        log.info("%s", run.report.notes[-1])
        return scale_naive
    return scale_fast


def layer_measure(run: Run, skeleton: onnx.ModelProto, lay: Layer) -> Measure:
    """A measurement of one layer alone: its input from one forward pass with the final
    upstream weights, then only its own nodes (and the statistics) on each try."""
    names = layer_inputs(skeleton, lay)
    inputs = dict(zip(names, run.session(fetching_model(skeleton, names)).run(run.feeds, names)))
    bias = run.state.bias[lay.index]
    single, var_name = layer_model(skeleton, lay, inputs, bias)
    sess = run.engine.session(single)

    def measure() -> np.ndarray:
        feeds = dict(inputs)
        feeds[WEIGHT_INPUT] = np.ascontiguousarray(run.state.weight(lay))
        return np.atleast_1d(sess.run(feeds, [var_name])[0]).astype(np.float64)

    return measure


def next_scale(points: list[tuple[float, float]], target: float) -> float:
    """The weight scale to try next for one block, from the (scale, variance) pairs so far.

    A layer measured alone computes y = s z + b from a fixed input, so its variance is exactly
    quadratic in the scale s: var(s) = s^2 var(z) + 2 s cov(z, b) + var(b). From three points
    the quadratic is solved for var = target (the root nearest the current scale, or its
    minimum where the bias keeps every scale above the target); from two, the
    model s^2 var(z) + var(b) is; from one, var ~ s^2 (exact without a bias: the paper's
    sqrt(target / var) step). Where a model has no positive root (a weight also read upstream
    makes var go as s^4, for instance), the power law var ~ s^p fitted to the last two points
    takes over, with p kept between 0.5 and 8.
    """
    s_now, v_now = points[-1]
    distinct = list({s: (s, v) for s, v in points}.values())
    candidates = []
    if len(distinct) >= 3:
        (s0, v0), (s1, v1), (s2, v2) = distinct[-3:]
        with np.errstate(all="ignore"):
            a, b, c = np.polyfit([s0, s1, s2], [v0, v1, v2], 2)
        if np.isfinite([a, b, c]).all() and a > 0:
            disc = b * b - 4 * a * (c - target)
            if disc >= 0:
                roots = [(-b + sign * np.sqrt(disc)) / (2 * a) for sign in (1.0, -1.0)]
                candidates = [r for r in roots if r > 0]
            elif -b / (2 * a) > 0:  # no scale reaches the target: the closest one
                candidates = [-b / (2 * a)]
    if not candidates and len(distinct) >= 2:
        (s0, v0), (s1, v1) = distinct[-2:]
        a = (v1 - v0) / (s1 * s1 - s0 * s0)
        if np.isfinite(a) and a > 0 and (target - (v0 - a * s0 * s0)) / a > 0:
            candidates = [float(np.sqrt((target - (v0 - a * s0 * s0)) / a))]
        else:
            with np.errstate(all="ignore"):
                p = np.log(v1 / v0) / np.log(s1 / s0)
            p = p if np.isfinite(p) and 0.5 <= p <= 8.0 else 2.0
            candidates = [s_now * (target / v_now) ** (1.0 / p)]
    if not candidates:
        candidates = [s_now * np.sqrt(target / v_now)]
    best = min(candidates, key=lambda r: abs(np.log(r / s_now)))
    return float(best) if np.isfinite(best) and best > 0 else s_now * np.sqrt(target / v_now)


# The steepest growth var ~ s^p that a feeding weight's expanding step assumes, at least.
_STEEPEST = 8.0


def feeding(state: WeightState, lay: Layer) -> int:
    """How far a layer's variance may be from quadratic in its weight's scale s: 0 where it is
    quadratic (var(s) = s^2 var(z) + 2 s cov(z, b) + var(b), ``next_scale``'s model), else
    the number of its uses (a cascade of k uses pools terms up to s^2k).

    Not quadratic: a weight whose uses feed each other by value (a filter bank cascaded over
    octaves), one in a Loop/Scan body (iterations feed each other), one also read upstream by
    another node. Quadratic again: uses that feed each other only through an index, as the
    steps of an unrolled greedy decoder do (an ArgMax picks the next token, which an
    embedding Gather reads): the scale does not travel through the index, and each step's
    input stays as it is under a small change of the scale."""
    if not lay.weight_read_upstream:
        return 0
    if lay.body is not None or lay.shared_weight_users or not lay.more_uses:
        return max(2, len(lay.uses))
    index = state.index
    graph = index.graph
    roots = [use.node_index for use in lay.uses]
    cut = {i for i, node in enumerate(graph.node)
           if node.op_type in INDEX_OPS and node.domain in ("", "ai.onnx")}
    reached = index.downstream({o for r in roots for o in graph.node[r].output if o}, cut)
    return len(lay.uses) if any(graph.node[r].input[0] in reached for r in roots) else 0


def _signed(points: list[tuple[float, float]], target: float) -> list[tuple[float, float]]:
    """(log s, log(var / target)) of each try with a finite, positive variance (the last try
    of each scale), in the order of s: where the target lies, in the solve's coordinates."""
    kept = {math.log(s): math.log(v / target) for s, v in points
            if s > 0 and math.isfinite(s) and degenerate(v) is None}
    return sorted(kept.items())


def bracket(points: list[tuple[float, float]], target: float
            ) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """The narrowest pair of neighbouring tries (in log s) whose variances lie on either side
    of the target, as (log s, log(var / target)) each; None before two tries straddle it.
    var(s) is continuous, so a root lies between them; each try inside splits the pair, so
    the narrowest pair never widens."""
    pts = _signed(points, target)
    pairs = [(a, b) for a, b in zip(pts, pts[1:]) if (a[1] < 0) != (b[1] < 0)]
    return min(pairs, key=lambda p: p[1][0] - p[0][0], default=None)


def _expanding_step(points: list[tuple[float, float]], target: float, uses: int) -> float:
    """The next scale of a feeding weight before a bracket: a step on log s against
    F = log(var / target) along the slope of the last two tries, kept between 0.5 and the
    steepest growth its uses can give (s^2k for k uses, at least ``_STEEPEST``), and at most
    twice as long as the last step (a flat stretch, such as a kept bias's floor, would send
    it far past the target); at first, the paper's step from below (the first use's s^2
    dominates a small variance) and the steepest from above (the last use's)."""
    s_now, v_now = points[-1]
    steepest = max(_STEEPEST, 2.0 * uses)
    slope = 2.0 if v_now < target else steepest
    dx = -math.log(v_now / target) / slope
    pts = _signed(points[-2:], target) if len(points) >= 2 else []
    if len(pts) == 2:
        (x0, f0), (x1, f1) = pts
        p = (f1 - f0) / (x1 - x0)
        slope = min(max(p, 0.5), steepest) if math.isfinite(p) and p > 0 else slope
        longest = 2.0 * abs(x1 - x0)
        dx = min(max(-math.log(v_now / target) / slope, -longest), longest)
    return float(s_now * math.exp(dx))


def solve_scale(points: list[tuple[float, float]], target: float, feeding: int = 0) -> float:
    """The weight scale to try next for one block, from the (scale, variance) pairs so far:
    ``next_scale``'s fast steps where the variance is (close to) quadratic in the scale, a
    bracketed solve where they fail.

    A weight whose uses feed each other (a filter bank cascaded over octaves: the pooled
    variance goes as a sum of s^2, s^4, ... s^2k over k uses) or that is read upstream of
    its layer has no quadratic var(s): ``next_scale``'s fitted steps oscillated around the
    target for all 10 tries. For such a weight (``feeding``: its number of uses, else 0),
    ``_expanding_step`` moves until two tries straddle the target. Once they do (for any
    weight), var(s) being continuous, a root lies between them, and every next try lies
    strictly inside the narrowest such bracket: the first of ``next_scale``'s step (for a
    weight that does not feed itself: exact for a one-use layer), inverse quadratic
    interpolation on the last three tries, the secant of the last two and false position
    (all on log s against log(var / target)) that lands inside it; the midpoint where the
    bracket did not halve over the last two tries (Dekker's safeguard). The bracket thus at
    least halves every three tries: the solve provably converges to a root.
    """
    inside = bracket(points, target)
    if inside is None:
        if not feeding:
            return next_scale(points, target)
        return _expanding_step(points, target, feeding)
    (x_lo, f_lo), (x_hi, f_hi) = inside
    width = x_hi - x_lo
    earlier = bracket(points[:-2], target) if len(points) > 2 else None
    if earlier is not None and width > (earlier[1][0] - earlier[0][0]) / 2:
        return math.exp(x_lo + width / 2)  # not halved in two tries: bisect
    candidates = []
    if not feeding:
        candidates.append(math.log(next_scale(points, target)))
    latest = [_signed([p], target) for p in points[-3:]]
    latest = [p[0] for p in latest if p]
    if len(latest) == 3 and len({f for _, f in latest}) == 3:  # inverse quadratic
        (x0, f0), (x1, f1), (x2, f2) = latest
        candidates.append(x0 * f1 * f2 / ((f0 - f1) * (f0 - f2))
                          + x1 * f0 * f2 / ((f1 - f0) * (f1 - f2))
                          + x2 * f0 * f1 / ((f2 - f0) * (f2 - f1)))
    if len(latest) >= 2 and latest[-1][1] != latest[-2][1]:  # the secant
        (x0, f0), (x1, f1) = latest[-2:]
        candidates.append(x1 - f1 * (x1 - x0) / (f1 - f0))
    candidates.append(x_lo - f_lo * width / (f_hi - f_lo))
    margin = 1e-3 * width
    x = next((c for c in candidates if math.isfinite(c) and x_lo + margin < c < x_hi - margin),
             x_lo + width / 2)
    return math.exp(x)


def tries(run: Run, lay: Layer, measure: Measure) -> None:
    """The paper's inner loop for one layer, for each of its blocks at once: measure, rescale,
    until every block is within tol (or degenerate) or its tries reach max_iter (those spent
    by the one-pass solve count). Each next scale comes from ``solve_scale``: bracketed once
    two tries straddle the target, and from the start for a weight whose uses feed each
    other or that is read upstream (``Layer.weight_read_upstream``), whose var(s) is far
    from quadratic."""
    records, opts = run.rows(lay), run.options
    target = opts.target_var
    var = measure()
    for rec, v in zip(records, var):
        if rec.var_before is None:
            rec.var_before = float(v)
    spent = np.array([rec.tries for rec in records])
    steep = feeding(run.state, lay)
    history = [[(float(s), float(v))] for s, v in zip(run.state.scale[lay.index], var)]
    while True:
        active = np.array([needs_factor(float(v), target, opts.tol) for v in var]) & (
            spent < opts.max_iter) & (not lay.multiplies_state)
        if not active.any():
            break
        scale = run.state.scale[lay.index]
        step = np.array([solve_scale(h, target, steep) / s if on else 1.0
                         for h, s, on in zip(history, scale, active)])
        run.state.multiply(lay, step)
        spent += active
        var = measure()
        for h, s, v, on in zip(history, run.state.scale[lay.index], var, active):
            if on:
                h.append((float(s), float(v)))
        log.debug("layer %s try %d: var %s", lay.name, int(spent.max()),
                  np.array2string(var, precision=4))
    var, kept = _keep_closest(run, lay, history, var)
    for rec, n, scale in zip(records, spent, run.state.total_scale(lay)):
        rec.tries = int(n)
        rec.scale = float(scale)
    run.state.fold([lay])
    run.judge(lay, var)
    for rec, k, n in zip(records, kept, spent):
        if k is not None:
            kept_note(run.report, rec.name, k, int(n))


def kept_note(report: Report, name: str, kept: int, spent: int) -> None:
    """The note on a layer whose tries ended off target, where an earlier try was closer."""
    report.notes.append(f"layer {name}: out of tries off target; kept try {kept} of {spent} "
                        "(0: the start), the closest to the target, not the last")
    log.info("%s", report.notes[-1])


def distance(var: float, target: float) -> float:
    """How far a variance is from the target, as the weight factor sees it: |log(var /
    target)| (a factor s moves it by 2 log s, up or down alike); infinite for a degenerate
    variance. Far below the target is as far as far above: a try that shrank the weight to
    1e-7 is not 'close' because |1e-16 - 1| < |3 - 1|."""
    if degenerate(var) is not None:
        return math.inf
    return abs(math.log(var / target))


def _keep_closest(run: Run, lay: Layer, history: list[list[tuple[float, float]]],
                  var: np.ndarray) -> tuple[np.ndarray, list[int | None]]:
    """Each block still off target goes back to the try (a scale in ``history``, measured
    with the same upstream weights) whose variance was closest to the target, where an
    earlier one was closer than the last: (the variances now, per block the try kept or
    None)."""
    opts = run.options
    var = np.array(var, dtype=np.float64)
    back = np.ones(len(var))
    kept: list[int | None] = [None] * len(var)
    scale = run.state.scale[lay.index]
    for b, (points, v) in enumerate(zip(history, var)):
        if on_target(float(v), opts.target_var, opts.tol):
            continue
        k = min(range(len(points)), key=lambda j: distance(points[j][1], opts.target_var))
        if distance(points[k][1], opts.target_var) < distance(float(v), opts.target_var):
            back[b] = points[k][0] / float(scale[b])
            var[b] = points[k][1]
            kept[b] = k
    if np.any(back != 1.0):
        run.state.multiply(lay, back)
    return var, kept
