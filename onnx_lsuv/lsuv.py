"""LSUV (Mishkin & Matas 2015, Algorithm 1) on ONNX models: the public ``lsuv_init`` and
``check_variances``.

The outline of Algorithm 1, as ``lsuv_init`` runs it:

1. Pre-initialise every target weight with an orthonormal matrix (per group, gate or
   projection), and zero the biases.
2. From the first target layer to the last: measure the variance of the layer's output on the
   batch, divide the weight by sqrt(var / target), until |var - target| < tol or max_iter
   tries (``strategies``: the one-pass ``fast`` solve or the ``naive`` re-run).
3. Re-measure the written model and judge every layer (``verdict.judge``).

``check_variances`` runs step 3 alone on a model as it is (the CLI's ``--check``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import fields, replace
from typing import Any, Union

import numpy as np
import onnx
import onnxruntime as ort
import scipy

from . import __version__, policy
from .baselines import BASELINES, baseline_weight
from .data import BatchLike, Stream, constant_inputs, declared_shape, load_data, shapes_to_try
from .engine import Engine
from .errors import InputError, LSUVError, RuntimeFailure
from .graph import GraphIndex, if_nodes, node_label, scope_graph
from .layers import Branches, Discovery, Layer, find_layers, recurrent_rule
from .measure_graph import Point, activation_point, condition_model
from .model_io import (
    ModelLike,
    complete_model,
    hold_sources,
    is_mapped,
    load_model,
    mapped_range,
    materialized,
    release_sources,
    source_keys,
)
from .options import LSUVOptions, legacy_init, say
from .orthonormal import compute_dtype, orthonormal_each
from .precision import float32_feeds, float32_measuring, float32_twin, has_low_precision
from .report import LayerRecord, Report
from .roles import Role, find_roles
from .sequential import final_measure, scale_sequential
from .strategies import ProgressFn, Run, choose, final_check, no_progress
from .verdict import NOT_CONVERGED, SKIPPED
from .weights import WeightState, add_biases, unshare_biases

log = logging.getLogger("onnx_lsuv")

DataLike = Union[BatchLike, Sequence[BatchLike], Iterable]
_OPTION_NAMES = {f.name for f in fields(LSUVOptions)}


class LSUVResult:
    """What ``lsuv_init`` returns.

    Attributes:
        model: The new model (a copy; the model passed in is untouched). Built when first
            read: ``save`` writes the file without building it, each big tensor streamed from
            where it is (the new weights, the input's files, which stay open while the
            result lives), so a model is never held twice. Until it is built, the model's new
            weights are the arrays in ``weights``: change one in place before reading
            ``model`` or calling ``save``, and that is what is written.
        report: Per-layer records, skipped candidates, timings, the options; ``report.to_dict()``
            is JSON-serialisable. ``report.converged`` is False when any layer is off target or
            degenerate.
        weights: The tensors that changed, by initializer (or Constant output) name: each target
            layer's weight, and its bias where it was zeroed. What a framework loads back.
    """

    def __init__(self, model: onnx.ModelProto, report: Report,
                 weights: dict[str, np.ndarray] | None = None) -> None:
        self._work = model  # big initializers: PENDING (in ``weights``) or mapped (files)
        self._model: onnx.ModelProto | None = None
        self.report = report
        self.weights = weights if weights is not None else {}
        self._files = sorted({mapped_range(t)[0] for t in model.graph.initializer
                              if is_mapped(t)})

    def _hold(self, keys: list[str]) -> None:
        """Keep the input's files that mapped tensors read open while this result lives (a
        file replaced or removed meanwhile still gives its bytes)."""
        hold_sources(keys)
        weakref.finalize(self, release_sources, keys)

    @property
    def model(self) -> onnx.ModelProto:
        if self._model is None:
            self._model = complete_model(self._work, self.weights)
        return self._model

    @model.setter
    def model(self, value: onnx.ModelProto) -> None:
        self._model = value

    def unbuilt(self) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        """The model as it is kept (big initializers as references) and the arrays the
        references name: what ``outputs.stage_model`` writes from."""
        return (self._model, {}) if self._model is not None else (self._work, self.weights)

    def save(self, path, external_data: bool | None = None) -> list[str]:
        """Write the model to ``path`` atomically (see ``outputs.save_model_atomic``); the
        paths written."""
        from .outputs import save_model_atomic

        model, arrays = self.unbuilt()
        return save_model_atomic(model, path, external_data, arrays=arrays,
                                 protected=self._files)


def make_options(options: LSUVOptions | None = None, **keywords: Any) -> LSUVOptions:
    """``options`` (or the defaults) with ``keywords`` applied: the fields of ``LSUVOptions``,
    and the deprecated ``orthonormal`` / ``orthonormal_only`` (see ``options.legacy_init``).

    Raises:
        TypeError: An unknown keyword.
        InputError: An invalid value.
    """
    unknown = set(keywords) - _OPTION_NAMES - {"orthonormal", "orthonormal_only"}
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(sorted(unknown))}; the options are "
                        f"{', '.join(sorted(_OPTION_NAMES))}")
    orthonormal = keywords.pop("orthonormal", None)
    orthonormal_only = keywords.pop("orthonormal_only", None)
    base = options or LSUVOptions()
    init = legacy_init(keywords.get("init", base.init), None if orthonormal is None
                       else bool(orthonormal), bool(orthonormal_only))
    return replace(base, **{**keywords, "init": init})


def lsuv_init(model: ModelLike, data: DataLike | None = None,
              options: LSUVOptions | None = None, *, progress: ProgressFn | None = None,
              source: str | os.PathLike | None = None, **keywords: Any) -> LSUVResult:
    """LSUV-initialise the Conv, ConvTranspose, Gemm, MatMul, LSTM, GRU and RNN layers.

    Args:
        model: An onnx.ModelProto (left untouched) or the path of an .onnx file.
        data: The batch: an array (single-input models), a dict input name -> array, or the path
            of a .npy / .npz file; or a list of these, pooled into one batch. Or a stream of
            batches, read again for every layer with one batch in memory: a directory of
            .npy / .npz files, or any other iterable of batches (a generator, which is spooled
            to a temporary directory; a DataLoader, whose (inputs, labels) tuples give their
            inputs, and which must yield the same batches on every pass). Required for
            init "lsuv" and "rescale"; not read otherwise. Defaults to None.
        options: An ``LSUVOptions``. Defaults to ``LSUVOptions()``.
        progress: Called as progress(stage, done, total, detail) as the work goes on.
            Defaults to none.
        source: The file ``model`` was loaded from, for messages (when ``model`` is a
            ModelProto). Defaults to ``model`` itself when it is a path.
        **keywords: Fields of ``LSUVOptions`` that override ``options``: target_var, tol,
            max_iter, seed, init, keep_bias, lstm_forget_bias, provider, strategy, threads,
            include, exclude, target_mean, after_activation, per_channel, fixed, policy,
            attn_logit_std, branch_ratio, stream_var, head_std.
            (``orthonormal=False`` and ``orthonormal_only=True`` still work, deprecated: they
            mean init="rescale" and init="orthonormal".)

    Returns:
        LSUVResult with the new model, the report and the changed tensors.

    Raises:
        InputError: Unusable model, data or option, or a model ONNX Runtime refuses as it is
            (the message says which and why).
        ProviderError: The provider asked for is not available.
        RuntimeFailure: ONNX Runtime failed on one of onnx-lsuv's measuring copies.
    """
    t_start = time.perf_counter()
    opts = make_options(options, **keywords)
    progress = progress or no_progress
    if opts.scaling and data is None:
        raise InputError(f"data is required for init={opts.init!r}: pass a batch (an array, a "
                         "dict of arrays or a .npy/.npz path); the baselines 'orthonormal', "
                         f"{', '.join(repr(b) for b in BASELINES)} need none")
    work = load_model(model, mapped=True)
    keys = source_keys(work)
    hold_sources(keys)  # for the call; the result holds them after it
    feeds = None
    try:
        feeds = load_data(data, work) if opts.scaling else None
        result = _lsuv(work, feeds, opts, progress, model if source is None else source,
                       t_start)
        result._hold(keys)
        return result
    finally:
        release_sources(keys)
        if isinstance(feeds, Stream):
            feeds.close()


def _lsuv(work: onnx.ModelProto, feeds, opts: LSUVOptions, progress: ProgressFn,
          model: ModelLike, t_start: float) -> LSUVResult:
    sequential = _sequential(opts, feeds)
    if opts.policy == "transformer" and isinstance(feeds, Stream):
        raise InputError(f"{say('policy', 'transformer')} measures one batch: pool the batches "
                         "(several files, or a list of arrays), not a stream of them")
    branches, branch_notes = _branches(work, feeds, opts, model)
    discovery = find_layers(work, opts.selection, branches)
    bias_notes: list[str] = []
    mean_off: dict[int, str] = {}
    if opts.target_mean is not None:  # (the options allow it with a scaling init only)
        added, refused = add_biases(work, discovery.layers)
        if added:  # found again, with their new biases
            discovery = find_layers(work, opts.selection, branches)
        bias_notes = added + refused
    report = _new_report(discovery, opts.to_dict())
    _graph_notes(report, [(branch_notes, "If node(s) whose branch the data chose")])
    layers = discovery.layers
    if not layers:
        if report.not_initialised:
            log.warning("no layer could be initialised: %d candidate(s) not initialised "
                        "(%s them to accept that)", len(report.not_initialised), say("exclude"))
        elif report.skipped:  # the model has layers: each was excluded or left alone
            excluded = sum(s["excluded"] for s in report.skipped)
            log.warning("nothing to do: all %d candidate layers are left alone (%s)",
                        len(report.skipped),
                        f"{excluded} by {say('exclude')}" if excluded == len(report.skipped)
                        else f"{excluded} by {say('exclude')}, "
                        f"{len(report.skipped) - excluded} by a rule; see the table")
        else:
            log.warning("the model has no Conv, ConvTranspose, Gemm, MatMul, LSTM, GRU or RNN "
                        "layer with a constant weight: nothing to do")
        report.timings["total_s"] = time.perf_counter() - t_start
        return LSUVResult(work, report)

    transformer = opts.policy == "transformer" and opts.scaling
    roles = _roles(work, layers, transformer, report.notes)
    _role_columns(report, layers, roles)
    if roles and not transformer and opts.scaling:
        _suggest_the_policy(report, roles)
    table_notes: list[str] = []
    tables = policy.tables_of(work, roles, opts.selection, table_notes) if transformer else {}
    _graph_notes(report, [(table_notes, "token embedding(s) left alone")])
    for table in tables.values():
        report.layers.append(policy.table_record(table, len(report.layers), 0))
    zeroing = {lay.index for lay in layers} if opts.zero_bias else set()
    shifting = set()
    if opts.target_mean is not None:
        mean_off = _mean_off(layers)
        shifting = {lay.index for lay in layers if lay.index not in mean_off}
    copies = unshare_biases(work, layers, zeroing, shifting)
    state = WeightState(work, layers)
    if shifting:  # and the biases that are there but cannot take a shift per unit
        mean_off = {**_mean_off(layers, state), **mean_off}
    node_name = GraphIndex(work.graph).node_name
    pooled = [f"layer {lay.name}: its weight is applied by {len(lay.uses)} nodes "
              f"({', '.join(node_name(u.node_index) for u in lay.uses)}): one layer, measured "
              "over all of them" for lay in layers if lay.more_uses]
    ties = [f"layer {lay.name}: its weight is also read by {', '.join(lay.shared_weight_users)}"
            " (tied: set here)" for lay in layers if lay.shared_weight_users]
    recurrent = _recurrent_notes(layers, opts.init, node_name)
    points, point_notes = _points(work, layers, opts)
    if sequential and opts.strategy == "fast":
        report.notes.append("solved layer by layer (strategy 'sequential'), as "
                            + ("a stream of batches needs" if isinstance(feeds, Stream)
                               else "the options target_mean, after_activation and "
                               "per_channel need"))
        log.info("%s", report.notes[-1])
    _graph_notes(report, [(copies, "shared bias(es) given their own copy"),
                          (pooled, "weight(s) applied by several nodes"),
                          (ties, "tied weight(s)"),
                          (recurrent, "recurrent weight(s)"),
                          (bias_notes, "note(s) on biases for the target mean"),
                          # (a layer left without a bias has its note from add_biases)
                          ([f"layer {layers[i].name}: target mean not applied: {why}"
                            for i, why in mean_off.items()
                            if layers[i].bias is not None or layers[i].is_recurrent],
                           "layer(s) without a target mean"),
                          (point_notes, "layer(s) measured at their output, not after an "
                                        "activation")])
    if opts.reinit:  # step 1
        t = time.perf_counter()
        _pre_init(state, opts, progress)
        if opts.zero_bias:
            for lay in layers:
                state.zero_bias(lay)
        report.timings["init_s"] = time.perf_counter() - t
        log.info("%s init of %d layers: %.2f s", "orthonormal" if opts.init == "lsuv"
                 else opts.init, len(layers), report.timings["init_s"])
    if opts.lstm_forget_bias is not None:
        _set_forget_biases(state, opts.lstm_forget_bias, report)
    if opts.scaling:  # steps 2 and 3
        t = time.perf_counter()
        with _blaming_the_input(model, feeds):
            run = _measuring_run(Engine(opts.provider, opts.threads), work, state, feeds,
                                 report, opts, progress, branches)
            if sequential:
                scale_sequential(run, points, mean_off)
            else:
                choose(run)(run)
            if transformer:
                _transformer(run, roles, tables, points, mean_off, sequential)
        if run.state is not state:  # measured on the float32 twin: its scales, shifted biases
            state.scale = {lay.index: run.state.total_scale(lay) for lay in run.state.layers}
            for i in run.state.changed_bias:
                state.bias[i] = run.state.bias[i].astype(state.bias[i].dtype)
                state.changed_bias.add(i)
        report.timings["scaling_s"] = time.perf_counter() - t
        _warn_off_target(report, feeds)

    state.fold()
    changed = state.changed()
    state.write(work, pending=changed)
    for table in tables.values():  # (a token embedding's table: no target layer's weight)
        changed[table.name] = table.current
        policy.write_table(work, table)
    _weight_stds(report, state)
    report.timings["total_s"] = time.perf_counter() - t_start
    return LSUVResult(work, report, changed)


def check_variances(model: ModelLike, data: DataLike, options: LSUVOptions | None = None,
                    *, source: str | os.PathLike | None = None, **keywords: Any) -> Report:
    """Re-measure every target layer's output variance on ``data``; the model is not changed.

    Each record's ``var_after`` is the measured variance and its status ``converged`` (within
    ``tol`` of ``target_var``) or ``off_target`` (anything else, a zero or non-finite variance
    included). ``report.converged`` is False when any layer is off target: a gate for CI. A
    weight that multiplies a recurrence's previous state is not judged by its variance (its
    rule is not unit variance): ``not_scaled``, with a message that says so.

    Args:
        model: An onnx.ModelProto or the path of an .onnx file.
        data: The batch, as for ``lsuv_init``.
        options: An ``LSUVOptions``; target_var, tol, provider and threads apply, and with
            policy "transformer" the role targets: each layer with a role is judged by its
            role's measure (``policy.final_roles``). Defaults to ``LSUVOptions()``.
        source: The file ``model`` was loaded from, for messages. Defaults to ``model``.
        **keywords: Fields of ``LSUVOptions`` that override ``options``.
    """
    t_start = time.perf_counter()
    opts = make_options(options, **keywords)
    if data is None:
        raise InputError("data is required to check a model's variances")
    work = load_model(model, mapped=True)
    keys = source_keys(work)
    hold_sources(keys)
    feeds = None
    try:
        feeds = load_data(data, work)
        transformer = opts.policy == "transformer"
        if transformer and isinstance(feeds, Stream):
            raise InputError(f"{say('policy', 'transformer')} measures one batch: pool the "
                             "batches (several files, or a list of arrays), not a stream")
        branches, branch_notes = _branches(work, feeds, opts, model if source is None
                                           else source)
        discovery = find_layers(work, opts.selection, branches)
        report = _new_report(discovery, dict(
            target_var=opts.target_var, tol=opts.tol, check=True, include=list(opts.include),
            exclude=list(opts.exclude), target_mean=opts.target_mean,
            after_activation=opts.after_activation, per_channel=opts.per_channel,
            **({"policy": opts.policy, "attn_logit_std": opts.attn_logit_std,
                "branch_ratio": opts.branch_ratio, "stream_var": opts.stream_var,
                "head_std": opts.head_std} if transformer else {})))
        report.notes.extend(branch_notes)
        roles = _roles(work, discovery.layers, transformer, report.notes)
        _role_columns(report, discovery.layers, roles)
        tables = policy.tables_of(work, roles, opts.selection, report.notes) \
            if transformer else {}
        for table in tables.values():
            report.layers.append(policy.table_record(table, len(report.layers), 0))
        if discovery.layers:
            state = WeightState(work, discovery.layers)
            points, point_notes = _points(work, discovery.layers, opts)
            report.notes.extend(point_notes)
            with _blaming_the_input(model if source is None else source, feeds):
                run = _measuring_run(Engine(opts.provider, opts.threads), work, state, feeds,
                                     report, opts, no_progress, branches)
                if _sequential(opts, feeds):
                    final_measure(run, run.state.skeleton(run.work), points,
                                  _mean_off(discovery.layers, state), check=True)
                else:
                    final_check(run, run.state.skeleton(run.work), check=True)
                if transformer:
                    _check_roles(run, roles, tables)
            _weight_stds(report, state)
    finally:
        release_sources(keys)
        if isinstance(feeds, Stream):
            feeds.close()
    report.timings["total_s"] = time.perf_counter() - t_start
    return report


def _sequential(opts: LSUVOptions, feeds) -> bool:
    """Whether the run is solved layer by layer: asked for, or needed by the options or by a
    stream of batches (which the naive strategy does not take)."""
    if isinstance(feeds, Stream) and opts.strategy == "naive":
        raise InputError(f"{say('strategy', 'naive')} measures one batch: pool the batches "
                         f"(several files, or a list), or use {say('strategy', 'fast')} or "
                         f"{say('strategy', 'sequential')} for a stream")
    return opts.strategy == "sequential" or opts.extended or isinstance(feeds, Stream)


def _mean_off(layers: list[Layer], state: WeightState | None = None) -> dict[int, str]:
    """Layers whose mean cannot be set through a bias, and why (with ``state``, also those
    whose bias is not one value per output unit, or not applied)."""
    off = {}
    for lay in layers:
        if lay.is_recurrent:
            off[lay.index] = ("a recurrent op's bias acts on the gates through W x + R h: its "
                              "mean is not set")
        elif lay.multiplies_state:
            off[lay.index] = "it multiplies the previous state (recurrent, not scaled): its " \
                             "mean is not set"
        elif lay.bias is None:
            off[lay.index] = "the layer has no bias and none could be added"
        elif lay.bias_scale == 0:
            off[lay.index] = "its Gemm's beta is 0: the bias is not applied"
        elif state is not None and state.unit_bias(lay) is None:
            off[lay.index] = "its bias does not hold one value per output unit"
    return off


def _recurrent_notes(layers: list[Layer], init: str, node_name) -> list[str]:
    """Which rule each recurrent weight got, in the same words for an LSTM/GRU/RNN op's R and
    for a weight that multiplies the previous state of a Loop/Scan body or unrolled steps."""
    notes = []
    for lay in layers:
        if lay.recurrent is not None:  # R may be joined from several (torch's directions)
            names = [lay.recurrent.name] + ([r.name for r, _ in lay.recurrent_chain.more]
                                            if lay.recurrent_chain else [])
            what = "weights" if len(names) > 1 else "weight"
            notes.append(f"layer {lay.name}: its recurrent {what} "
                         f"{', '.join(repr(n) for n in names)} (R): {recurrent_rule(init)}")
        elif lay.multiplies_state:
            where = (f"in the body of {node_name(lay.node_index)}" if lay.body is not None
                     else f"over {len(lay.uses)} unrolled steps")
            notes.append(f"layer {lay.name}: its weight {lay.weight.name!r} multiplies the "
                         f"previous state {where}: {recurrent_rule(init)}")
    return notes


def _points(work: onnx.ModelProto, layers: list[Layer],
            opts: LSUVOptions) -> tuple[dict[int, Point], list[str]]:
    """Where each layer is measured: after its activation with ``after_activation`` (where it
    has exactly one), else at its output; and a note per layer that has none."""
    if not opts.after_activation:
        return {}, []
    index = GraphIndex(work.graph)
    points, notes = {}, []
    for lay in layers:
        point, why = activation_point(index, lay)
        points[lay.index] = point
        if why:
            notes.append(f"layer {lay.name}: measured at its output, not after an activation: "
                         f"{why}")
    return points, notes


def _graph_notes(report: Report, kinds: list[tuple[list[str], str]]) -> None:
    """Record the notes on the graph's structure; one summary line, each note with -v."""
    counts = [f"{len(notes)} {what}" for notes, what in kinds if notes]
    for notes, _ in kinds:
        report.notes.extend(notes)
        for note in notes:
            log.debug("note: %s", note)
    if counts:
        log.info("notes: %s (-v shows each, --report keeps them)", ", ".join(counts))


