"""The initialised ONNX tensors, mapped back onto a framework's own parameters by value.

Exporters rename, transpose, flip, reorder, split, concatenate and fold the framework's
parameters on their way into ONNX (``tests/exporters/PATTERNS.md``). What survives every
exporter is the values. ``match_parameters`` takes the ONNX model as exported (before
onnx-lsuv), the tensors onnx-lsuv changed, and the framework's ORIGINAL parameters (name ->
array), finds each changed tensor's original value among the parameters under a closed set of
transforms, and applies the inverse transform to the new value:

- an arrangement: the parameter's axes permuted, then reshaped to the ONNX shape, then flipped
  along some axes (identity, transposes, HWIO <-> OIHW, depthwise H W C 1, Dense [in, out],
  merged or split head axes, flipped ConvTranspose kernels);
- of the whole parameter or of one of k equal chunks of it along an axis (a fused QKV
  projection that the exporter split; one gate of a recurrent kernel);
- for the whole ONNX tensor, or for each of k equal pieces of it along an axis (a recurrent W
  whose gates were reordered; B = concat(Wb, Rb); pieces left unchanged need no parameter);
- exactly, or scaled by a factor per output unit: BatchNormalization folded into the kernel
  (k' = k * gamma / sqrt(var + eps)). The kernel is then unscaled, and the change of the
  folded bias is carried back into the layer's own bias, or into the BatchNormalization's
  shift, found by value among the parameters, so that the framework's forward gives the same
  outputs as the initialised ONNX model.

A tensor whose value is found nowhere is reported by name with the reason, never guessed.
The parameters that hold a tensor's values are counted against the times the exported model
stores them (whole or in equal pieces, in any of those layouts, or scaled per unit), counted
the same way. As many parameters as stored tensors: one each, resolved by the graph (a bias
goes beside its layer's weight; the pieces of one tensor come from one parameter) or by name,
otherwise reported as ambiguous. More parameters than stored tensors: a tensor stored once
stands for all of them (copies the exporter stored once, a tie, one parameter under two
names), so all get it (a constant bias: the one beside each layer that reads it); with
several, ambiguous. Evidence that fits every candidate layout alike (a folded BatchNorm's
factor of 1) resolves nothing. A tensor whose values an unchanged constant also holds (a head
tied to the embedding a Gather reads) is refused unless as many parameters hold them. One
tensor's placements are written all or none.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import re
import zipfile
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import InputError
from .graph import GraphIndex
from .model_io import ModelLike, load_model, tensor_array

PIECES = (2, 3, 4, 6, 8)  # equal parts tried: fused QKV (3), LSTM gates (4, B: 8), GRU (3, 6)
SCALE_RTOL = 1e-4  # a folded kernel is the parameter times a per-unit factor, to float rounding
_MAX_ARRANGEMENTS = 4096  # permutations x flips tried per candidate: rank 5 fits (3840)

Region = Union[tuple[int, int, int], None]  # (axis, index, count): one of count equal parts


def _rtol(dtype: np.dtype) -> float:
    """The rounding a fold leaves: 1e-4 for float32 and wider, more for float16."""
    if np.dtype(dtype).kind != "f":
        return SCALE_RTOL
    return max(SCALE_RTOL, 16 * float(np.finfo(dtype).eps))


@dataclass(frozen=True)
class Arrangement:
    """``target = flip(source.transpose(perm).reshape(shape), flips)``."""

    perm: tuple[int, ...]
    shape: tuple[int, ...]
    flips: tuple[int, ...]

    def forward(self, source: np.ndarray) -> np.ndarray:
        out = source.transpose(self.perm).reshape(self.shape)
        return np.flip(out, self.flips) if self.flips else out

    def inverse(self, target: np.ndarray, source_shape: tuple[int, ...]) -> np.ndarray:
        out = np.flip(target, self.flips) if self.flips else target
        out = out.reshape(tuple(source_shape[p] for p in self.perm))
        return out.transpose(np.argsort(self.perm))

    def describe(self, source_shape: tuple[int, ...]) -> str:
        steps = []
        if self.perm != tuple(range(len(self.perm))):
            steps.append(f"transpose{self.perm}")
        if tuple(source_shape[p] for p in self.perm) != self.shape:
            steps.append(f"reshape{self.shape}")
        if self.flips:
            steps.append(f"flip axes {self.flips}")
        return ", ".join(steps) or "as is"


def _part(array: np.ndarray, region: Region) -> np.ndarray:
    if region is None:
        return array
    axis, j, k = region
    n = array.shape[axis] // k
    index = [slice(None)] * array.ndim
    index[axis] = slice(j * n, (j + 1) * n)
    return array[tuple(index)]


def _splits(array: np.ndarray):
    """(axis, k): each way to cut ``array`` into k equal pieces of two or more elements (a
    recurrent W per gate, B = concat(Wb, Rb)), in the order they are tried."""
    for axis, n in enumerate(array.shape):
        for k in PIECES:
            if n % k == 0 and array.size // k >= 2:
                yield axis, k


def _region_text(region: Region, what: str) -> str:
    if region is None:
        return ""
    axis, j, k = region
    return f"{what} {j + 1}/{k} along axis {axis}"


@dataclass
class Prefer:
    """What the graph says about a tensor's candidates: the parameters (or their parents) of
    the same layer."""

    names: set[str] = field(default_factory=set)
    parents: set[str] = field(default_factory=set)
    strict: bool = False  # only the graph or the name may choose (not what others claimed)


@dataclass
class Placement:
    """One ONNX tensor (or piece of it) found in one parameter (or chunk of it)."""

    onnx: str
    piece: Region
    param: str
    chunk: Region
    arrangement: Arrangement
    scale: np.ndarray | None = None  # per unit along scale_axis of the ONNX tensor
    scale_axis: int | None = None

    def describe(self, params: Mapping[str, np.ndarray]) -> str:
        source = _part(params[self.param], self.chunk)
        parts = [p for p in (_region_text(self.chunk, "chunk"),
                             self.arrangement.describe(source.shape)) if p]
        if self.scale is not None:
            parts.append(f"scaled per unit of axis {self.scale_axis} (folded BatchNormalization)")
        where = _region_text(self.piece, "piece")
        return (f"{where} <- " if where else "") + ", ".join(parts)


@dataclass
class MatchResult:
    """What ``match_parameters`` returns.

    Attributes:
        params: The new values of the parameters that changed, by the framework's names, in
            the framework's shapes and dtypes (every other parameter stays as it was).
        mapped: Per changed ONNX tensor that was found: {"onnx", "params", "how"}.
        unmapped: Per changed ONNX tensor that was not: {"onnx", "reason"}. Its new value
            reached no parameter.
        carried: Folded biases carried back: {"onnx", "into", "how"}.
        changed: How many ONNX tensors changed (those with an unchanged value need nothing).
        notes: What the user should know (one tensor written into several parameters).
    """

    params: dict[str, np.ndarray] = field(default_factory=dict)
    mapped: list[dict[str, Any]] = field(default_factory=list)
    unmapped: list[dict[str, Any]] = field(default_factory=list)
    carried: list[dict[str, Any]] = field(default_factory=list)
    changed: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every changed ONNX tensor reached the parameters."""
        return not self.unmapped

    @property
    def fraction(self) -> float:
        return 1.0 if not self.changed else len(self.mapped) / self.changed

    def summary(self) -> str:
        text = (f"{len(self.mapped)} of {self.changed} changed ONNX tensor(s) mapped onto "
                f"{len(self.params)} parameter(s)")
        if self.carried:
            text += f", {len(self.carried)} folded bias(es) carried back"
        if self.notes:
            text += f", {len(self.notes)} tensor(s) into several equal parameters"
        if self.unmapped:
            text += ("; NOT mapped: " + ", ".join(
                f"{u['onnx']} ({u['reason']})" for u in self.unmapped))
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"changed": self.changed, "mapped": self.mapped, "unmapped": self.unmapped,
                "carried": self.carried, "notes": self.notes, "params": sorted(self.params),
                "complete": self.complete}


