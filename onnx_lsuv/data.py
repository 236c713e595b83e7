"""Loading the data batch and matching it to the model's graph inputs."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Union

import numpy as np
import onnx

from .errors import InputError
from .model_io import existing_file

log = logging.getLogger("onnx_lsuv")

BatchLike = Union[np.ndarray, Mapping[str, np.ndarray], str, os.PathLike]
MIN_RECOMMENDED_BATCH = 16  # the paper: LSUV is insensitive to the batch size from 16 on

# Casts, one rule: the data is converted to the input's dtype when nothing is lost for the
# values given (the same dtype in the other byte order; integers or booleans into a float or
# integer type that holds every value exactly, checked), or when it is a float going to
# another float type (float64 data for float32 models is numpy's habit; a narrower float that
# overflows is refused). Anything else (floats into integers, into booleans, inexact integer
# values) is refused with what to do.
try:  # bfloat16 inputs, as onnx maps them (ml_dtypes comes with onnx)
    _BF16 = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx.TensorProto.BFLOAT16))
except (TypeError, ValueError, KeyError):
    _BF16 = None


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller must feed: graph inputs that are not initializers."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _expected(vi: onnx.ValueInfoProto) -> tuple[np.dtype | None, list[int | str | None] | None]:
    t = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        return None, None
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)) if t.elem_type else None
    if not t.HasField("shape"):
        return dtype, None
    dims: list[int | str | None] = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dtype, dims


def _fmt_shape(dims) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def _load_file(path: str | os.PathLike, names: list[str]) -> dict[str, np.ndarray]:
    path = existing_file(path, "data", "a .npy or .npz file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:  # members load lazily: read them here, inside the try
                return {k: loaded[k] for k in loaded.files}
    except Exception as err:  # numpy raises ValueError/OSError/BadZipFile variously
        raise InputError(f"cannot read data file {path} as .npy or .npz: {err}") from err
    if len(names) != 1:
        raise InputError(
            f"{path} holds one array but the model has {len(names)} inputs "
            f"({', '.join(names)}): give an .npz with one array per input name, e.g. "
            f"np.savez('batch.npz', {', '.join(f'{n}=...' for n in names)})"
        )
    return {names[0]: loaded}


def load_batch(data: BatchLike, model: onnx.ModelProto,
               warn_small: bool = True) -> dict[str, np.ndarray]:
    """Load ``data`` and check it against ``model``'s inputs.

    Args:
        data: A numpy array (single-input models), a mapping input name -> array, or the path of
            a .npy (single input) or .npz (one array per input name) file.
        model: The model whose inputs the data must feed.

    Returns:
        Input name -> C-contiguous array of the input's dtype.

    Raises:
        InputError: With what was expected and what was given.
    """
    inputs = graph_inputs(model)
    names = [i.name for i in inputs]
    if not names:
        raise InputError("the model has no graph inputs to feed")
    if isinstance(data, (str, os.PathLike)):
        arrays = _load_file(data, names)
    elif isinstance(data, Mapping):
        arrays = dict(data)
    else:
        if len(names) != 1:
            raise InputError(
                f"the model has {len(names)} inputs ({', '.join(names)}): pass a dict of arrays"
            )
        arrays = {names[0]: data}

    missing = [n for n in names if n not in arrays]
    if missing:
        raise InputError(f"data does not match the model's inputs (missing input(s): "
                         f"{', '.join(missing)}); the model expects: {', '.join(names)}")
    initializers = {t.name for t in model.graph.initializer}
    for key in [k for k in arrays if k not in names]:
        if key in initializers:
            log.warning("data key %r is a weight the model stores (an initializer that the "
                        "exporter also lists as a graph input), not data: not fed", key)
        else:
            log.warning("data key %r is not an input of the model (it expects %s): ignored",
                        key, ", ".join(names))
        del arrays[key]

    feeds: dict[str, np.ndarray] = {}
    for vi in inputs:
        feeds[vi.name] = _check_one(vi, np.asarray(arrays[vi.name]))
    if warn_small:
        _warn_small(feeds, model)
    return feeds


def _warn_small(feeds: dict[str, np.ndarray], model: onnx.ModelProto) -> None:
    """Warn about a small batch, on the first input whose first axis is a symbolic (batch)
    dimension: a fixed first axis is often not the batch (a recurrent op's time axis)."""
    batch = 0
    for vi in graph_inputs(model):
        _, dims = _expected(vi)
        if dims and not isinstance(dims[0], int) and feeds[vi.name].ndim > 0:
            batch = feeds[vi.name].shape[0]
            break
    if 0 < batch < MIN_RECOMMENDED_BATCH:
        log.warning(
            "the batch has %d samples; LSUV's variance estimate wants at least %d",
            batch,
            MIN_RECOMMENDED_BATCH,
        )


def data_files(items) -> list[str]:
    """The files that ``load_batches`` reads for ``items`` (directories expanded): what an
    output must never overwrite."""
    items = items if isinstance(items, (list, tuple)) else [items]
    return [os.fspath(p) for item in items for p in _expand_directory(item)
            if isinstance(p, (str, os.PathLike))]


def _expand_directory(item):
    """A directory's .npy files in name order; anything else as it is."""
    if isinstance(item, (str, os.PathLike)) and os.path.isdir(item):
        files = sorted(f for f in os.listdir(item) if f.endswith(".npy"))
        if not files:
            raise InputError(f"data directory {os.fspath(item)} holds no .npy files")
        return [os.path.join(item, f) for f in files]
    return [item]


def load_batches(data, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """``load_batch`` for one batch, or several pooled into one along the batch axis.

    Args:
        data: One BatchLike, a list or tuple of them, or a directory of .npy files (pooled in
            name order).
        model: The model whose inputs the data must feed.

    Raises:
        InputError: A part is unusable, or the parts cannot be pooled (an input with a fixed
            batch dimension, or parts that disagree beyond the batch axis).
    """
    if data is None:
        raise InputError("data is required: pass a batch (an array, a dict of arrays, or a "
                         ".npy/.npz path)")
    if not isinstance(data, (list, tuple)):
        data = [data]
    data = [part for item in data for part in _expand_directory(item)]
    if not data:
        raise InputError("no data given")
    parts = [load_batch(d, model, warn_small=len(data) == 1) for d in data]
    if len(parts) == 1:
        return parts[0]
    pooled = {}
    for vi in graph_inputs(model):
        _, dims = _expected(vi)
        if dims and isinstance(dims[0], int):
            raise InputError(f"input {vi.name!r} has a fixed batch dimension of {dims[0]}: "
                             "several batches cannot be pooled; pass one batch")
        arrays = [p[vi.name] for p in parts]
        if len({a.shape[1:] for a in arrays}) > 1 or any(a.ndim == 0 for a in arrays):
            raise InputError(f"input {vi.name!r}: the batches' shapes "
                             f"{[tuple(a.shape) for a in arrays]} differ beyond the batch axis")
        pooled[vi.name] = np.concatenate(arrays, axis=0)
    _warn_small(pooled, model)
    return pooled


def _is_float(dtype: np.dtype) -> bool:
    """float16/32/64, and bfloat16 (a numpy void-kind dtype from ml_dtypes)."""
    return np.dtype(dtype).kind == "f" or (_BF16 is not None and np.dtype(dtype) == _BF16)


def _finfo_max(dtype: np.dtype) -> float:
    try:
        return float(np.finfo(dtype).max)
    except ValueError:
        return 3.3895314e38  # bfloat16


def _cast(name: str, arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``arr`` as ``dtype`` under the module's one rule; InputError naming the input if not."""
    src = arr.dtype
    if src.newbyteorder("=") == dtype.newbyteorder("="):
        return arr.astype(dtype)  # the other byte order: lossless
    hint = f"convert it with arr.astype(np.{dtype.name}) if that is what you mean"
    if _is_float(src) and _is_float(dtype):
        log.info("input %r: casting the data from %s to %s", name, src, dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            cast = arr.astype(dtype)
        # Finiteness after the cast: float64 data of 1e5 is finite, and Inf as float16.
        if not np.all(np.isfinite(cast)):
            biggest = float(np.max(np.abs(arr.astype(np.float64))))
            raise InputError(
                f"input {name!r}: values up to {biggest:.4g} overflow {dtype} (largest "
                f"{float(_finfo_max(dtype)):.4g}) in the cast from {src}; scale the data, or "
                "feed it in the model's dtype")
        return cast
    if src.kind in "biu" and (_is_float(dtype) or dtype.kind in "iu"):
        with np.errstate(all="ignore"):
            cast = arr.astype(dtype)
            exact = np.array_equal(cast.astype(src), arr) if src.kind != "b" else True
        if exact:
            log.info("input %r: casting the data from %s to %s (exact)", name, src, dtype)
            return cast
        raise InputError(f"input {name!r}: {src} values do not all convert exactly to {dtype} "
                         f"(e.g. integers beyond 2**24 in float32); {hint}")
    raise InputError(f"input {name!r}: expected dtype {dtype}, got {src}; {hint}")


def _check_one(vi: onnx.ValueInfoProto, arr: np.ndarray) -> np.ndarray:
    name = vi.name
    dtype, dims = _expected(vi)
    if arr.dtype != dtype and (arr.dtype == object or (arr.dtype.kind not in "biuf"
                                                        and not _is_float(arr.dtype))):
        raise InputError(f"input {name!r}: data of dtype {arr.dtype} is not numeric")
    if arr.ndim == 0 and (dims is None or len(dims) > 0):
        raise InputError(f"input {name!r}: got a scalar, expected an array"
                         + (f" of shape {_fmt_shape(dims)}" if dims is not None else ""))
    if dims is not None:
        if arr.ndim != len(dims):
            raise InputError(
                f"input {name!r}: expected rank {len(dims)} with shape {_fmt_shape(dims)}, "
                f"got rank {arr.ndim} with shape {tuple(arr.shape)}"
            )
        bad = [k for k, d in enumerate(dims) if isinstance(d, int) and d != arr.shape[k]]
        if bad:
            raise InputError(
                f"input {name!r}: expected shape {_fmt_shape(dims)}, got {tuple(arr.shape)} "
                f"(axis {bad[0]} differs)"
            )
    if arr.size == 0:
        raise InputError(f"input {name!r}: the array is empty (shape {tuple(arr.shape)})")
    if _is_float(arr.dtype) and not np.all(np.isfinite(arr)):
        raise InputError(f"input {name!r}: the data contains NaN or Inf values")
    if dtype is not None and arr.dtype != dtype:
        arr = _cast(name, arr, dtype)
    return np.ascontiguousarray(arr)