def _new_report(discovery: Discovery, options: dict) -> Report:
    for pattern in discovery.unused_patterns:
        log.warning("%s %r matches no layer (no node name, weight name or op type; patterns "
                    "are case-sensitive globs): it does nothing", say(
                        "include" if pattern in options.get("include", ()) else "exclude"),
                    pattern)
    for s in discovery.skipped:
        if s.excluded:  # the user's own choice: the table and the report list it
            log.debug("not a target: %s (%s): %s", s.name, s.op, s.reason)
        elif s.by_rule:
            log.warning("not a target: %s (%s): %s", s.name, s.op, s.reason)
        else:
            log.warning("NOT initialised: %s (%s): %s", s.name, s.op, s.reason)
    return Report(
        layers=[LayerRecord(index=lay.index, name=lay.block_name(b), op=lay.op,
                            weight=lay.weight.name, weight_shape=list(lay.weight_shape),
                            groups=lay.layout.groups, bias=lay.bias.name if lay.bias else None,
                            block=lay.blocks[b])
                for lay in discovery.layers for b in range(len(lay.blocks))],
        skipped=[{"name": s.name, "op": s.op, "reason": s.reason, "excluded": s.excluded,
                  "by_rule": s.by_rule} for s in discovery.skipped],
        options=options,
        versions={"onnx_lsuv": __version__, "onnx": onnx.__version__,
                  "onnxruntime": ort.__version__, "numpy": np.__version__,
                  "scipy": scipy.__version__},
    )


