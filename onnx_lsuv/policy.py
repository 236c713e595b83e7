"""``policy="transformer"``: after Algorithm 1, each layer with a transformer role
(``roles.find_roles``) is set to its role's target, measured where it matters; every other
layer after the first role's is set to the paper's unit variance at its output again (the
roles' factors move what it reads).

How (``apply``): each target is exactly quadratic in its own scale (below), so one
measurement gives its factor. The stream's writer is solved first, alone (everything after
reads its scale). Then every other target's factor comes from one statistics pass at once,
and a pass sees them all again, up to ``SWEEPS`` times while a target is off (a factor moves
the measures after it: a branch's scale is in the next Add's stream); what is still off is
then solved one target at a time in graph order, each from the tries so far
(``strategies.solve_scale``, bracketed once two tries straddle it), as the paper's try loop
does. Each solve goes to ``PRECISION`` (relative), and every pass is of one statistics model,
a session kept while its constants stay (the weights fed to it, as ``Measurer`` does).

The rules, one per role (the targets are options, see ``options.LSUVOptions``):

* **embedding** (the layer that writes the residual stream: a patch embedding, or the table a
  token-embedding Gather reads, scaled for this role only): the variance of the stream after
  the embedding (the first residual Add's stream input) reaches ``stream_var``. The position
  embedding added on the way is measured as it is: the stream is s u + w for the writer's
  scale s, so Var(s) = s^2 Var(u) + 2 s Cov(u, w) + Var(w), a quadratic that
  ``strategies.solve_scale`` solves from its tries (exact from the third).
* **q and k** (or the q and k parts of a fused qkv layer): the std of the attention logits at
  the Softmax input (before any mask) reaches ``attn_logit_std``. The logits are linear in
  the product t = s_q s_k of the two scales (weight and bias together), so their variance is
  t^2 times the one measured: one measurement gives t, applied as sqrt(t) to each side; the
  next measurement checks it.
* **v, mlp_in**: the paper's unit variance at their own output (Algorithm 1's result, kept).
* **attn_out, mlp_out** in a pre-LN block (or one with no norm found): Var(branch) /
  Var(stream) at the residual Add reaches ``branch_ratio`` (default 1 / (2 N_blocks)),
  measured on the real stream, which the branch's last layer does not change: the ratio is
  s^2 times the one measured (weight and bias scaled together).
* **attn_out, mlp_out** in a post-LN block: the Admin rule (Liu et al. 2020, "Understanding
  the Difficulty of Training Transformers"). Admin writes the i-th residual sublayer as
  x_i = LN(b_i), b_i = w_i x_{i-1} + f_i(x_{i-1}), with w_1 = 1 and
  w_{i+1}^2 = Var(b_i), profiled in one forward pass (the authors' code: the variance of the
  previous sum, Var(w_i x_{i-1}) + Var(f_i)), so that each sum weighs the stream as a pre-LN
  stream would, and no branch dominates the output's dependence on the earlier ones. A
  LayerNorm is invariant to the scale of its input, so LN(w x + f(x)) = LN(x + f(x) / w):
  the same block computes the same x_i when the branch is divided by w_i instead, and f_i is
  linear in its last layer's weight and bias, so w_i becomes a factor 1 / w_i on that layer
  and the model keeps its graph. The x_i are the same in both forms, so the profile is
  measured here on the model itself: f_i is the branch with its last layer at the paper's
  unit variance at its output (Var(branch) / Var(last layer's output), which that layer's
  own scale leaves as it is), and the target is Var(branch) / Var(stream) =
  Var f_i / (w_i^2 Var x_{i-1}), a ratio; this form's sum being b_i / w_i,
  w_{i+1}^2 = w_i^2 Var(residual Add output), measured (``_admin_targets``).
* **head** (a layer after the last residual Add from which a graph output is reached): the
  std of its output reaches ``head_std``; 0 zeroes its weight and bias.

Every target is measured again on the written weights at the end (``final_roles``) and
judged within ``tol`` relative to the target (|value / target - 1| < tol, in the measure's own
units: a std, a ratio, a variance); the report says for each layer which measure set it, the
target and the value reached.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import InputError
from .layers import Layer
from .measure_graph import GraphEditor
from .model_io import set_values
from .report import LayerRecord
from .roles import FUSED_LOGITS, Role, add_fused_logits
from .strategies import Run, solve_scale
from .verdict import (
    CONVERGED,
    NOT_CONVERGED,
    OFF_TARGET,
    SKIPPED,
    degenerate,
    needs_factor,
)

log = logging.getLogger("onnx_lsuv")

# What set a layer, as the report's ``measure`` says it.
OUTPUT_VAR = "output var"
LOGIT_STD = "logit std"
BRANCH_RATIO = "branch/stream var"
STREAM_VAR = "stream var"
HEAD_STD = "head std"
ADMIN = "admin"
ZEROED = "zeroed"


@dataclass
class Table:
    """A token-embedding table the policy scales (no target layer of its own)."""

    name: str  # the initializer
    key: str  # the Gather's node name (its role's key)
    value: np.ndarray
    scale: float = 1.0

    @property
    def current(self) -> np.ndarray:
        return (self.value.astype(np.float64) * self.scale).astype(self.value.dtype)


@dataclass
class Goal:
    """One target of the policy: the layers it scales, what is measured, the target."""

    measure: str
    layers: list[Layer]
    target: float  # in the measure's own units (a std, a ratio, a variance)
    numerator: str | None = None  # the tensor whose variance is measured
    denominator: str | None = None  # a ratio's: the stream's
    residual: str | None = None  # Admin: the residual Add's output
    parts: dict[int, np.ndarray] = field(default_factory=dict)  # per layer: factor mask
    table: Table | None = None
    exponent: float = 1.0  # the measured variance goes as (scale)^(2 / exponent)
    achieved: float | None = None
    tries: int = 0
    note: str = ""  # why the target was not reached, where the solve found it cannot be


class _Stats:
    """The variances of named tensors (float64, over every element) with the current weights
    and biases: one statistics model for the run, a pass only when a weight changed."""

    def __init__(self, run: Run, names: list[str], table: Table | None) -> None:
        self.run = run
        self.table = table
        model = run.state.skeleton(run.work)
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        del copy.graph.output[:]
        self.names = list(dict.fromkeys(names))
        for n in self.names:  # logits computed inside a fused node: written out here
            if n.startswith(FUSED_LOGITS):
                add_fused_logits(copy, n)
        ed = GraphEditor(copy)
        outs = []
        for n in self.names:
            x = ed.op("Cast", [n], to=TensorProto.DOUBLE)
            mean = ed.reduce("ReduceMean", x, None, keepdims=1)
            d = ed.op("Sub", [x, mean])
            outs.append(ed.reduce("ReduceMean", ed.op("Mul", [d, d]), None, keepdims=0))
        for o in outs:
            copy.graph.output.append(helper.make_empty_tensor_value_info(o))
        if table is not None:  # fed, so that its scale needs no new model
            init = next(t for t in copy.graph.initializer if t.name == table.name)
            copy.graph.input.append(helper.make_tensor_value_info(
                table.name, init.data_type, list(init.dims)))
            copy.graph.initializer.remove(init)
            self.table_dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        self.model, self.outs = copy, outs
        self.key: tuple | None = None
        self.values: dict[str, float] = {}
        self.session = None
        self.session_written: tuple | None = None
        self.passes = 0  # forward passes run

    def _biases(self) -> tuple:
        state = self.run.state
        return tuple((i, state.bias[i].tobytes()) for i in sorted(state.changed_bias))

    def _key(self) -> tuple:
        state = self.run.state
        return (tuple(state.total_scale(lay).tobytes() for lay in state.layers),
                self._biases(), self.table.scale if self.table else None)

    def _written(self) -> tuple:
        """What a session holds as constants: the changed biases, the weights not fed to it
        (a Conv's filter; every weight on CUDA)."""
        state = self.run.state
        return self._biases(), tuple(
            state.total_scale(lay).tobytes() for lay in state.layers
            if any(ref.name not in state.fed for ref in lay.stored_weights))

    def __call__(self) -> dict[str, float]:
        """The variances with the weights as they are now: one session while what it holds
        as constants stays, the other weights fed to it (as ``strategies.Measurer`` does)."""
        key = self._key()
        if key != self.key:
            written = self._written()
            if self.session is None or self.session_written != written:
                self.session = self.run.session(self.model, biases=True)
                self.session_written = written
            else:
                arrays = self.run.state.in_memory()
                self.session.fed.update({n: np.ascontiguousarray(arrays[n])
                                         for n in self.run.state.fed if n in arrays})
            if self.table is not None:  # (in the measured model's dtype: a float32 twin's)
                self.session.fed[self.table.name] = self.table.current.astype(self.table_dtype)
            values = self.session.run(self.run.feeds, self.outs)
            self.values = {n: float(np.asarray(v).reshape(-1)[0])
                           for n, v in zip(self.names, values)}
            self.key = key
            self.passes += 1
        return self.values


def goals(run: Run, roles: dict[str, Role], tables: dict[str, Table]) -> list[Goal]:
    """The policy's targets in graph order (embedding first), from the roles."""
    opts = run.options
    by_name = {lay.name: lay for lay in run.layers}
    out: list[Goal] = []
    done_logits: set[str] = set()
    for key, role in roles.items():
        if role.kind == "embedding" and (key in by_name or key in tables):
            lay = by_name.get(key)
            out.insert(0, Goal(STREAM_VAR, [lay] if lay else [], opts.stream_var,
                               numerator=role.stream, table=tables.get(key)))
    for lay in run.layers:
        role = roles.get(lay.name)
        if role is None:
            continue
        if role.kind in ("q", "k", "qkv"):
            if not role.logits:
                _logits_unobservable(run, lay, role)
            for logits in role.logits:
                if logits in done_logits:
                    continue
                done_logits.add(logits)
                members = [m for m in run.layers if m.name in roles
                           and logits in roles[m.name].logits]
                parts = {m.index: _qk_mask(m, roles[m.name]) for m in members
                         if roles[m.name].kind == "qkv"}
                if any(p is None for p in parts.values()):
                    _notes(run, [f"policy 'transformer': attention logits {logits}: a fused "
                                 "qkv layer's q and k units are not known: its logits are "
                                 "left at the paper's rule"])
                    continue
                out.append(Goal(LOGIT_STD, members, opts.attn_logit_std, numerator=logits,
                                parts=parts, exponent=2.0))
        elif role.kind in ("attn_out", "mlp_out"):
            if role.norm == "post":
                out.append(Goal(ADMIN, [lay], math.nan, numerator=role.branch,
                                denominator=role.stream, residual=role.residual))
            else:
                ratio = opts.branch_ratio or 1.0 / (2 * max(role.n_blocks, 1))
                out.append(Goal(BRANCH_RATIO, [lay], ratio, numerator=role.branch,
                                denominator=role.stream))
        elif role.kind == "head":
            out.append(Goal(HEAD_STD if opts.head_std > 0 else ZEROED, [lay], opts.head_std,
                            numerator=lay.output))
    return out


def _logits_unobservable(run: Run, lay: Layer, role: Role) -> None:
    """Say in the report that a q/k layer keeps the paper's rule because its attention's
    logits are no tensor of the graph (a fused attention node computes them inside)."""
    where = f"inside the fused node {role.fused!r}" if role.fused else "nowhere in the graph"
    note = (f"policy 'transformer': layer {lay.name} ({role.kind}): its attention logits are "
            f"computed {where}, not observable: the logit rule is left alone for it, the "
            "paper's unit variance at its own output kept")
    if note not in run.report.notes:
        run.report.notes.append(note)
        log.warning("%s", note)


def _qk_mask(lay: Layer, role: Role) -> np.ndarray | None:
    """Per output unit of a fused qkv layer: 1 on q's and k's units, 0 on v's, from the units
    the roles proved q's and k's (``Role.qk_units``: a GQA's unequal parts, a per-head
    layout's interleaved ones); per block where the layer has q, k, v as its three blocks
    and the units say the same (the first two thirds)."""
    units = lay.layout.output_units
    if not role.qk_units or role.qk_units[-1] >= units:
        return None
    mask = np.zeros(units)
    mask[list(role.qk_units)] = 1.0
    if lay.blocks == ("q", "k", "v"):
        third = np.repeat([1.0, 1.0, 0.0], units // 3) if units % 3 == 0 else None
        return np.array([1.0, 1.0, 0.0]) if third is not None and \
            np.array_equal(mask, third) else None
    return mask if len(lay.blocks) == 1 else None


def _value(goal: Goal, values: dict[str, float]) -> float:
    """The goal's measure, in the units of its target."""
    v = values[goal.numerator]
    if goal.denominator is not None:
        return v / values[goal.denominator] if values[goal.denominator] > 0 else math.nan
    if goal.measure in (LOGIT_STD, HEAD_STD, ZEROED):
        return math.sqrt(v) if v >= 0 else math.nan
    return v


def _as_var(goal: Goal, value: float) -> float:
    """The measure as a quantity quadratic in the goal's scale (what ``solve_scale`` solves):
    a std squared, a ratio or a variance as it is."""
    return value * value if goal.measure in (LOGIT_STD, HEAD_STD) else value


def _scale(run: Run, goal: Goal, factor: float) -> list[str]:
    """Multiply the goal's scale by ``factor``: the weights (and biases, so that the output
    scales exactly) of its layers, or its table; the problems found (a bias that cannot be
    scaled along)."""
    problems = []
    if goal.table is not None:
        goal.table.scale *= factor
        return problems
    each = factor ** (1.0 / goal.exponent)
    for lay in goal.layers:
        mask = goal.parts.get(lay.index)
        f = each if mask is None else 1.0 + (each - 1.0) * mask
        b = run.state.unit_bias(lay)
        if b is not None and np.any(b != 0):
            f_units = np.asarray(f, np.float64).reshape(-1)
            if f_units.size != b.size:  # one factor, or one per block: out to the units
                f_units = np.repeat(f_units, b.size // f_units.size)
            why = run.state.shift_bias(lay, (f_units - 1.0) * b)
            if why:
                problems.append(f"layer {lay.name}: bias not scaled with its weight ({why})")
        elif b is None and run.state.has_nonzero_bias(lay):
            problems.append(f"layer {lay.name}: its bias is not one value per unit: not "
                            "scaled with its weight")
        run.state.multiply(lay, f)
    return problems


def _solve(run: Run, goal: Goal, stats: _Stats, target: float) -> float:
    """Scale the goal's layers until its measure is within ``PRECISION`` of ``target``
    (relative; a layer's unit variance: the paper's tol) or max_iter more tries are spent:
    the first step exact where the measure is quadratic in the scale (``solve_scale`` on the
    tries so far), the later ones bracketed; the value measured last."""
    opts = run.options
    var_target = _as_var(goal, target)
    s = 1.0
    value = _value(goal, stats())
    points = [(s, _as_var(goal, value))]
    tries = 0  # (the simultaneous sweeps' steps not counted: max_iter tries from here)
    while not _done(goal, value, target, opts.tol) and tries < opts.max_iter:
        if degenerate(points[-1][1]) is not None:
            break
        nxt = solve_scale(points, var_target)
        _notes(run, _scale(run, goal, nxt / s))
        s = nxt
        goal.tries += 1
        tries += 1
        value = _value(goal, stats())
        points.append((s, _as_var(goal, value)))
        floor = _floor(points) if goal.measure == STREAM_VAR else None
        if floor is not None and floor > var_target * (1.0 + opts.tol):
            goal.note = (f"the stream without the embedding's part (a position embedding, a "
                         f"class token) has variance {floor:.4g} > {target:.4g} already: the "
                         "target cannot be reached by the embedding's scale; left as it was")
            _scale(run, goal, 1.0 / s)
            value = _value(goal, stats())
            break
    return value


def _floor(points: list[tuple[float, float]]) -> float | None:
    """The least variance s^2 Var(u) + 2 s Cov(u, w) + Var(w) can take over s, from the
    quadratic through the last three tries; None before three, or where they fit none."""
    distinct = list({s: (s, v) for s, v in points}.values())
    if len(distinct) < 3:
        return None
    (s0, v0), (s1, v1), (s2, v2) = distinct[-3:]
    with np.errstate(all="ignore"):
        a, b, c = np.polyfit([s0, s1, s2], [v0, v1, v2], 2)
    if not (np.isfinite([a, b, c]).all() and a > 0):
        return None
    return float(c - b * b / (4 * a))


# How near a role's target its solve goes (relative) before it stops; judged within tol. A
# linear target is met in one step; the stream's quadratic in two or three.
PRECISION = 1e-3


def _done(goal: Goal, value: float, target: float, tol: float) -> bool:
    """Whether the solve stops: the paper's |var - target| < tol for its unit variance,
    |value / target - 1| < min(tol, PRECISION) for a role's target."""
    if goal.measure == OUTPUT_VAR:
        return not needs_factor(value, target, tol)
    return _close(value, target, min(tol, PRECISION))


def _close(value: float, target: float, tol: float) -> bool:
    return math.isfinite(value) and target > 0 and abs(value / target - 1.0) < tol


def _paper_goals(run: Run, todo: list[Goal]) -> list[Goal]:
    """The paper's unit variance, solved again in order for every layer without a goal after
    the first layer that has one (a layer the roles' scales may have moved: block 0 of a
    post-LN model reads the embedding's stream itself), where its variance is one number
    over its whole output (one block, not recurrent, not in a subgraph, one use, a weight
    read by it alone); the final check judges the others as they are. (The options beyond
    the paper, whose targets are not a layer's whole output, are refused with the policy.)"""
    mine = {lay.index for g in todo for lay in g.layers}
    start = min(mine, default=len(run.layers))
    if any(g.table is not None for g in todo):
        start = 0
    return [Goal(OUTPUT_VAR, [lay], run.options.target_var, numerator=lay.output)
            for lay in run.layers[start:]
            if lay.index not in mine and lay.blocks == ("",) and not lay.is_recurrent
            and lay.body is None and not lay.branch and not lay.multiplies_state
            and not lay.more_uses and not lay.weight_read_upstream
            and not lay.shared_weight_users]


def apply(run: Run, roles: dict[str, Role], tables: dict[str, Table]) -> list[Goal]:
    """Set every role's target, sequentially from the first layer to the last (a token
    embedding's table first), every other layer after the first role's to the paper's unit
    variance again (module docstring); the goals, with their measured values (checked
    again by ``final_roles``)."""
    if not isinstance(run.feeds, dict):
        raise InputError("policy 'transformer' measures one batch: pool the batches (a list "
                         "of arrays) instead of a stream")
    todo = goals(run, roles, tables)
    if not todo:
        return []
    todo += _paper_goals(run, todo)
    todo.sort(key=lambda g: min((lay.index for lay in g.layers), default=-1))
    names = [n for g in todo for n in (g.numerator, g.denominator, g.residual) if n]
    names += [g.layers[0].output for g in todo if g.measure == ADMIN]
    table = next((g.table for g in todo if g.table is not None), None)
    stats = _Stats(run, names, table)
    for goal in todo:
        if goal.measure == ZEROED:
            for lay in goal.layers:
                run.state.multiply(lay, 0.0)
                run.state.zero_bias(lay)
    for goal in todo:  # the stream's writer first: everything after reads its scale
        if goal.measure == STREAM_VAR:
            goal.achieved = _solve(run, goal, stats, goal.target)
    _sweeps(run, todo, stats)
    for goal in todo:  # what the sweeps left off its target: one at a time, in order
        if goal.measure in (ZEROED, STREAM_VAR):
            continue
        if goal.measure == ADMIN:
            _admin_targets(todo, stats())
        goal.achieved = _solve(run, goal, stats, goal.target)
        log.debug("policy: %s of %s: %.4g (target %.4g)", goal.measure,
                  ", ".join(lay.name for lay in goal.layers), goal.achieved, goal.target)
    run.state.fold()
    if table is not None:  # in the measured model too, for the measurements after
        write_table(run.work, table)
    roles_set = sum(g.measure != OUTPUT_VAR for g in todo)
    run.report.notes.append(f"policy 'transformer': {roles_set} role target(s) and "
                            f"{len(todo) - roles_set} layer(s) at the paper's variance again, "
                            f"in {stats.passes} forward pass(es)")
    log.info("%s", run.report.notes[-1])
    return todo


# Passes of the simultaneous solve before the goals still off go one at a time.
SWEEPS = 8


def _sweeps(run: Run, todo: list[Goal], stats: _Stats) -> None:
    """The simultaneous solve: from one pass, every goal's factor at once, each exact for its
    own measure (linear in its scale: the logits, a branch, the head, a layer's output), then
    a pass to see them all again; up to ``SWEEPS`` passes while some goal is off. A factor
    moves the measures after it (a branch's scale, the stream of the next Add): each sweep
    takes up what the one before moved. (The stream's writer is solved before, alone.)"""
    opts = run.options
    for _ in range(SWEEPS):
        values = stats()
        _admin_targets(todo, values)
        moved = False
        for goal in todo:
            if goal.measure in (ZEROED, STREAM_VAR):
                continue
            value = _value(goal, values)
            var, target = _as_var(goal, value), _as_var(goal, goal.target)
            if _done(goal, value, goal.target, opts.tol) or degenerate(var) is not None \
                    or not (math.isfinite(target) and target > 0):
                continue
            _notes(run, _scale(run, goal, math.sqrt(target / var)))
            goal.tries += 1
            moved = True
        if not moved:
            return


def _admin_targets(todo: list[Goal], values: dict[str, float]) -> None:
    """Each post-LN branch's target from the measured values, in order: f_i is the branch at
    the paper's unit variance at its last layer's output (Var(branch) / Var(output), which
    the layer's own scale leaves as it is), w_1 = 1, w_{i+1}^2 = w_i^2 Var(residual sum i),
    and the target Var(branch) / Var(stream) = Var(f_i) / (w_i^2 Var(stream))."""
    w2 = 1.0
    for goal in todo:
        if goal.measure != ADMIN:
            continue
        out = values[goal.layers[0].output]
        unit = values[goal.numerator] / out if out > 0 else math.nan
        goal.target = unit / (w2 * values[goal.denominator]) \
            if values[goal.denominator] > 0 else math.nan
        w2 *= values[goal.residual]


def _notes(run: Run, problems: list[str]) -> None:
    for p in problems:
        if p not in run.report.notes:
            run.report.notes.append(p)
            log.info("%s", p)


def write_table(model: onnx.ModelProto, table: Table) -> None:
    """Write the table's current value into ``model``'s initializer of that name."""
    set_values(next(t for t in model.graph.initializer if t.name == table.name),
               table.current)


def final_roles(run: Run, todo: list[Goal], records: dict[str, list[LayerRecord]],
                check: bool = False) -> None:
    """Measure every goal again on the written weights and judge its layers' records: the
    measure, its target and the value reached (|value / target - 1| < tol: converged; with
    ``check``, of a model as it is: off_target where not)."""
    if not todo:
        return
    names = [n for g in todo for n in (g.numerator, g.denominator, g.residual) if n]
    names += [g.layers[0].output for g in todo if g.measure == ADMIN]
    table = next((g.table for g in todo if g.table is not None), None)
    values = _Stats(run, names, table)()
    _admin_targets(todo, values)
    tol = run.options.tol
    for goal in todo:
        value = _value(goal, values)
        goal.achieved = value
        if goal.measure == OUTPUT_VAR:  # the paper's rule: the final check's judgement
            for rec in records.get(goal.layers[0].name, []):
                rec.tries += goal.tries
            continue
        off = OFF_TARGET if check else NOT_CONVERGED
        spent = "" if check else f" after {goal.tries} tries"
        if goal.measure == ZEROED:
            status, message = (CONVERGED, "zeroed (head_std 0)") if value == 0 else (
                off, f"zeroed, but its output's std is {value:.4g}")
        elif degenerate(value) is not None:
            status, message = OFF_TARGET if check else SKIPPED, degenerate(value)
        elif _close(value, goal.target, tol):
            status, message = CONVERGED, ""
        else:
            status = off
            message = goal.note or (f"{goal.measure} {value:.4g}, target {goal.target:.4g}: "
                                    f"|value / target - 1| >= {tol}{spent}")
        keys = [lay.name for lay in goal.layers] or ([goal.table.key] if goal.table else [])
        for key in keys:
            for rec in records.get(key, []):
                rec.measure, rec.target, rec.achieved = goal.measure, goal.target, value
                rec.status, rec.message = status, message
                if goal.table is not None:
                    rec.scale = goal.table.scale
                    rec.tries = goal.tries
                else:
                    rec.tries += goal.tries
    for lay in run.layers:  # the factors, the policy's included
        for rec, scale in zip(run.rows(lay), run.state.total_scale(lay)):
            rec.scale = float(scale)


def policy_rows(records: list[LayerRecord], target_var: float) -> None:
    """The measure of each layer that kept the paper's rule: its output variance."""
    for rec in records:
        if rec.measure is None and rec.var_after is not None:
            rec.measure, rec.target, rec.achieved = OUTPUT_VAR, target_var, rec.var_after


def table_record(table: Table, index: int, n_blocks: int) -> LayerRecord:
    """The report row of a token-embedding table the policy scales."""
    return LayerRecord(index=index, name=table.key, op="Gather", weight=table.name,
                       weight_shape=list(table.value.shape), groups=1, bias=None,
                       role="embedding")


def tables_of(work: onnx.ModelProto, roles: dict[str, Role], selection,
              notes: list[str]) -> dict[str, Table]:
    """The tables of the token embeddings among ``roles`` (by role key) that the policy
    scales: not one the user excludes (by the Gather's name, the table's or "Gather") unless
    included, nor one named in ``fixed`` (a framework's frozen table); those get a note."""
    inits = {t.name: t for t in work.graph.initializer}
    tables = {}
    for key, role in roles.items():
        if role.kind != "embedding" or not role.table or role.table not in inits:
            continue
        names = [key, role.table, "Gather"]
        why = dict(selection.fixed).get(role.table)
        if selection.matches(selection.include, names) is None:
            pattern = selection.matches(selection.exclude, names)
            if pattern is not None:
                why = f"excluded by {pattern!r}"
        if why:
            notes.append(f"token embedding {key}: its table {role.table!r} is {why}: not "
                         "scaled, the stream's target not set")
            continue
        tables[key] = Table(role.table, key, numpy_helper.to_array(inits[role.table]))
    return tables
