"""Per-layer records, the pasteable table, and the JSON form of a run."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .verdict import (  # noqa: F401  (the statuses, re-exported)
    CONVERGED,
    GOOD,
    NOT_CONVERGED,
    NOT_SCALED,
    OFF_TARGET,
    SKIPPED,
    STATUSES,
)


@dataclass
class LayerRecord:
    """What happened to one target layer."""

    index: int
    name: str
    op: str
    weight: str
    weight_shape: list[int]
    groups: int
    bias: str | None
    block: str = ""  # the projection (q, k, v) or gate (i, o, f, c; fw./bw.) of this row
    tries: int = 0
    var_before: float | None = None
    var_after: float | None = None
    scale: float = 1.0
    weight_std: float | None = None
    status: str = NOT_SCALED
    message: str = ""
    # strategy "sequential" (the extended targets, streams): the mean at the measured point
    # (the channel farthest from target with per_channel), where it was measured ("output",
    # or the activation's op), and with per_channel the channels and the constant ones
    mean_before: float | None = None
    mean_after: float | None = None
    point: str | None = None
    channels: int | None = None
    channels_constant: int | None = None
    # the framework's own name of the layer (torch: layer1.0.conv1), where a one-call front end
    # mapped its weight back onto a parameter
    module: str | None = None
    # the layer's transformer role (``roles.Role.kind``: "q", "attn_out", "embedding", ...)
    # and its block; with policy "transformer", what set it: the measure ("output var",
    # "logit std", "branch/stream var", "stream var", "head std", "admin"), its target and the
    # value achieved on the written model
    role: str | None = None
    role_block: int | None = None
    measure: str | None = None
    target: float | None = None
    achieved: float | None = None


@dataclass
class Report:
    """The result of one run: per-layer records, skipped candidates, timings, settings."""

    layers: list[LayerRecord] = field(default_factory=list)
    # candidates that are no target: {"name", "op", "reason", "excluded", "by_rule"}; by_rule
    # False is a layer a user would expect initialised that was not (see ``not_initialised``)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    provider: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    # with --match / match_parameters: how the changed tensors map onto the framework's
    # parameters (``MatchResult.to_dict()`` and its "summary" line)
    match: dict[str, Any] | None = None
    # strategy "fast": where the written model's variances (var_after) were measured: "one
    # pass" (the one-pass graph's float64 statistics of each rescaled output, where that is
    # the written model's output) or "re-measure" (a pass over the written weights); layers
    # the try loop took are measured again there either way
    measured_in: str | None = None

    @property
    def converged(self) -> bool:
        """True when every layer is on target ('converged'), or no data pass was asked for
        ('not_scaled'), and every candidate that is no target was left alone by a documented
        rule (``by_rule``). A degenerate ('skipped') layer makes it False: it is not on target;
        so does a candidate that could not be initialised or measured (``not_initialised``)."""
        return all(r.status in GOOD for r in self.layers) and not self.not_initialised

    @property
    def not_initialised(self) -> list[dict[str, Any]]:
        """The candidates a user would expect initialised (or, in a check, measured) that were
        not: in an If branch the data does not take, a weight that cannot be traced, an op
        not handled. Not on target: the CLI exits 1 (3 with --check) and names each. (An entry
        without "by_rule", from a report written before the rule, counts as left alone, as it
        did then.)"""
        return [s for s in self.skipped if not s.get("by_rule", True)]

    @property
    def left_alone(self) -> list[dict[str, Any]]:
        """The candidates left alone by a documented rule or the user's --exclude."""
        return [s for s in self.skipped if s.get("by_rule", True)]

    def counts(self) -> dict[str, Any]:
        """What ``--json`` and ``--report`` both start with (one schema, ``SCHEMA``): ``ok``,
        ``n_layers`` (``layers`` is always the list of records), the records per status,
        the counts of the skipped candidates, the worst deviation from the target."""
        target = self.options.get("target_var", 1.0)
        done = [r for r in self.layers if r.var_after is not None
                and math.isfinite(r.var_after)
                and r.measure in (None, "output var")]  # (a role's target is not target_var)
        return {
            "schema": SCHEMA,
            "ok": self.converged,
            "n_layers": len(self.layers),
            "n_by_status": {s: sum(r.status == s for r in self.layers) for s in STATUSES},
            "n_not_targets": len(self.skipped),
            "n_left_alone": len(self.left_alone),
            "n_not_initialised": len(self.not_initialised),
            "worst_abs_var_minus_target": max((abs(r.var_after - target) for r in done),
                                              default=None),
        }

    def summary(self) -> dict[str, Any]:
        """What ``--json`` prints: the same object as ``to_dict`` (``--report``), so that
        every field has one name and one meaning in both."""
        return self.to_dict()

    def to_dict(self) -> dict[str, Any]:
        """The run as JSON (``--report`` and ``--json``): ``counts()``, then every record
        (``layers``: a list, ``skipped``, ``notes``), the options, provider, timings and
        versions; ``converged`` is ``ok`` under its older name."""
        d = asdict(self)
        return _finite({**self.counts(), **d, "converged": self.converged})

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self, limit: int | None = None, more: str = "") -> str:
        """A fixed-width table of the layers, for stderr and for pasting into issues.

        Args:
            limit: Show at most about this many rows: the first and the last, and every row
                not on target wherever it is; a line says how many were hidden and ``more``
                (how to see them). Defaults to None (every row).
            more: How to see every row, for the hidden-rows line. Defaults to "".
        """
        means = any(r.mean_after is not None for r in self.layers)
        modules = any(r.module for r in self.layers)
        roles = any(r.role is not None for r in self.layers)
        policy = any(r.measure is not None for r in self.layers)
        head = ["#", "node"] + (["module"] if modules else []) + [
            "op", "weight shape", "tries", "var before", "var after"] + (
            ["mean after"] if means else []) + ["scale"] + (["role"] if roles else []) + (
            ["set by", "target", "reached"] if policy else []) + ["status"]
        rows = [
            [
                str(r.index),
                r.name,
                *([r.module or "-"] if modules else []),
                r.op,
                "x".join(map(str, r.weight_shape)) + (f" g{r.groups}" if r.groups > 1 else ""),
                str(r.tries),
                _num(r.var_before),
                _num(r.var_after),
                *([_num(r.mean_after)] if means else []),
                _num(r.scale),
                *([_role(r)] if roles else []),
                *([r.measure or "-", _num(r.target), _num(r.achieved)] if policy else []),
                r.status,
            ]
            for r in self.layers
        ]
        shown = _shown(self.layers, limit)
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        first = 5 if modules else 4
        right = {0, *range(first, first + (5 if means else 4))}
        if policy:
            right |= {len(head) - 3, len(head) - 2}

        def fmt(cells: list[str]) -> str:
            return "  ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths))
            ).rstrip()

        lines = [fmt(head), fmt(["-" * w for w in widths])]
        hidden = 0
        for k, row in enumerate(rows):
            if k in shown:
                if hidden:
                    lines.append(f"... {hidden} row(s) hidden")
                    hidden = 0
                lines.append(fmt(row))
            else:
                hidden += 1
        if hidden:
            lines.append(f"... {hidden} row(s) hidden")
        if len(shown) < len(rows):
            lines.append(f"{len(rows) - len(shown)} of {len(rows)} rows hidden, every one on "
                         f"target" + (f": {more}" if more else ""))
        for reason, names in _by_reason([s for s in self.left_alone if s.get("excluded")]):
            lines.append(f"not a target: {names}: {reason}")
        for s in self.left_alone:
            if not s.get("excluded"):
                lines.append(f"not a target: {s['name']} ({s['op']}): {s['reason']}")
        for s in self.not_initialised:
            lines.append(f"NOT initialised: {s['name']} ({s['op']}): {s['reason']}")
        return "\n".join(lines)