def _transformer(run: Run, roles: dict[str, Role], tables: dict[str, policy.Table],
                 points: dict[int, Point], mean_off: dict[int, str], sequential: bool) -> None:
    """Policy "transformer" after the paper's scaling: each role's target (``policy``),
    then every layer measured again on the written weights, the role layers judged by their
    role's measure."""
    if not roles:
        run.report.notes.append(f"{say('policy', 'transformer')}: no transformer roles found "
                                "(no attention recognised): the paper's rule for every layer")
        log.warning("%s", run.report.notes[-1])
        return
    t = time.perf_counter()
    goals = policy.apply(run, roles, tables)
    skeleton = run.state.skeleton(run.work)
    if sequential:
        final_measure(run, skeleton, points, mean_off)
    else:
        final_check(run, skeleton)
    records: dict[str, list[LayerRecord]] = {}
    for lay in run.layers:
        records[lay.name] = run.rows(lay)
    for rec in run.report.layers[sum(len(lay.blocks) for lay in run.layers):]:
        records[rec.name] = [rec]
    policy.final_roles(run, goals, records)
    policy.policy_rows(run.report.layers, run.options.target_var)
    run.report.timings["policy_s"] = time.perf_counter() - t


def _roles(work: onnx.ModelProto, layers: list[Layer], needed: bool,
           notes: list[str]) -> dict[str, Role]:
    """The layers' transformer roles. Only shown in the report unless the policy needs them:
    there, a failure of the recognition is the policy's error, and what it left without a
    role is said in ``notes``; elsewhere the paper's run goes on without the column (logged
    with -v)."""
    if needed:
        return find_roles(work, layers, notes)
    try:
        return find_roles(work, layers)
    except Exception as err:  # noqa: BLE001  (the column is no part of the paper's result)
        log.debug("transformer roles not found: %s: %s", type(err).__name__, err)
        return {}


