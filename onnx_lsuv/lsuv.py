"""LSUV (Mishkin & Matas 2015, Algorithm 1) on ONNX models: the public ``lsuv_init``.

1. Pre-initialise every target weight with an orthonormal matrix (per group), zero the biases.
2. From the first target layer to the last: measure the variance of the layer's output on the
   batch, divide the weight by sqrt(var / target), until |var - target| < tol or max_iter tries.

Two strategies compute step 2 and must agree within tol:

* ``fast`` (default): one forward pass of a copy of the graph that normalises each layer's output
  in-graph (LSUV is batch normalisation done once), giving every factor; one more forward pass of
  the written model re-measures every layer. A layer found off its target there (a non-linearity
  the one-pass solve cannot see) is redone with tries on the layer alone, its input computed once
  from the final upstream weights, and so are the layers after it.
* ``naive``: the plain re-run: a whole forward pass per try of every layer. The reference.

``check_variances`` re-measures a model without changing it (the CLI's ``--check``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np
import onnx
import onnxruntime as ort
import scipy

from . import __version__
from .baselines import BASELINES, baseline_weight
from .data import BatchLike, load_batches
from .engine import Engine
from .errors import InputError, RuntimeFailure
from .layers import Layer, attribute, find_layers
from .measure_graph import LayerBias, normalizing_model, stats_model
from .model_io import ModelLike, default_opset, load_model
from .orthonormal import compute_dtype, orthonormal_many
from .precision import float32_twin, has_low_precision
from .report import (
    CONVERGED,
    NOT_CONVERGED,
    OFF_TARGET,
    SKIPPED,
    LayerRecord,
    Report,
)
from .weights import WeightState, unshare_biases

log = logging.getLogger("onnx_lsuv")

STRATEGIES = ("fast", "naive")
MIN_FAST_OPSET = 9  # the in-graph rewrites use Where
INITS = ("lsuv", "orthonormal") + BASELINES
# progress(stage, done, total, detail): stages "init", "scaling", "re-measure", "retry", "check"
ProgressFn = Callable[[str, int, int, str], None]
DataLike = Union[BatchLike, Sequence[BatchLike]]


@dataclass
class LSUVResult:
    """What ``lsuv_init`` returns.

    Attributes:
        model: The new model (a copy; the model passed in is untouched).
        report: Per-layer records, skipped candidates, timings; ``report.to_dict()`` is
            JSON-serialisable.
        weights: The tensors that changed, by initializer (or Constant output) name: each target
            layer's weight, and its bias where it was zeroed. What a framework loads back.
    """

    model: onnx.ModelProto
    report: Report
    weights: dict[str, np.ndarray] = field(default_factory=dict)


def _no_progress(stage: str, done: int, total: int, detail: str) -> None:
    pass


@dataclass
class _Run:
    """What the scaling strategies share for one call."""

    engine: Engine
    work: onnx.ModelProto
    state: WeightState
    feeds: dict[str, np.ndarray]
    report: Report
    target: float
    tol: float
    max_iter: int
    progress: ProgressFn

    @property
    def layers(self) -> list[Layer]:
        return self.state.layers

    def records(self, lay: Layer) -> list[LayerRecord]:
        """The report rows of ``lay``: one per block (projection or gate)."""
        return _records_of(self.report, self.layers, lay)


def _records_of(report: Report, layers: list[Layer], lay: Layer) -> list[LayerRecord]:
    start = sum(len(other.blocks) for other in layers[:lay.index])
    return report.layers[start:start + len(lay.blocks)]


def validate_options(target_var: float, tol: float, max_iter: int, strategy: str = "fast",
                     init: str = "lsuv") -> None:
    """Raise InputError for option values LSUV cannot work with."""
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise InputError(f"tol must be a positive number, got {tol!r}")
    if not (isinstance(target_var, (int, float)) and math.isfinite(target_var) and target_var > 0):
        raise InputError(f"target_var must be a positive number, got {target_var!r}")
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise InputError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if strategy not in STRATEGIES:
        raise InputError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if init not in INITS:
        raise InputError(f"init must be one of {INITS}, got {init!r}")


def lsuv_init(
    model: ModelLike,
    data: DataLike | None,
    *,
    target_var: float = 1.0,
    tol: float = 0.1,
    max_iter: int = 10,
    seed: int = 0,
    keep_bias: bool = False,
    orthonormal: bool = True,
    orthonormal_only: bool = False,
    init: str = "lsuv",
    provider: str = "auto",
    strategy: str = "fast",
    threads: int | None = None,
    progress: ProgressFn | None = None,
    lstm_forget_bias: float | None = None,
) -> LSUVResult:
    """LSUV-initialise the Conv, ConvTranspose, Gemm and MatMul layers of an ONNX model.

    Args:
        model: An onnx.ModelProto (left untouched) or the path of an .onnx file.
        data: The batch: an array (single-input models), a dict input name -> array, or the path
            of a .npy / .npz file; or a list of these, pooled into one batch. Not needed when no
            data pass runs (``orthonormal_only`` or a baseline ``init``).
        target_var: Output variance to reach per layer. Defaults to 1.0.
        tol: Tolerance on the variance (the paper's Tol_var). Defaults to 0.1.
        max_iter: Most tries per layer (the paper's T_max). Defaults to 10.
        seed: Seed of the random draws; the same seed gives the same bytes. Defaults to 0.
        keep_bias: Keep the biases instead of zeroing them with the pre-init. Defaults to False.
        orthonormal: Orthonormal pre-init; False keeps the existing weights and biases and only
            rescales. Defaults to True.
        orthonormal_only: Stop after the pre-init (no data pass); same as init="orthonormal".
            Defaults to False.
        init: "lsuv", or a baseline to compare with: "orthonormal" (Saxe et al.), "xavier"
            (Glorot & Bengio), "msra" (He et al.); baselines run no data pass. Defaults to "lsuv".
        provider: "auto", "cpu" or "cuda". Defaults to "auto".
        strategy: "fast" (two forward passes in all) or "naive" (one per try).
            Defaults to "fast".
        threads: CPU threads for ONNX Runtime and the pre-init. Defaults to the CPUs available.
        progress: Called as progress(stage, done, total, detail) as the work goes on.
            Defaults to none.
        lstm_forget_bias: Set the input bias of every LSTM's forget gate to this value
            (Jozefowicz et al. 2015 suggest 1.0) after zeroing the biases. Defaults to none.

    Returns:
        LSUVResult with the new model, the report and the changed tensors.

    Raises:
        InputError: Unusable model, data or option (the message says which and why).
        ProviderError: The provider asked for is not available.
        RuntimeFailure: ONNX Runtime failed on the model.
    """
    t_start = time.perf_counter()
    progress = progress or _no_progress
    validate_options(target_var, tol, max_iter, strategy, init)
    if orthonormal_only:
        if not orthonormal:
            raise InputError("orthonormal_only and orthonormal=False together would change "
                             "nothing")
        if init != "lsuv":
            raise InputError(f"orthonormal_only and init={init!r} contradict each other")
        init = "orthonormal"
    if init != "lsuv" and not orthonormal:
        raise InputError(f"init={init!r} replaces the weights: orthonormal=False does not apply")
    scaling = init == "lsuv"
    work = load_model(model)
    feeds = load_batches(data, work) if scaling else None
    discovery = find_layers(work)
    layers = discovery.layers
    report = _new_report(discovery, dict(
        target_var=target_var, tol=tol, max_iter=max_iter, seed=seed, keep_bias=keep_bias,
        orthonormal=orthonormal, init=init, strategy=strategy))
    if not layers:
        log.warning("the model has no Conv, ConvTranspose, Gemm, MatMul, LSTM, GRU or RNN layer "
                    "with a constant weight: nothing to do")
        report.timings["total_s"] = time.perf_counter() - t_start
        return LSUVResult(work, report)

    reinit = init != "lsuv" or orthonormal
    zeroing = {lay.index for lay in layers} if reinit and not keep_bias else set()
    report.notes.extend(unshare_biases(work, layers, zeroing))
    state = WeightState(work, layers)
    for lay in layers:
        if lay.shared_weight_users:
            report.notes.append(f"layer {lay.name}: its weight is also read by "
                                f"{', '.join(lay.shared_weight_users)} (tied: set here)")

    if reinit:
        t = time.perf_counter()
        _pre_init(state, init, seed, threads, progress)
        if not keep_bias:
            for lay in layers:
                state.zero_bias(lay)
        report.timings["init_s"] = time.perf_counter() - t
        log.info("%s init of %d layers: %.2f s", "orthonormal" if init == "lsuv" else init,
                 len(layers), report.timings["init_s"])

    if lstm_forget_bias is not None:
        for lay in layers:
            if lay.op != "LSTM":
                continue
            if lay.bias is None:
                report.notes.append(f"layer {lay.name}: LSTM without a bias input; the forget "
                                    "gate bias was not set")
                log.warning("%s", report.notes[-1])
            else:
                state.set_forget_bias(lay, lstm_forget_bias)

    if scaling:
        engine = Engine(provider, threads)
        report.provider = engine.name
        t = time.perf_counter()
        run = _measuring_run(engine, work, state, feeds, report, progress, target_var, tol,
                             max_iter)
        if strategy == "fast" and default_opset(run.work) < MIN_FAST_OPSET:
            strategy = "naive"
            report.notes.append(f"opset {default_opset(run.work)} has no Where: the in-graph "
                                "solve needs opset 9; used the naive strategy")
            log.info("%s", report.notes[-1])
        (_scale_fast if strategy == "fast" else _scale_naive)(run)
        state.scale = dict(run.state.scale)
        report.timings["scaling_s"] = time.perf_counter() - t
        for rec in report.layers:
            if rec.status == SKIPPED:
                log.warning("layer %s skipped: %s", rec.name, rec.message)
            elif rec.status == NOT_CONVERGED:
                log.warning("layer %s did not converge: %s", rec.name, rec.message)

    state.write(work)
    _weight_stds(report, state)
    report.timings["total_s"] = time.perf_counter() - t_start
    return LSUVResult(work, report, state.changed())


def _weight_stds(report: Report, state: WeightState) -> None:
    for lay in state.layers:
        mats = lay.layout.to_matrices(state.weight(lay).astype(np.float64))
        per_block = mats.reshape(len(lay.blocks), -1)
        for rec, block in zip(_records_of(report, state.layers, lay), per_block):
            rec.weight_std = float(np.std(block))


def check_variances(
    model: ModelLike,
    data: DataLike,
    *,
    target_var: float = 1.0,
    tol: float = 0.1,
    provider: str = "auto",
    threads: int | None = None,
) -> Report:
    """Re-measure every target layer's output variance on ``data``; the model is not changed.

    Each record's ``var_after`` is the measured variance and its status ``converged`` (within
    ``tol`` of ``target_var``), ``off_target`` or ``skipped`` (zero or non-finite variance).
    ``report.converged`` is False when any layer is off target: a gate for CI.
    """
    t_start = time.perf_counter()
    validate_options(target_var, tol, 1)
    work = load_model(model)
    feeds = load_batches(data, work)
    discovery = find_layers(work)
    report = _new_report(discovery, dict(target_var=target_var, tol=tol, check=True))
    if discovery.layers:
        engine = Engine(provider, threads)
        report.provider = engine.name
        state = WeightState(work, discovery.layers)
        run = _measuring_run(engine, work, state, feeds, report, _no_progress, target_var, tol)
        values = _measure_all(run, run.state.skeleton(run.work))
        _weight_stds(report, state)
        for rec, value in zip(report.layers, np.concatenate(values)):
            rec.var_after = float(value)
            bad = _bad_variance(rec.var_after)
            if bad:
                rec.status, rec.message = SKIPPED, bad
            elif abs(rec.var_after - target_var) < tol:
                rec.status = CONVERGED
            else:
                rec.status = OFF_TARGET
                rec.message = f"|var - target| = {abs(rec.var_after - target_var):.4g} >= {tol}"
    report.timings["total_s"] = time.perf_counter() - t_start
    return report


def _new_report(discovery, options: dict) -> Report:
    for s in discovery.skipped:
        log.warning("not a target: %s (%s): %s", s.name, s.op, s.reason)
    return Report(
        layers=[LayerRecord(index=lay.index, name=lay.block_name(b), op=lay.op,
                            weight=lay.weight.name, weight_shape=list(lay.weight_shape),
                            groups=lay.layout.groups, bias=lay.bias.name if lay.bias else None,
                            block=lay.blocks[b])
                for lay in discovery.layers for b in range(len(lay.blocks))],
        skipped=[{"name": s.name, "op": s.op, "reason": s.reason} for s in discovery.skipped],
        options=options,
        versions={"onnx_lsuv": __version__, "onnx": onnx.__version__,
                  "onnxruntime": ort.__version__, "numpy": np.__version__,
                  "scipy": scipy.__version__},
    )


def _pre_init(state: WeightState, init: str, seed: int, threads: int | None,
              progress: ProgressFn) -> None:
    layers = state.layers
    recurrent = [lay for lay in layers if lay.recurrent_layout is not None]
    # One draw per weight: the layers' W first, then the recurrent R, each seeded by position.
    layouts = [lay.layout for lay in layers] + [lay.recurrent_layout for lay in recurrent]
    dtypes = [compute_dtype(lay.dtype) for lay in layers + recurrent]
    n = len(layouts)
    done = []

    def finished(i: int) -> None:
        done.append(i)
        progress("init", len(done), n, (layers + recurrent)[i].name)

    if init in BASELINES:
        weights = []
        for i, (layout, dtype) in enumerate(zip(layouts, dtypes)):
            weights.append(baseline_weight(init, layout, seed, i, dtype))
            finished(i)
    else:
        mats = orthonormal_many([layout.matrix_shape for layout in layouts], seed, dtypes,
                                workers=threads, on_done=finished)
        weights = [layout.from_matrices(m) for layout, m in zip(layouts, mats)]
    for lay, w in zip(layers, weights):
        state.set_base(lay, w)
    for lay, w in zip(recurrent, weights[len(layers):]):
        state.recurrent[lay.index] = w.astype(lay.dtype)


def _measuring_run(engine: Engine, work: onnx.ModelProto, state: WeightState,
                   feeds: dict[str, np.ndarray], report: Report, progress: ProgressFn,
                   target: float, tol: float, max_iter: int = 1) -> _Run:
    """The model, weights and feeds to measure with: the model itself, or its float32 twin
    where ONNX Runtime cannot run its float16/bfloat16 form."""
    if has_low_precision(work) and not _runs(engine, work, state):
        work, state, feeds = _float32_measuring(work, state, feeds)
        report.notes.append(f"ONNX Runtime ({engine.name}) cannot run this float16/bfloat16 "
                            "model: measured in float32, weights written in their own dtype")
        log.info("%s", report.notes[-1])
    return _Run(engine, work, state, feeds, report, target, tol, max_iter, progress)


def _runs(engine: Engine, work: onnx.ModelProto, state: WeightState) -> bool:
    """Whether ONNX Runtime can build a session of the model as it is."""
    try:
        _session(engine, state, state.skeleton(work))
        return True
    except RuntimeFailure:
        return False


def _float32_measuring(work: onnx.ModelProto, state: WeightState, feeds: dict[str, np.ndarray]):
    """The float32 twin of a float16/bfloat16 model, with the current weights and the feeds."""
    twin = float32_twin(work)
    twin_layers = find_layers(twin).layers
    twin_state = WeightState(twin, twin_layers)
    for lay in twin_layers:
        twin_state.set_base(lay, state.base[lay.index].astype(np.float32))
        twin_state.scale[lay.index] = state.scale[lay.index].copy()
        if lay.index in state.recurrent:
            twin_state.recurrent[lay.index] = state.recurrent[lay.index].astype(np.float32)
        if state.bias[lay.index] is not None:
            twin_state.bias[lay.index] = state.bias[lay.index].astype(np.float32)
    twin_state.changed_bias = set(state.changed_bias)
    low = {np.dtype(np.float16), np.dtype(onnx.helper.tensor_dtype_to_np_dtype(
        onnx.TensorProto.BFLOAT16))}
    twin_feeds = {k: v.astype(np.float32) if v.dtype in low else v for k, v in feeds.items()}
    return twin, twin_state, twin_feeds


def _session(engine: Engine, state: WeightState, model: onnx.ModelProto):
    """A session of ``model`` (derived from ``state.skeleton``) with the current weights."""
    state.write_constants(model)
    return engine.session(model, state.in_memory())


def _fetching(skeleton: onnx.ModelProto, *names: str) -> onnx.ModelProto:
    """A copy of ``skeleton`` whose only outputs are tensors ``names``."""
    model = onnx.ModelProto()
    model.CopyFrom(skeleton)
    del model.graph.output[:]
    for name in dict.fromkeys(names):
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return model


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
        if b.size != units or b.shape[-1] != units:  # e.g. a Gemm bias of shape (M, 1)
            continue
        biases[lay.index] = LayerBias(b.reshape(units))
    return biases


def _bad_variance(v: float) -> str | None:
    if not math.isfinite(v):
        return f"output variance is {v}"
    if v <= 0:
        return "output variance is 0 (constant output)"
    return None


def _scale_fast(run: _Run) -> None:
    layers, state, n = run.layers, run.state, len(run.layers)
    t = time.perf_counter()
    run.progress("scaling", 0, n, "one forward pass for every layer")
    skeleton = state.skeleton(run.work)
    biases = _kept_biases(state, layers)
    norm, outs = normalizing_model(skeleton, layers, biases, run.target, run.tol)
    values = run.engine.run(_session(run.engine, state, norm), run.feeds,
                            [n for o in outs for n in (o.var_before, o.scale)])
    for lay, k in zip(layers, range(0, len(values), 2)):
        variances, scales = np.atleast_1d(values[k]), np.atleast_1d(values[k + 1])
        scales = scales.astype(np.float64)
        for rec, var, scale in zip(run.records(lay), variances, scales):
            rec.var_before = float(var)
            bad = _bad_variance(rec.var_before)
            if bad:
                rec.status, rec.message = SKIPPED, bad
            elif scale != 1.0:
                rec.tries = 1
            log.debug("layer %s: var %.4g, scale %.4g", rec.name, var, scale)
        state.multiply(lay, scales)
        for rec, scale in zip(run.records(lay), state.scale[lay.index]):
            rec.scale = float(scale)
    run.progress("scaling", n, n, "")
    run.report.timings["one_pass_s"] = time.perf_counter() - t

    t = time.perf_counter()
    run.progress("re-measure", 0, 1, "one forward pass of the written weights")
    # Re-measure the written weights with the same rewrite (a new session gets the new weights):
    # where every layer is within tol all factors are 1 and the variances are the written
    # model's. At the first layer off target the rest is no longer the written model, and the
    # try loop below redoes it anyway.
    values = run.engine.run(_session(run.engine, state, norm), run.feeds,
                            [o.var_before for o in outs])
    run.progress("re-measure", 1, 1, "")
    run.report.timings["verify_s"] = time.perf_counter() - t
    first_off = None
    for lay, value in zip(layers, values):
        for rec, var in zip(run.records(lay), np.atleast_1d(value)):
            rec.var_after = float(var)
            if rec.status == SKIPPED:
                continue
            if abs(rec.var_after - run.target) < run.tol:
                rec.status = CONVERGED
            elif first_off is None:
                first_off = lay.index
    if first_off is not None:
        log.info("layer %s is off its target after the one-pass solve: retrying it and the "
                 "layers after it one at a time", layers[first_off].name)
        t = time.perf_counter()
        for lay in layers[first_off:]:
            # A weight also read upstream changes the layer's own input: whole passes then.
            measure = (_full_measure(run, skeleton, lay) if lay.weight_read_upstream
                       else _layer_measure(run, skeleton, lay))
            _tries(run, lay, measure, keep_before=True)
            run.progress("retry", lay.index - first_off + 1, n - first_off, lay.name)
        _final_check(run, skeleton)
        run.report.timings["retry_s"] = time.perf_counter() - t


def _measure_all(run: _Run, skeleton: onnx.ModelProto) -> list[np.ndarray]:
    """Every layer's output variances (one per block) with the current weights, in one pass."""
    if default_opset(skeleton) >= MIN_FAST_OPSET:
        measuring, names = stats_model(skeleton, run.layers)
        values = run.engine.run(_session(run.engine, run.state, measuring), run.feeds, names)
        return [np.atleast_1d(v).astype(np.float64) for v in values]
    # Below opset 9 (no Where) the statistics are taken here from the fetched tensors.
    names = list(dict.fromkeys(n for lay in run.layers for n in _measured_tensors(run, lay)))
    outs = dict(zip(names, run.engine.run(
        _session(run.engine, run.state, _fetching(skeleton, *names)), run.feeds, names)))
    return [_block_variances(run, lay, *[outs[n] for n in _measured_tensors(run, lay)])
            for lay in run.layers]


def _final_check(run: _Run, skeleton: onnx.ModelProto) -> None:
    """Re-measure the written weights once more after tries: a tied weight set later can still
    have moved an earlier layer (its reader upstream), which no per-layer loop sees."""
    for lay, values in zip(run.layers, _measure_all(run, skeleton)):
        for rec, value in zip(run.records(lay), values):
            if rec.status == SKIPPED:
                continue
            rec.var_after = float(value)
            if abs(rec.var_after - run.target) >= run.tol and rec.status == CONVERGED:
                rec.status = NOT_CONVERGED
                rec.message = f"var {rec.var_after:.4g} in the final re-measurement" + (
                    ": a weight tied to a later layer changed it" if _has_tied_users(run)
                    else "")


def _has_tied_users(run: _Run) -> bool:
    return any(lay.shared_weight_users for lay in run.layers)


def _scale_naive(run: _Run) -> None:
    skeleton = run.state.skeleton(run.work)
    for lay in run.layers:
        _tries(run, lay, _full_measure(run, skeleton, lay))
        run.progress("scaling", lay.index + 1, len(run.layers), lay.name)
    if any(lay.weight_read_upstream for lay in run.layers):
        _final_check(run, skeleton)


def _measured_tensors(run: _Run, lay: Layer) -> list[str]:
    """What a layer's variances come from: its output, or a recurrent op's input x (and its
    sequence_lens, when given)."""
    node = run.work.graph.node[lay.node_index]
    if not lay.is_recurrent:
        return [lay.output]
    return [node.input[0]] + ([node.input[4]] if len(node.input) > 4 and node.input[4] else [])


def _block_variances(run: _Run, lay: Layer, tensor: np.ndarray,
                     seq_lens: np.ndarray | None = None) -> np.ndarray:
    """Population variance per block of ``tensor`` (what ``_measured_tensors`` names).

    A fused projection's blocks are equal parts of the last axis. A recurrent op's blocks are
    its gates' input projections W_g x per direction, computed here from its input x, over
    the time steps that ``seq_lens`` leaves valid.
    """
    if lay.is_recurrent:
        w = run.state.weight(lay).astype(np.float64)  # (D, G*H, I)
        x3 = tensor.astype(np.float64)
        if seq_lens is not None:
            node = run.work.graph.node[lay.node_index]
            batch_first = attribute(node, "layout", 0) == 1
            steps = np.arange(x3.shape[1 if batch_first else 0])
            lens = np.asarray(seq_lens).astype(np.int64)
            valid = steps[None, :] < lens[:, None] if batch_first else \
                steps[:, None] < lens[None, :]
            x3 = x3[valid]
        x = x3.reshape(-1, w.shape[2])
        proj = np.einsum("ni,dki->dnk", x, w)  # (D, N, G*H)
        d, n, gh = proj.shape
        gates = len(lay.blocks) // d
        return proj.reshape(d, n, gates, gh // gates).transpose(0, 2, 1, 3).reshape(
            d * gates, -1).var(axis=1)
    blocks = len(lay.blocks)
    y = tensor.astype(np.float64)
    return y.reshape(-1, blocks, y.shape[-1] // blocks).transpose(1, 0, 2).reshape(
        blocks, -1).var(axis=1)


def _fetch_measured(run: _Run, fetch: onnx.ModelProto, lay: Layer) -> list[np.ndarray]:
    """One forward pass with the current weights; the tensors ``_measured_tensors`` names."""
    return run.engine.run(_session(run.engine, run.state, fetch), run.feeds,
                          _measured_tensors(run, lay))


def _full_measure(run: _Run, skeleton: onnx.ModelProto, lay: Layer) -> Callable[[], np.ndarray]:
    """A measurement of one layer by a whole forward pass with the current weights."""
    fetch = _fetching(skeleton, *_measured_tensors(run, lay))
    return lambda: _block_variances(run, lay, *_fetch_measured(run, fetch, lay))


def _tries(run: _Run, lay: Layer, measure: Callable[[], np.ndarray],
           keep_before: bool = False) -> None:
    """The paper's inner loop for one layer, for each of its blocks at once: measure, rescale,
    until every block is within tol (or degenerate) or max_iter tries."""
    records, target = run.records(lay), run.target
    var = measure()
    for rec, v in zip(records, var):
        if not keep_before or rec.var_before is None:
            rec.var_before = float(v)
    blocks = len(records)
    tries = np.zeros(blocks, int)
    exponent = np.full(blocks, 2.0)  # var ~ scale^2 for a linear layer
    last_step, last_var = None, None
    while True:
        bad = np.array([_bad_variance(float(v)) is not None for v in var])
        active = ~bad & (np.abs(var - target) >= run.tol) & (tries < run.max_iter)
        if not active.any():
            break
        if last_step is not None:
            # var ~ scale^p: estimate p in log space from the last step (a weight that is also
            # read upstream gives p = 4, for instance), and keep it in a sane range.
            with np.errstate(all="ignore"):
                p = np.log(var / last_var) / np.log(last_step)
            ok = np.isfinite(p) & (p >= 0.5) & (p <= 8.0) & (last_step != 1.0)
            exponent = np.where(ok, p, 2.0)
        with np.errstate(all="ignore"):
            step = np.where(active, (target / var) ** (1.0 / exponent), 1.0)
        run.state.multiply(lay, step)
        tries += active
        last_step, last_var = step, var
        var = measure()
        log.debug("layer %s try %d: var %s", lay.name, int(tries.max()),
                  np.array2string(var, precision=4))
    for b, rec in enumerate(records):
        v = float(var[b])
        rec.tries += int(tries[b])
        rec.var_after = v
        rec.scale = float(run.state.scale[lay.index][b])
        problem = _bad_variance(v)
        if problem:
            rec.status, rec.message = SKIPPED, problem
        elif abs(v - target) < run.tol:
            rec.status = CONVERGED
        else:
            rec.status = NOT_CONVERGED
            rec.message = f"|var - target| = {abs(v - target):.4g} after {int(tries[b])} tries"


def _layer_measure(run: _Run, skeleton: onnx.ModelProto, lay: Layer) -> Callable[[], np.ndarray]:
    """A measurement of one layer alone: its input from one forward pass, then only its nodes
    (for a recurrent op, only its input projections, here)."""
    engine, state, feeds = run.engine, run.state, run.feeds
    node = skeleton.graph.node[lay.node_index]
    if lay.is_recurrent:  # x is fixed: the projections are computed here on each try
        tensors = _fetch_measured(run, _fetching(skeleton, *_measured_tensors(run, lay)), lay)
        return lambda: _block_variances(run, lay, *tensors)
    x_name = node.input[0]
    (x,) = engine.run(_session(engine, state, _fetching(skeleton, x_name)), feeds, [x_name])

    nodes = [node] + ([skeleton.graph.node[lay.bias_add_node]] if lay.bias_add_node is not None
                      else [])
    w_input = "onnx_lsuv::weight"
    single_nodes = []
    for n in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        if n is node:
            c.input[1] = w_input
        single_nodes.append(c)
    inits = []
    if lay.bias is not None:
        b = state.bias[lay.index]
        b_name = nodes[-1].input[lay.bias_input[1]] if lay.bias_input else None
        inits.append(onnx.numpy_helper.from_array(b, b_name))
    elem = onnx.helper.np_dtype_to_tensor_dtype
    graph = onnx.helper.make_graph(
        single_nodes, "layer",
        [onnx.helper.make_tensor_value_info(x_name, elem(x.dtype), list(x.shape)),
         onnx.helper.make_tensor_value_info(w_input, elem(lay.dtype), None)],
        [onnx.helper.make_empty_tensor_value_info(lay.output)],
        initializer=inits,
    )
    single = onnx.helper.make_model(graph, opset_imports=skeleton.opset_import,
                                    ir_version=skeleton.ir_version)
    sess = engine.session(single)

    def measure() -> np.ndarray:
        w = state.weight(lay)
        if lay.weight_transpose is not None:  # the MatMul reads it through a Transpose
            w = np.ascontiguousarray(w.T)
        (y,) = engine.run(sess, {x_name: x, w_input: w}, [lay.output])
        return _block_variances(run, lay, y)

    return measure