SCHEMA = 2  # of to_dict / --json / --report: 2 when ``layers`` became the list in both


def _shown(layers: list[LayerRecord], limit: int | None) -> set[int]:
    """The rows a table of at most about ``limit`` rows shows: the first and the last ones,
    and every row not on target."""
    if limit is None or len(layers) <= limit:
        return set(range(len(layers)))
    off = {k for k, r in enumerate(layers) if r.status not in GOOD}
    room = max(limit - len(off), 4)
    head = room * 3 // 4
    return off | set(range(head)) | set(range(len(layers) - (room - head), len(layers)))


def _by_reason(skipped: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The user's exclusions, one line per reason (``--exclude '*'`` excludes every layer
    for one reason), naming at most five layers."""
    groups: dict[str, list[str]] = {}
    for s in skipped:
        groups.setdefault(s["reason"], []).append(f"{s['name']} ({s['op']})")
    out = []
    for reason, names in groups.items():
        text = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        out.append((reason, (f"{len(names)} layers, " if len(names) > 1 else "") + text))
    return out


def _role(r: LayerRecord) -> str:
    """The role column: the kind, and its block ("attn_out 3"), or "-"."""
    if r.role is None:
        return "-"
    return r.role if r.role_block is None else f"{r.role} {r.role_block}"


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def _finite(obj: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