def _suggest_the_policy(report: Report, roles: dict[str, Role]) -> None:
    """A model with pre-LN transformer blocks, initialised by the paper's rule: say that
    ``policy="transformer"`` exists and why (docs/transformers.md: on the pre-LN nets of
    experiments/, the paper's rule cost the ViT 4.7 points against PyTorch's default, which the
    policy matched).
    The default stays the paper's: a model written by one policy fails the other's --check,
    so a changed default would turn existing CI gates red."""
    pre = {r.block for r in roles.values() if r.norm == "pre" and r.block is not None}
    if not pre:
        return
    text = (f"{len(pre)} pre-LN transformer block(s) found (the role column): the paper's "
            f"unit variance widens their attention logits and residual branches; "
            f"{say('policy', 'transformer')} sets targets made for them (docs/transformers.md)")
    report.notes.append(text)
    log.warning(text)


def _check_roles(run: Run, roles: dict[str, Role], tables: dict[str, policy.Table]) -> None:
    """Policy "transformer" in a check: each role's measure on the model as it is, judged
    against its target (``policy.final_roles``; off_target where it is not within tol)."""
    if not roles:
        run.report.notes.append("policy 'transformer': no transformer roles found (no "
                                "attention recognised): every layer checked by the paper's "
                                "target")
        return
    goals = policy.goals(run, roles, tables)
    records: dict[str, list[LayerRecord]] = {lay.name: run.rows(lay) for lay in run.layers}
    for rec in run.report.layers[sum(len(lay.blocks) for lay in run.layers):]:
        records[rec.name] = [rec]
    policy.final_roles(run, goals, records, check=True)
    policy.policy_rows(run.report.layers, run.options.target_var)