def _fingerprint(values: np.ndarray) -> tuple[bytes, bool]:
    """The multiset key of ``values`` (the same in any layout) and whether a value repeats,
    from one sort."""
    flat = np.sort(values, axis=None) + np.zeros((), values.dtype)  # -0.0 -> 0.0
    key = hashlib.blake2b(np.ascontiguousarray(flat).tobytes(), digest_size=16).digest()
    return key, flat.size > 1 and bool(np.any(flat[1:] == flat[:-1]))


def _key(values: np.ndarray) -> bytes:
    return _fingerprint(values)[0]


def _varied(values: np.ndarray) -> bool:
    """Varied enough that equal values in two tensors mean one tensor (a random draw: a few
    repeats in a big float32 or float16 table do not count)."""
    return np.unique(values).size >= max(2, values.size // 2)


def _where(found) -> str:
    """The candidates (name, region, ...) as a list for a reason."""
    return ", ".join(sorted({f[0] + (" " + _region_text(f[1], "chunk") if f[1] else "")
                             for f in found}))


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[^0-9a-zA-Z]+", name.lower()) if w]


def _affinity(param: str, onnx_name: str) -> int:
    """How much of the parameter's name the ONNX name spells, word for word, from the end."""
    a, b = _words(param), _words(onnx_name)
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    if n == 0 and a and "".join(a) in "".join(b):
        n = 1
    return n


def _common_prefix(a: list[str], b: list[str]) -> int:
    """How many leading words two names share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _parent(name: str) -> str:
    return re.split(r"[./:]", name[::-1], maxsplit=1)[-1][::-1] if re.search(r"[./:]", name) \
        else ""


def _probe_positions(shape: tuple[int, ...]) -> np.ndarray:
    size = math.prod(shape)
    rng = np.random.default_rng(size)
    return np.unique(np.concatenate([[0, size - 1], rng.integers(0, size, 24)]))


def _profile(values: np.ndarray, axis: int) -> np.ndarray:
    """Per unit along ``axis``, the mean |value| and mean value^2 over the unit's largest
    |value|, each sorted over the units: the same for a kernel and for that kernel scaled per
    unit, in any layout of its other axes (a cheap test before the arrangements are tried)."""
    moved = np.abs(np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1))
    top = moved.max(axis=1, keepdims=True)
    moved = moved / np.where(top > 0, top, 1)
    return np.concatenate([np.sort(moved.mean(axis=1)), np.sort((moved ** 2).mean(axis=1))])


def _probe(source: np.ndarray, arrangement: Arrangement, q: np.ndarray) -> np.ndarray:
    """``arrangement.forward(source).flat[q]`` without building the arranged array."""
    idx = list(np.unravel_index(q, arrangement.shape))
    for a in arrangement.flips:
        idx[a] = arrangement.shape[a] - 1 - idx[a]
    flat = np.ravel_multi_index(tuple(idx), arrangement.shape)
    t = np.unravel_index(flat, tuple(source.shape[p] for p in arrangement.perm))
    u: list[Any] = [None] * source.ndim
    for d, p in enumerate(arrangement.perm):
        u[p] = t[d]
    return source[tuple(u)]


def _arrangements(source_shape: tuple[int, ...], target_shape: tuple[int, ...]):
    flippable = [a for a, n in enumerate(target_shape) if n > 1]
    flip_sets = [()] + [c for r in range(1, len(flippable) + 1)
                        for c in itertools.combinations(flippable, r)]
    count = 0
    for perm in itertools.permutations(range(len(source_shape))):
        for flips in flip_sets:
            count += 1
            if count > _MAX_ARRANGEMENTS:
                return
            yield Arrangement(tuple(perm), tuple(target_shape), flips)


class _Matcher:
    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params: dict[str, np.ndarray] = {}
        for name, value in params.items():
            arr = np.asarray(value)
            if arr.dtype.kind == "f" and arr.size > 0:
                self.params[str(name)] = arr
        self.by_size: dict[int, list[str]] = {}
        for name, arr in self.params.items():
            self.by_size.setdefault(arr.size, []).append(name)
        self._keys: dict[tuple[str, Region, str], bytes] = {}
        self._profiles: dict[tuple[str, Region, int], np.ndarray] = {}
        self._range: dict[tuple[str, Region, str], tuple[float, float]] = {}
        self.new: dict[str, np.ndarray] = {}
        self.written: dict[str, np.ndarray] = {}
        self.claimed: set[tuple[str, Region]] = set()
        self.pairs: dict[tuple, list[tuple[str, str]]] = {}
        # the exported model's constants, matched like the parameters: how many times it
        # stores a value (set by match_parameters)
        self.onnx: _Matcher | None = None

    # --- candidates -------------------------------------------------------------------
    def _sources(self, size: int, chunks: bool):
        if not chunks:
            yield from ((name, None) for name in self.by_size.get(size, []))
            return
        for k in PIECES:
            for name in self.by_size.get(size * k, []):
                arr = self.params[name]
                for axis, n in enumerate(arr.shape):
                    if n % k == 0 and n > 1:
                        for j in range(k):
                            yield name, (axis, j, k)

    def _key(self, name: str, region: Region, dtype: np.dtype) -> bytes:
        k = (name, region, dtype.str)
        if k not in self._keys:
            self._keys[k] = _key(_part(self.params[name], region).astype(dtype))
        return self._keys[k]

    def _bounds(self, name: str, region: Region, dtype: np.dtype) -> tuple[float, float]:
        k = (name, region, dtype.str)
        if k not in self._range:
            part = _part(self.params[name], region).astype(dtype)
            self._range[k] = (float(part.min()), float(part.max()))
        return self._range[k]

    def exact(self, target: np.ndarray, key: bytes,
              every_level: bool = False) -> list[tuple[str, Region]]:
        bounds = (float(target.min()), float(target.max()))
        out: list[tuple[str, Region]] = []
        for chunks in (False, True):  # a whole parameter first; chunks only where none is
            # (the extremes first: a cheap test that rules out nearly every candidate)
            out += [(n, r) for n, r in self._sources(target.size, chunks)
                    if self._bounds(n, r, target.dtype) == bounds
                    and self._key(n, r, target.dtype) == key]
            if out and not every_level:
                break
        return out

    def solve_exact(self, target: np.ndarray, new: np.ndarray, name: str, piece: Region,
                    prefer: Prefer) -> list[Placement] | str:
        constant = bool(np.all(target == target.reshape(-1)[0]))
        key, ties = _fingerprint(target)
        candidates = self.exact(target, key, every_level=True)
        if not candidates:
            return "its value is not among the parameters"
        stored = self.stored(target, key, name, piece, constant)
        if constant:
            return self._solve_constant(target, new, name, piece, prefer, candidates, stored)
        found: list[tuple[str, Region, Arrangement | str]] = []
        for pname, region in candidates:
            arr = self._arrange(pname, region, target, ties, new)
            if arr is not None:
                found.append((pname, region, arr))
        if not found:
            return "its values are among the parameters, but in no layout onnx-lsuv knows"
        if len(found) > stored:  # more parameters hold these values than the model stores
            return self._all_or_none(name, piece, found, stored)
        whole = [f for f in found if f[1] is None]
        found = whole or found  # a whole parameter before chunks of one
        if len(found) > 1:  # as many tensors as parameters: one each, by the graph or name
            free = [f for f in found if (f[0], f[1]) not in self.claimed]
            if len(free) == 1 and not prefer.strict:
                found = free
            else:
                pool = free or found
                near = [f for f in pool if f[0] in prefer.names
                        or _parent(f[0]) in prefer.parents]
                if len(near) == 1:
                    found = near
                else:
                    best = max(_affinity(f[0], name) for f in pool)
                    named = [f for f in pool if _affinity(f[0], name) == best]
                    if best == 0 or len(named) != 1:
                        return "ambiguous: equal values in " + _where(pool)
                    found = named
        pname, region, arr = found[0]
        if isinstance(arr, str):
            return f"ambiguous: {pname}: {arr}"
        return [Placement(name, piece, pname, region, arr)]

    @staticmethod
    def _all_or_none(name: str, piece: Region, found: list, stored: int) -> list[Placement] | str:
        """Parameters that hold the values of a tensor the model stores fewer times: one
        stored tensor stands for all of them (copies the exporter stored once, a tie, one
        parameter under two names), so all get it; with several, which one stands for which
        parameters is not known."""
        if stored > 1:
            return (f"ambiguous: {len(found)} parameters hold these values "
                    f"({_where(found)}) and the ONNX model stores them {stored} times: "
                    "which of its tensors stands for several parameters is not known")
        for pname, _, arr in found:
            if isinstance(arr, str):
                return f"ambiguous: {pname}: {arr}"
        return [Placement(name, piece, p, r, a) for p, r, a in found]

    def _solve_constant(self, target: np.ndarray, new: np.ndarray, name: str, piece: Region,
                        prefer: Prefer, candidates: list[tuple[str, Region]],
                        stored: int) -> list[Placement] | str:
        """A constant value: any parameter of that size and value fits, so the graph (the
        parameters beside the layers that read it: a piece of a recurrent B goes to the
        layer's own bias) or the very name must tell. A tensor the model stores once and
        several layers read goes to each of those layers' own parameter."""
        near = [c for c in candidates if c[0] in prefer.names
                or _parent(c[0]) in prefer.parents]
        if len(near) > 1 and stored == 1:  # each reading layer's own, one each
            by_parent: dict[str, int] = Counter(_parent(c[0]) for c in near)
            if prefer.parents <= set(by_parent) and set(by_parent.values()) == {1}:
                return self._all_or_none(name, piece, [
                    (p, r, self._arrange(p, r, target, True, new)) for p, r in near], 1)
        if len(near) != 1:
            best = max(_affinity(c[0], name) for c in candidates)
            near = [c for c in candidates if _affinity(c[0], name) == best] \
                if best >= 2 else []
        if len(near) != 1:
            return ("ambiguous: a constant value, which the graph does not place; it "
                    "fits " + ", ".join(sorted({c[0] for c in candidates})[:6]))
        (pname, region), = near
        arr = self._arrange(pname, region, target, True, new)
        if arr is None:
            return "its values are among the parameters, but in no layout onnx-lsuv knows"
        if isinstance(arr, str):
            return f"ambiguous: {pname}: {arr}"
        return [Placement(name, piece, pname, region, arr)]

    def stored(self, target: np.ndarray, key: bytes, name: str, piece: Region,
               constant: bool) -> int:
        """How many times the exported ONNX model (with onnx-lsuv's bias copies) holds these
        values: whole constants and equal pieces of them, in any layout the parameters are
        matched in, or scaled by a factor per unit (a folded BatchNormalization). At least 1:
        the tensor itself. The parameters are counted the same way, so evidence that holds
        on both sides (a symmetric matrix fits two layouts on each) cancels out."""
        onnx = self.onnx
        if onnx is None:
            return 1
        seen = {(c, r) for c, r in onnx.exact(target, key, every_level=True)
                if (c, r) == (name, piece) or constant
                or onnx._arrange(c, r, target, False, target) is not None}
        count = len(seen)
        if not constant:
            count += onnx.scaled_copies(target, seen | {(name, piece)})
        return max(count, 1)

    def scaled_copies(self, values: np.ndarray, skip: set[tuple[str, Region]]) -> int:
        """How many of these arrays (whole or equal chunks) are ``values`` scaled by a
        factor per unit, in some arrangement."""
        if values.ndim < 2:
            return 0
        rtol = _rtol(values.dtype)
        v64 = values.astype(np.float64)
        profiles = [_profile(v64, b) if n >= 2 else None for b, n in enumerate(values.shape)]
        count = 0
        for cname, region in itertools.chain(self._sources(values.size, False),
                                             self._sources(values.size, True)):
            if (cname, region) in skip:
                continue
            shape = _part(self.params[cname], region).shape
            for axis in range(len(shape)):
                if shape[axis] < 2 or not any(
                        n == shape[axis] and np.allclose(
                            profiles[b], self._profile(cname, axis, region),
                            rtol=max(1e-3, 10 * rtol), atol=1e-6)
                        for b, n in enumerate(values.shape) if n >= 2):
                    continue
                part = _part(self.params[cname], region).astype(np.float64)
                if next(self._scaled_arrangements(v64, part, axis, rtol), None) is not None:
                    count += 1
                    break
        return count

    def _arrange(self, pname: str, region: Region, target: np.ndarray, ties: bool,
                 new: np.ndarray) -> Arrangement | None | str:
        source = _part(self.params[pname], region).astype(target.dtype)
        q = _probe_positions(target.shape)
        want = target.reshape(-1)[q]
        solutions = []
        for arr in _arrangements(source.shape, target.shape):
            if not np.array_equal(_probe(source, arr, q), want):
                continue
            if not np.array_equal(arr.forward(source), target):
                continue
            if not ties:
                return arr
            solutions.append(arr)
        if not solutions:
            return None
        first = solutions[0].inverse(new, source.shape)
        for other in solutions[1:]:
            if not np.array_equal(other.inverse(new, source.shape), first):
                return ("its values repeat, and the layouts they fit put the new values in "
                        "different places")
        return solutions[0]

    def solve_scaled(self, target: np.ndarray, new: np.ndarray,
                     name: str) -> list[Placement] | str | None:
        """A kernel with a folded BatchNormalization: the parameter times a factor per unit,
        which some gamma / sqrt(var + eps) among the parameters explains (a scale that none
        explains, such as weight norm's g / |v|, depends on the kernel itself: no match).
        None when no parameter fits; a reason when several do (or when one fits in several
        layouts that put the new values in different places: the factor, the same for each,
        tells none of them apart), unless the model stores the kernel once for all of them."""
        rtol = _rtol(target.dtype)
        fits: list[Placement] = []
        for mine in self.scaled_holders(target, name):
            pname = mine[0].param
            first = self._value(mine[0], new).astype(np.float64)
            tol = 10 * rtol * (np.abs(first).max() + 1e-30)
            if any(not np.allclose(self._value(p, new), first, rtol=10 * rtol, atol=tol)
                   for p in mine[1:]):
                return (f"ambiguous: {pname}: a folded kernel whose values fit several layouts "
                        "that put the new values in different places")
            fits.append(mine[0])
        if len(fits) > 1:
            stored = self.stored(target, _key(target), name, None, False)
            if len(fits) > stored == 1:
                return fits  # one folded kernel the exporter stored once for all of them
            return ("ambiguous: a folded kernel that fits " + ", ".join(
                sorted(f.param for f in fits)))
        return fits or None

    def scaled_holders(self, target: np.ndarray, name: str):
        """Per unclaimed parameter that holds ``target`` scaled by a per-unit factor which
        some gamma / sqrt(var + eps) among the parameters explains (a folded BatchNorm): its
        placements, one per layout and axis that fit."""
        rtol = _rtol(target.dtype)
        t64 = target.astype(np.float64)
        profiles = {axis: _profile(t64, axis) for axis in range(target.ndim)
                    if target.shape[axis] >= 2}
        for pname in self.by_size.get(target.size, []):
            if (pname, None) in self.claimed:
                continue
            shape, source = self.params[pname].shape, None
            mine: list[Placement] = []
            for axis, profile in profiles.items():
                if not any(shape[b] == target.shape[axis] and np.allclose(
                        self._profile(pname, b), profile, rtol=max(1e-3, 10 * rtol), atol=1e-6)
                        for b in range(len(shape))):
                    continue
                if source is None:
                    source = self.params[pname].astype(np.float64)
                mine += [Placement(name, None, pname, None, arr, scale, axis)
                         for arr, scale in self._scaled_arrangements(source, t64, axis, rtol)
                         if batchnorm_pairs(self, scale, pname, rtol)]
            if mine:
                yield mine

    def holders(self, target: np.ndarray, name: str) -> set[str]:
        """Every parameter that holds ``target``'s values in a layout the mapping knows: whole
        or a chunk, exactly; else scaled per unit (a folded BatchNorm); else, piece by piece
        (a recurrent W whose gates were reordered), the parameters of every piece. What the
        mapping would choose among; empty when the value is found nowhere."""
        def exact(values: np.ndarray) -> set[str]:
            ties = _fingerprint(values)[1]
            return {n for n, r in self.exact(values, _key(values), every_level=True)
                    if self._arrange(n, r, values, ties, values) is not None}

        found = exact(target)
        if found:
            return found
        found = {p.param for mine in self.scaled_holders(target, name) for p in mine}
        if found:
            return found
        for axis, k in _splits(target):
            pieces = [exact(_part(target, (axis, j, k))) for j in range(k)]
            if all(pieces):
                return set().union(*pieces)
        return set()

    def _profile(self, name: str, axis: int, region: Region = None) -> np.ndarray:
        k = (name, region, axis)
        if k not in self._profiles:
            part = _part(self.params[name], region).astype(np.float64)
            self._profiles[k] = _profile(part, axis)
        return self._profiles[k]

    @staticmethod
    def _scaled_arrangements(source: np.ndarray, target: np.ndarray, axis: int, rtol: float):
        """Every arrangement of ``source`` that is ``target`` up to a factor per unit along
        ``axis``, with the factor: (arrangement, factor)."""
        units = target.shape[axis]
        moved = np.moveaxis(target, axis, 0).reshape(units, -1)
        # two probes per unit, at its largest entries (the ratio is best defined there)
        cols = np.argsort(-np.abs(moved), axis=1)[:, :2]
        if cols.shape[1] < 2:
            return
        rows = np.arange(units)[:, None]
        q_moved = np.stack([rows.repeat(2, 1), cols], -1).reshape(-1, 2)
        rest = [n for a, n in enumerate(target.shape) if a != axis]
        other = np.unravel_index(q_moved[:, 1], rest) if rest else ()
        full = list(other)
        full.insert(axis, q_moved[:, 0])
        q = np.ravel_multi_index(tuple(full), target.shape)
        want = target.reshape(-1)[q].reshape(units, 2)
        for arr in _arrangements(source.shape, target.shape):
            got = _probe(source, arr, q).reshape(units, 2)
            if np.any(got == 0):
                continue
            ratio = want / got
            if not np.allclose(ratio[:, 0], ratio[:, 1], rtol=rtol, atol=0):
                continue
            arranged = arr.forward(source)
            a_moved = np.moveaxis(arranged, axis, 0).reshape(units, -1)
            denom = np.einsum("ij,ij->i", a_moved, a_moved)
            if np.any(denom == 0):
                continue
            scale = np.einsum("ij,ij->i", moved, a_moved) / denom
            fit = a_moved * scale[:, None]
            tol = rtol * np.abs(moved).max(axis=1, keepdims=True) + 1e-30
            if np.all(np.abs(fit - moved) <= tol):
                yield arr, scale

    # --- writing ----------------------------------------------------------------------
    def _value(self, p: Placement, new_piece: np.ndarray) -> np.ndarray:
        base = self.params[p.param]
        value = new_piece.astype(np.float64)
        if p.scale is not None:
            shape = [1] * value.ndim
            shape[p.scale_axis] = -1
            value = value / p.scale.reshape(shape)
        return p.arrangement.inverse(value, _part(base, p.chunk).shape).astype(base.dtype)

    def place_all(self, placements: list[Placement], new: np.ndarray) -> str | None:
        """Writes every placement of one ONNX tensor, or none of them: a reason when one
        would collide with what another tensor wrote (or with another of these)."""
        values: dict[str, np.ndarray] = {}
        masks: dict[str, np.ndarray] = {}
        for p in placements:  # staged on copies: this tensor's placements checked together
            base = self.params[p.param]
            if p.param not in values:
                values[p.param] = self.new.get(p.param, base).copy()
                masks[p.param] = self.written.get(p.param, np.zeros(base.shape, bool)).copy()
            value = self._value(p, _part(new, p.piece))
            out, mask = _part(values[p.param], p.chunk), _part(masks[p.param], p.chunk)
            if np.any(mask & (out != value)):
                return f"{p.param} gets different new values from two ONNX tensors"
            out[...] = value
            mask[...] = True
        self.new.update(values)
        self.written.update(masks)
        self.claimed.update((p.param, p.chunk) for p in placements)
        return None


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: tensor_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(a.t)
    return values


@dataclass
class _Graph:
    """What the exported graph says about the changed tensors."""

    old: dict[str, np.ndarray]  # each changed tensor's original value
    bias_of: dict[str, str]  # a kernel's bias tensor (the first layer's that reads it)
    readers: dict[str, list[str]]  # a bias tensor -> the kernels of the layers that read it
    biases: dict[str, set[str | None]]  # a kernel -> the biases its layers read (None: none)


def _old_values(model: onnx.ModelProto, consts: dict[str, np.ndarray], names) -> _Graph:
    """The original value of each changed tensor, and each kernel's bias tensor by the graph.

    A bias that onnx-lsuv gave its own copy (``<layer>.bias``, see ``weights.unshare_biases``)
    is not in the exported model: its old value is the layer's bias as it read it.
    """
    from .layers import find_layers

    old = {n: consts[n] for n in names if n in consts}
    bias_of: dict[str, str] = {}
    readers: dict[str, list[str]] = {}
    biases: dict[str, set[str | None]] = {}
    discovery = find_layers(model)
    by_layer = {}
    for layer in discovery.layers:
        by_layer[layer.name] = layer
        bias = layer.bias.name if layer.bias is not None else None
        biases.setdefault(layer.weight.name, set()).add(bias)
        if bias is not None:
            readers.setdefault(bias, []).append(layer.weight.name)
        if layer.bias is not None and layer.chain is None and layer.bias_chain is None:
            bias_of.setdefault(layer.weight.name, layer.bias.name)
    for n in names:
        if n in old:
            continue
        base = re.sub(r"\.bias(\.\d+)?$", "", n)
        layer = by_layer.get(base)
        if layer is not None and layer.bias is not None and layer.bias.name in consts:
            value = consts[layer.bias.name]
            more = [consts.get(r.name) for r, _ in layer.bias_chain.more] \
                if layer.bias_chain is not None else []
            if any(m is None for m in more):
                continue
            if layer.bias_chain is not None:
                value = layer.bias_chain.effective(value, *more)
            old[n] = value
            readers[n] = [layer.weight.name]
            biases[layer.weight.name].add(n)
            if layer.chain is None:
                bias_of[layer.weight.name] = n
    return _Graph(old, bias_of, readers, biases)


def match_parameters(original: ModelLike, changed: Mapping[str, np.ndarray] | onnx.ModelProto,
                     params: Mapping[str, Any] | str | os.PathLike) -> MatchResult:
    """The new values of a framework's parameters, from the tensors onnx-lsuv changed.

    Args:
        original: The ONNX model as the framework's exporter wrote it (before onnx-lsuv): a
            ModelProto or a path.
        changed: ``LSUVResult.weights`` (ONNX tensor name -> new value), or the initialised
            ModelProto (every constant whose value differs counts as changed).
        params: The framework's ORIGINAL parameters, name -> array (``state_dict()``,
            ``{v.path: v.numpy()}``, a flattened Flax state), or the path of an .npz of them.
            Non-float entries are ignored.

    Returns:
        A MatchResult: ``params`` holds the changed parameters' new values under the
        framework's names and shapes; ``unmapped`` names every changed tensor that was not
        found, with the reason.

    Raises:
        InputError: ``params`` is not a mapping of arrays, or its file is unreadable.
    """
    model = load_model(original)
    consts = _constants(model)
    if isinstance(changed, onnx.ModelProto):
        changed = {n: v for n, v in _constants(changed).items()  # new names: bias copies
                   if n not in consts or not np.array_equal(consts[n], v)}
    params = load_params(params)
    graph = _old_values(model, consts, list(changed))
    old, bias_of = graph.old, graph.bias_of
    matcher = _Matcher(params)
    # the model's side, counted like the parameters: its constants and onnx-lsuv's copies
    matcher.onnx = _Matcher({**consts, **{n: v for n, v in old.items() if n not in consts}})
    result = MatchResult()
    folded: list[list[Placement]] = []
    biases_of_folded: set[str] = set()
    pending = []
    for name, value in changed.items():
        new = np.asarray(value)
        if name not in old:
            result.changed += 1
            result.unmapped.append({"onnx": name, "reason": "not a constant of the original "
                                    "model (was it exported from the same framework model?)"})
            continue
        before = old[name]
        if before.shape != new.shape:
            raise InputError(f"tensor {name!r}: shape {list(new.shape)} after, "
                             f"{list(before.shape)} in the original model")
        if np.array_equal(before, new):
            continue
        result.changed += 1
        pending.append((name, before, new))
    def prefer(name: str) -> Prefer:
        """The parents of the parameters that the kernels of the layers reading this tensor
        went to (a bias goes beside its layer's weight)."""
        weights = set(graph.readers.get(name, []))
        mapped = [p for m in result.mapped if m["onnx"] in weights for p in m["params"]]
        return Prefer(parents={_parent(p) for p in mapped}, strict=name in twinned)

    # A weight whose values also sit, in any layout, in a constant that stays as it was may
    # be one framework parameter read there too (an output head tied to the embedding that a
    # Gather reads): writing it would change that reader as well. It is safe only when the
    # framework has as many parameters with these values as the ONNX model has tensors.
    unchanged: dict[tuple[int, str], list[str]] = {}
    for other, v in consts.items():
        if other not in changed and v.dtype.kind == "f" and v.size > 1:
            unchanged.setdefault((v.size, v.dtype.str), []).append(other)
    keys: dict[str, bytes] = {}  # each tensor's multiset key, computed once

    def key_of(name: str, values: np.ndarray) -> bytes:
        if name not in keys:
            keys[name] = _key(values)
        return keys[name]

    kept = []
    twinned: set[str] = set()
    for name, before, new in pending:
        same = unchanged.get((before.size, before.dtype.str), [])
        twins = []
        if same and _varied(before):
            key = key_of(name, before)
            twins = [o for o in same if key_of(o, consts[o]) == key]
        if twins:
            tensors = 1 + len(twins) + sum(
                other != name and b.size == before.size and key_of(other, b) == key
                for other, b, _ in pending)
            holders = sum(r is None for _, r in matcher.exact(before, key))
            if holders < tensors:
                result.unmapped.append({"onnx": name, "reason": (
                    f"its values are also those of {twins[0]!r}, which stays as it was, and "
                    f"only {holders} parameter(s) hold them: a tied weight read there too, "
                    "which writing it would change as well")})
                continue
            twinned.add(name)  # enough holders: one of them, chosen by the graph or name
        kept.append((name, before, new))
    pending = kept
    pending.sort(key=lambda item: item[0] in graph.readers)  # weights first: biases follow
    second = []
    for name, before, new in pending:  # whole tensors first; folds, then pieces, after
        placements = _solve(matcher, name, before, new, prefer(name), pieces=False)
        if isinstance(placements, str):
            second.append((name, before, new, placements))
            continue
        _commit(matcher, result, name, placements, new)
    for name, before, new, why in second:
        if name in biases_of_folded:
            continue
        # found exactly but ambiguous: a per-unit factor (1 for every candidate) tells
        # nothing apart, so only claims and mapped weights may still resolve it
        scaled = None if why.startswith("ambiguous") else matcher.solve_scaled(before, new, name)
        if isinstance(scaled, str):
            result.unmapped.append({"onnx": name, "reason": scaled})
            continue
        if scaled is None:
            placements = _solve(matcher, name, before, new, prefer(name))
            if isinstance(placements, str):
                result.unmapped.append({"onnx": name, "reason": placements})
            else:
                _commit(matcher, result, name, placements, new)
            continue
        if not _commit(matcher, result, name, scaled, new):
            continue
        folded.append(scaled)
        bias = bias_of.get(name)
        if bias is not None:
            biases_of_folded.add(bias)
    for kernels in folded:
        name = kernels[0].onnx
        bias = bias_of.get(name)
        if bias is None or bias not in old or np.array_equal(old[bias], np.asarray(changed[bias])):
            continue
        if any(m["onnx"] == bias for m in result.mapped):
            continue  # found as it is: an unfolded bias
        result.unmapped = [u for u in result.unmapped if u["onnx"] != bias]
        reason = (_carry(matcher, result, kernels, bias, old[bias], np.asarray(changed[bias]))
                  if len(kernels) == 1 or graph.biases.get(name) == {bias} else
                  "a folded bias of a kernel stored once for several layers that read "
                  "different biases: which layer's parameters it belongs to is not known")
        if reason is not None:
            result.unmapped.append({"onnx": bias, "reason": reason})
    result.params = matcher.new
    return result


def _solve(matcher: _Matcher, name: str, before: np.ndarray, new: np.ndarray, prefer: Prefer,
           pieces: bool = True):
    whole = matcher.solve_exact(before, new, name, None, prefer)
    if not isinstance(whole, str) or not pieces:
        return whole
    why = whole
    for axis, k in _splits(before):
        placements: list[Placement] = []
        used = Prefer(set(prefer.names), set(prefer.parents), prefer.strict)
        failed = False
        for j in range(k):
            piece = (axis, j, k)
            o, w = _part(before, piece), _part(new, piece)
            if np.array_equal(o, w):
                continue
            got = matcher.solve_exact(o, w, name, piece, used)
            if isinstance(got, str):
                if got.startswith("ambiguous") and not why.startswith("ambiguous"):
                    # found, but not placed: say that (the whole tensor's reason first)
                    why = f"{_region_text(piece, 'piece')}: {got}"
                failed = True
                break
            placements.extend(got)
            used.names.update(p.param for p in got)
        if not failed and placements:
            return placements
    return why


def _commit(matcher: _Matcher, result: MatchResult, name: str, placements: list[Placement],
            new: np.ndarray) -> bool:
    clash = matcher.place_all(placements, new)
    if clash is not None:
        result.unmapped.append({"onnx": name, "reason": clash})
        return False
    if len({p.param for p in placements}) > 1 and len({p.piece for p in placements}) == 1:
        result.notes.append(f"{name} went to {len(placements)} parameters with equal values "
                            f"({', '.join(sorted(p.param for p in placements))}): tied, or "
                            "copies the exporter stored once; they now hold equal weights")
    result.mapped.append({"onnx": name, "params": sorted({p.param for p in placements}),
                          "how": [f"{p.param}: {p.describe(matcher.params)}"
                                  for p in placements]})
    return True


def _close(a: np.ndarray, b: np.ndarray, rtol: float) -> np.ndarray:
    """Equal to the rounding of the fold (relative, and absolute against the scale)."""
    return np.abs(a - b) <= rtol * np.maximum(np.abs(a), np.abs(b)) + 0.1 * rtol * (
        1 + np.abs(b).max(axis=-1, keepdims=True))


def _vectors(matcher: _Matcher, units: int, without: set[str]) -> tuple[list[str], np.ndarray]:
    names = [n for n, a in matcher.params.items() if a.size == units and n not in without]
    mat = np.stack([matcher.params[n].reshape(-1).astype(np.float64) for n in names]) \
        if names else np.zeros((0, units))
    return names, mat


def batchnorm_pairs(matcher: _Matcher, s: np.ndarray, kernel: str,
                    rtol: float) -> list[tuple[str, str]]:
    """(gamma, var) among the parameters with gamma / sqrt(var + eps) == s for one constant
    eps in [0, 0.1] (kept per kernel and factor: the fold's test and its carry both ask)."""
    memo = (kernel, s.tobytes(), rtol)
    if memo in matcher.pairs:
        return matcher.pairs[memo]
    names, mat = _vectors(matcher, s.size, {kernel})
    tol = max(1e-3, 10 * rtol)
    ok_var = np.all(mat >= 0, axis=1)
    pairs = []
    for i in range(len(names)):
        g = mat[i] / s
        if not np.all(g > 0):
            continue
        eps = g ** 2 - mat  # (var + eps) - var, for every candidate var
        mid = np.median(eps, axis=1, keepdims=True)
        fits = np.all(np.abs(eps - mid) <= tol * (np.abs(mat) + np.abs(mid)) + 1e-6, axis=1)
        # eps >= 0, to the rounding of the fold (float16 parameters leave ~1e-3 of var)
        fits &= ok_var & (mid[:, 0] >= -tol * np.abs(mat).mean(axis=1) - 1e-6) & (mid[:, 0] <= 0.1)
        fits[i] = False
        pairs += [(names[i], names[j]) for j in np.flatnonzero(fits)]
    matcher.pairs[memo] = pairs
    return pairs


def _batchnorm(matcher: _Matcher, s: np.ndarray, b_old: np.ndarray, kernel: str,
               rtol: float) -> dict[str, str] | str:
    """The BatchNorm folded as b' = beta - mean s (a conv without a bias of its own): its
    gamma, var, mean and beta by value; among several, the one whose four share a parent,
    and among equal BatchNorms, the one whose name is nearest the kernel's."""
    found = []
    names, mat = _vectors(matcher, s.size, {kernel})
    for gamma, var in batchnorm_pairs(matcher, s, kernel, rtol):
        rest = [k for k in range(len(names)) if names[k] not in (gamma, var)]
        sub = mat[rest]
        for mi, mk in enumerate(rest):
            want = b_old + mat[mk] * s  # the shift that this mean implies
            for bi in np.flatnonzero(np.all(_close(sub, want[None], rtol), axis=1)):
                if bi != mi:
                    found.append({"gamma": gamma, "var": var, "mean": names[mk],
                                  "beta": names[rest[bi]]})
    if len(found) > 1:
        found = [f for f in found if len({_parent(n) for n in f.values()}) == 1] or found
    if len(found) > 1:  # equal BatchNorms (copies of a block): the one nearest the kernel
        def near(f: dict[str, str]) -> int:
            return _common_prefix(_words(_parent(f["gamma"])), _words(_parent(kernel)))
        best = max(near(f) for f in found)
        if best > 0 and sum(near(f) == best for f in found) == 1:
            found = [f for f in found if near(f) == best]
    if len(found) != 1:
        return ("folded BatchNormalization: its gamma, variance, mean and shift were "
                + ("not found" if not found else "found more than once")
                + " among the parameters")
    return found[0]


def _carry(matcher: _Matcher, result: MatchResult, kernels: list[Placement], bias: str,
           before: np.ndarray, new: np.ndarray) -> str | None:
    """Carry a folded bias's change into each layer's own bias or BatchNorm shift.

    The exporter folded y = gamma * (conv(x, k) + b - mean) / sqrt(var + eps) + beta into
    conv(x, k s) + ((b - mean) s + beta), with s = gamma / sqrt(var + eps). The kernel was
    unscaled by s; the folded bias changed by delta, so the layer's bias b (the one parameter
    of its size beside the kernel, by name) grows by delta / s; with no such b, beta grows by
    delta, beta being found by value with the BatchNorm's other parameters. A kernel stored
    once for several layers (all reading this bias) carries it into each; all or none.
    """
    rtol = _rtol(before.dtype)
    b_old = before.reshape(-1).astype(np.float64)
    delta = new.reshape(-1).astype(np.float64) - b_old
    writes = []
    for kernel in kernels:
        s = kernel.scale
        units = s.size
        if before.size != units:
            return "a folded bias whose size is not the kernel's number of units"
        siblings = [n for n, a in matcher.params.items() if a.size == units
                    and n != kernel.param and _parent(n) == _parent(kernel.param)]
        if len(siblings) > 1:
            return ("folded BatchNormalization: several parameters of the bias's size beside "
                    f"the kernel ({', '.join(siblings)})")
        batchnorm = None
        if siblings:
            target, add = siblings[0], delta / s
            how = "into the layer's bias (+ delta / s)"
        else:
            batchnorm = _batchnorm(matcher, s, b_old, kernel.param, rtol)
            if isinstance(batchnorm, str):
                return batchnorm
            target, add = batchnorm["beta"], delta
            how = "into the BatchNormalization shift (+ delta)"
        if target in matcher.written and np.any(matcher.written[target]) or any(
                w[0] == target for w in writes):
            return f"{target} was written already by another tensor"
        writes.append((target, add, how, batchnorm))
    for target, add, how, batchnorm in writes:
        base = matcher.params[target]
        value = (base.reshape(-1).astype(np.float64) + add).astype(base.dtype)
        matcher.new[target] = value.reshape(base.shape)
        matcher.written[target] = np.ones(base.shape, bool)
        result.carried.append({"onnx": bias, "into": target, "how": how,
                               **({"batchnorm": batchnorm} if batchnorm else {})})
    result.mapped.append({"onnx": bias, "params": sorted(w[0] for w in writes),
                          "how": [f"{w[0]}: folded bias, carried {w[2]}" for w in writes]})
    return None


def _sizes_that_hold(size: int) -> set[int]:
    """The sizes of the tensors that ``_Matcher.holders`` may find a tensor of ``size`` in:
    its own, k times it (a chunk of one), and for each of k equal pieces, the piece's size
    and k' times it."""
    pieces = {size // k for k in PIECES if size % k == 0}
    return {size, *(size * k for k in PIECES), *pieces,
            *(p * k for p in pieces for k in PIECES)}


def _names_text(names: set[str]) -> str:
    shown = sorted(names)
    return ", ".join(repr(n) for n in shown[:3]) + (f" (+{len(shown) - 3})"
                                                    if len(shown) > 3 else "")


def fixed_weights(model: ModelLike, params: Mapping[str, Any] | str | os.PathLike,
                  frozen: Collection[str] = (), framework: str = "framework",
                  missing: str | None = None) -> dict[str, str]:
    """The target weights of an exported model that stand for tensors the framework does not
    train, found before LSUV: ``lsuv_init``'s ``fixed`` option, which leaves their layers
    alone (an STFT, mel or constant-Q kernel held in a buffer or a frozen parameter).

    The exporter renames, transposes, flips, splits and folds, so each target weight's
    framework counterpart is found by value, in every layout and fold that
    ``match_parameters`` knows (the same ``_Matcher``). A weight held only by tensors named
    in ``frozen`` is fixed. One held both by a trainable and a non-trainable tensor is
    ambiguous: it is left alone too, and said so (initialising a fixed kernel cannot be
    undone by training; a trainable layer left alone is reported, and ``include`` takes it).
    A weight found nowhere is initialised as usual, unless ``missing`` says why it is fixed
    (the CLI's ``--only-matched``: PARAMS lists only what is trained).

    Args:
        model: The ONNX model as exported (a ModelProto or a path).
        params: Every float tensor of the framework model, trainable or not, name -> array
            (or the path of an .npz); what the mapping's folds read (a BatchNorm's
            statistics) is among them.
        frozen: The names in ``params`` that are not trained (torch buffers and parameters
            with ``requires_grad=False``, Keras non-trainable weights, ...).
        framework: The framework's name, for the reasons. Defaults to "framework".
        missing: What a weight found nowhere is (completing "its weight W is ..."); None,
            the default: such a weight is not fixed.

    Returns:
        ONNX tensor name (``ConstRef.scoped_name``: with its scope, for one in an If branch)
        -> why it is fixed (completing "its weight W is ...").
    """
    from .layers import find_layers

    model = load_model(model)
    params = load_params(params)
    frozen = set(frozen)
    unknown = sorted(frozen - set(params))
    if unknown:
        raise InputError(f"frozen names not among the parameters: {', '.join(unknown[:5])}")
    index = GraphIndex(model.graph)
    matcher = _Matcher(params)
    frozen_sizes = {matcher.params[n].size for n in frozen if n in matcher.params}
    out: dict[str, str] = {}
    for layer in find_layers(model).layers:
        for ref in layer.stored_weights:  # (every constant a chain joins, in its scope)
            key = ref.scoped_name
            if key in out:
                continue
            target = np.asarray(index.const_array(ref))
            if missing is None and not _sizes_that_hold(target.size) & frozen_sizes:
                continue  # no non-trainable tensor could hold it (the common case: cheap)
            found = matcher.holders(target, ref.name) if target.dtype.kind == "f" and \
                target.size else set()
            still, trained = found & frozen, found - frozen
            if still and trained:
                out[key] = (
                    f"held both by the trainable {framework} tensor(s) {_names_text(trained)} "
                    f"and the non-trainable {_names_text(still)}, so whether it is trained is "
                    "not known (include it to initialise it)")
            elif still:
                out[key] = f"a non-trainable {framework} tensor {_names_text(still)}"
            elif not found and missing is not None:
                out[key] = missing
    return out


def load_params(params: Mapping[str, Any] | str | os.PathLike) -> dict[str, np.ndarray]:
    """A framework's parameters as name -> numpy array, from a mapping or an .npz path."""
    if isinstance(params, (str, os.PathLike)):
        path = os.fspath(params)
        if not os.path.isfile(path):
            raise InputError(f"parameters file not found: {path}")
        expected = "expected an .npz of name -> array, e.g. np.savez(path, **params)"
        if not zipfile.is_zipfile(path):
            raise InputError(f"the parameters file {path} is not an .npz ({expected})")
        try:
            with np.load(path, allow_pickle=False) as data:
                out = {k: data[k] for k in data.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise InputError(f"cannot read the parameters file {path} ({expected}): "
                             f"{err}") from None
        if not out:
            raise InputError(f"the parameters file {path} holds no arrays ({expected})")
        return out
    if not isinstance(params, Mapping):
        raise InputError(f"parameters must be a mapping name -> array, got "
                         f"{type(params).__name__}")
    out = {}
    for k, v in params.items():
        try:
            out[str(k)] = np.asarray(v)
        except Exception as err:  # noqa: BLE001  (a framework tensor numpy cannot read)
            raise InputError(f"parameter {k!r}: not an array ({err})") from None
    return out