def _role_columns(report: Report, layers: list[Layer], roles: dict[str, Role]) -> None:
    """Each layer's transformer role (``roles.find_roles``) in its report rows."""
    for lay in layers:
        role = roles.get(lay.name)
        if role is not None:
            for rec in report.layers[lay.row:lay.row + len(lay.blocks)]:
                rec.role, rec.role_block = role.kind, role.block


def _pre_init(state: WeightState, opts: LSUVOptions, progress: ProgressFn) -> None:
    """New draws of every weight: orthonormal (per group) or a baseline."""
    layers = state.layers
    recurrent = [lay for lay in layers if lay.recurrent_layout is not None]
    # One draw per weight: the layers' W first, then the recurrent R, each seeded by position.
    layouts = [lay.layout for lay in layers] + [lay.recurrent_layout for lay in recurrent]
    dtypes = [compute_dtype(lay.dtype) for lay in layers + recurrent]
    names = [lay.name for lay in layers + recurrent]
    done = []

    def finished(i: int) -> None:
        done.append(i)
        progress("init", len(done), len(layouts), names[i])

    def place(i: int, w: np.ndarray) -> None:  # each weight set as it comes: held once
        if i < len(layers):
            state.set_base(layers[i], w)
        else:
            lay = recurrent[i - len(layers)]
            state.recurrent[lay.index] = w.astype(lay.dtype, copy=False)
        finished(i)

    if opts.init in BASELINES:
        for i, (layout, dtype) in enumerate(zip(layouts, dtypes)):
            place(i, baseline_weight(opts.init, layout, opts.seed, i, dtype))
    else:
        draws = orthonormal_each([layout.matrix_shape for layout in layouts], opts.seed, dtypes,
                                 workers=opts.threads)
        for i, mats in draws:
            w = layouts[i].from_matrices(mats)
            del mats
            place(i, w)
            del w


def _set_forget_biases(state: WeightState, value: float, report: Report) -> None:
    if not any(lay.op == "LSTM" for lay in state.layers):
        report.notes.append(f"{say('lstm_forget_bias')} does nothing: the model has no LSTM "
                            "layer among its targets")
        log.warning("%s", report.notes[-1])
        return
    for lay in state.layers:
        if lay.op != "LSTM":
            continue
        if lay.bias is None:
            report.notes.append(f"layer {lay.name}: LSTM without a bias input; the forget "
                                "gate bias was not set")
            log.warning("%s", report.notes[-1])
        else:
            state.set_forget_bias(lay, value)


def _measuring_run(engine: Engine, work: onnx.ModelProto, state: WeightState,
                   feeds, report: Report, opts: LSUVOptions,
                   progress: ProgressFn, branches: Branches | None = None) -> Run:
    """The model, weights and feeds to measure with: the model itself, or its float32 twin
    where ONNX Runtime cannot run its float16/bfloat16 form (on the batch: a session that
    loads may still fail to run)."""
    report.provider = engine.name
    run = Run(engine, work, state, feeds, report, opts, progress)
    if has_low_precision(work):
        try:
            run.session(state.skeleton(work)).check(
                feeds.first if isinstance(feeds, Stream) else feeds)
        except RuntimeFailure:
            twin, twin_state, twin_feeds = float32_measuring(work, state, feeds,
                                                             opts.selection, branches)
            report.notes.append(f"ONNX Runtime ({engine.name}) cannot run this float16/bfloat16 "
                                "model: measured in float32, weights written in their own dtype")
            log.info("%s", report.notes[-1])
            run = Run(engine, twin, twin_state, twin_feeds, report, opts, progress,
                      written_as_measured=False)
    return run


def _branches(work: onnx.ModelProto, feeds, opts: LSUVOptions,
              model: ModelLike) -> tuple[Branches | None, list[str]]:
    """Which branch of each If the data takes (``layers.Branches``), from the If conditions
    evaluated once on the data, and a note per If saying which; (None, []) without If nodes
    or without data (nothing is measured then: every branch's layers are targets).

    An If's condition is one boolean for the whole batch, so the batch takes one branch; a
    stream's batches may take different ones (None then: that If is not handled)."""
    ifs = if_nodes(work.graph)
    if not ifs or feeds is None:
        return None, []
    with _blaming_the_input(model, feeds):
        try:
            seen = _conditions(work, feeds, ifs, opts)
        except RuntimeFailure:
            if not has_low_precision(work):
                raise
            seen = _conditions(float32_twin(work), float32_feeds(feeds), ifs,
                               opts)  # as the measuring will be
    branches: Branches = {}
    notes = []
    for (scope, i), values in zip(ifs, seen):
        if not values:
            continue  # inside a branch the data does not take
        taken = next(iter(values)) if len(values) == 1 else None
        branches[(scope, i)] = taken
        where = "".join(f"{_node_name(work.graph, scope[:d], j)}/{attr}/"
                        for d, (j, attr) in enumerate(scope))
        name = where + _node_name(work.graph, scope, i)
        notes.append(f"If {name}: the batches take both branches (its condition differs "
                     "between them): neither branch's layers are measured" if taken is None
                     else f"If {name}: the data takes its {'then' if taken else 'else'}_branch "
                     f"(its condition is {taken} on the batch): that branch's layers are "
                     f"targets; the {'else' if taken else 'then'}_branch is not reached")
        log.info("%s", notes[-1])
    return branches, notes


def _conditions(work: onnx.ModelProto, feeds, ifs: list, opts: LSUVOptions) -> list[set[bool]]:
    """Per If of ``ifs``, the values its condition takes over the data's batches (none where
    a branch around it is not taken)."""
    state = WeightState(work, [])
    skeleton, names = condition_model(state.skeleton(work), ifs)
    run = Run(Engine(opts.provider, opts.threads), work, state, feeds, Report(), opts)
    session = run.session(skeleton)
    seen: list[set[bool]] = [set() for _ in ifs]
    for batch in feeds if isinstance(feeds, Stream) else [feeds]:
        for k, value in enumerate(session.run(batch, names)):
            value = np.asarray(value).reshape(-1)
            if value.size:  # (empty: an If around it took the other branch)
                seen[k].add(bool(value[0]))
    return seen


def _node_name(graph: onnx.GraphProto, scope, i: int) -> str:
    return node_label(scope_graph(graph, scope).node[i], i)


@contextlib.contextmanager
def _blaming_the_input(model: ModelLike, feeds):
    """Turns a RuntimeFailure into an InputError when ONNX Runtime also refuses the user's own,
    unmodified model on the same data: it cannot load it (a custom op, duplicate node names,
    an IR or opset newer than it supports), or it fails on the batch, whose shape fits the
    declared one only through its named axes (see ``_misfit``). That is bad input, not a
    failure of onnx-lsuv's rewrites."""
    try:
        yield
    except RuntimeFailure as err:
        try:
            original = materialized(load_model(model, mapped=True))
            serialised = original.SerializeToString()
        except (ValueError, LSUVError):  # e.g. over protobuf's 2 GiB: no verdict either way
            raise err from None
        where = f" {model}" if not isinstance(model, onnx.ModelProto) else ""
        first = feeds.first if isinstance(feeds, Stream) else feeds
        try:
            session = Engine("cpu").session(serialised)
        except RuntimeFailure as refused:
            raise InputError(f"ONNX Runtime cannot run the model{where} as it is: "
                             f"{refused.__cause__ or refused}") from err
        try:
            session.check(first)
        except RuntimeFailure as refused:
            raise InputError(_misfit(original, session, first, refused.__cause__ or refused,
                                     where)) from err
        raise


def _misfit(model: onnx.ModelProto, session, feeds: dict[str, np.ndarray], cause,
            where: str) -> str:
    """What to say when ONNX Runtime loads the user's model but fails on the batch: each
    input's batch shape beside its declared one, and, where a shape read from the layer that
    takes the input (``shapes_to_try``) runs on zeros, that shape: the message never claims a
    shape that ONNX Runtime has not run."""
    declared = {vi.name: vi for vi in model.graph.input}
    for name, arr in feeds.items():
        if name not in declared:
            continue
        for shape in shapes_to_try(model, name, np.shape(arr)):
            try:
                session.check({**feeds, name: np.zeros(shape, np.asarray(arr).dtype)})
            except RuntimeFailure:
                continue
            return (f"input {name!r}: the batch of shape {tuple(np.shape(arr))} does not fit "
                    f"the model{where} (declared {declared_shape(declared[name])}): ONNX "
                    f"Runtime fails on it ({cause}); a batch of shape {shape} runs through it")
    shapes = ", ".join(f"{name!r}: batch {tuple(np.shape(arr))}, declared "
                       f"{declared_shape(declared[name])}" for name, arr in feeds.items()
                       if name in declared)
    return (f"ONNX Runtime cannot run the model{where} on the data ({shapes}): {cause}; either "
            "the batch's shape does not fit the model on an axis it declares by name, or the "
            "model does not run as it is")


def _std(flat: np.ndarray, step: int = 1 << 20) -> float:
    parts = [slice(k, k + step) for k in range(0, flat.size, step)]
    mean = sum(float(flat[p].sum(dtype=np.float64)) for p in parts) / max(flat.size, 1)
    sq = sum(float(np.square(flat[p].astype(np.float64) - mean).sum()) for p in parts)
    return float(np.sqrt(sq / max(flat.size, 1)))


def _warn_off_target(report: Report, feeds) -> None:
    """One warning per cause, naming its layers: a constant batch makes every layer's output
    constant, which is said once, with what to do, not once per layer."""
    constant = constant_inputs(feeds) if isinstance(feeds, dict) else None
    if constant:
        dead = [rec.name for rec in report.layers if rec.status == SKIPPED]
        report.notes.append(
            f"the data is constant ({', '.join(constant)}): "
            + (f"{len(dead)} of {len(report.layers)} layers have a constant output and were "
               "not scaled; " if dead else "the variances measured come from the model "
               "(padding, biases), not from the data; ")
            + "give a batch of real samples (LSUV measures each layer's output variance "
            "over the batch)")
        log.warning("%s", report.notes[-1])
    groups: dict[tuple[str, str], list[str]] = {}
    for rec in report.layers:
        if rec.status == SKIPPED and not constant:
            groups.setdefault(("skipped (not on target)", rec.message), []).append(rec.name)
        elif rec.status == NOT_CONVERGED:
            groups.setdefault(("did not converge", rec.message), []).append(rec.name)
    for (what, why), names in groups.items():
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        log.warning("layer%s %s %s: %s", "s" if len(names) > 1 else "", shown, what, why)


def _weight_stds(report: Report, state: WeightState) -> None:
    for lay in state.layers:
        w = state.weight(lay)
        if len(lay.blocks) == 1:  # in float64, a bounded part at a time
            report.layers[lay.row].weight_std = _std(w.reshape(-1))
            continue
        mats = lay.layout.to_matrices(w.astype(np.float64))
        for rec, block in zip(report.layers[lay.row:], mats.reshape(len(lay.blocks), -1)):
            rec.weight_std = float(np.std(block))
