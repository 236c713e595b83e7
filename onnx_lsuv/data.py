"""Loading the data batch and matching it to the model's graph inputs."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable, Union

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
    """The dtype and shape an input declares: per axis its size, its name, or None where it
    is dynamic without a name. A negative size (old Paddle exports declare the batch -1) is
    dynamic, as ONNX Runtime takes it; 0 is a size (ONNX Runtime feeds only empty arrays)."""
    t = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        return None, None
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)) if t.elem_type else None
    if not t.HasField("shape"):
        return dtype, None
    dims: list[int | str | None] = []
    for d in t.shape.dim:
        if d.HasField("dim_value") and d.dim_value >= 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:  # unnamed, or a negative dim_value (old Paddle exports' -1): dynamic, as in ORT
            dims.append(None)
    return dtype, dims


def _fmt_shape(dims) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def declared_shape(vi: onnx.ValueInfoProto) -> str:
    """An input's declared shape as messages write it: ``(N, 4, ?, 8)``; "(any shape)"."""
    dims = _expected(vi)[1]
    return "(any shape)" if dims is None else _fmt_shape(dims)


def shapes_to_try(model: onnx.ModelProto, name: str, shape: tuple[int, ...]):
    """Shapes the input ``name`` may have to take, read from each layer that takes it as its
    data with a weight initializer: ``shape`` with a Conv's input channels on axis 1
    (ConvTranspose's likewise), a Gemm's K on its axis, a MatMul's K on the last axis. Guesses
    for the caller to run, never facts: an input may pass through a Transpose or a Reshape
    first."""
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if len(node.input) < 2 or node.input[0] != name or node.input[1] not in weights:
            continue
        w, attrs = weights[node.input[1]], {a.name: onnx.helper.get_attribute_value(a)
                                            for a in node.attribute}
        axis, size = None, None
        if node.op_type == "Conv" and len(w) >= 3:
            axis, size = 1, w[1] * attrs.get("group", 1)
        elif node.op_type == "ConvTranspose" and len(w) >= 3:
            axis, size = 1, w[0]
        elif node.op_type == "Gemm" and len(w) == 2:
            axis, size = (0 if attrs.get("transA") else 1), w[1 if attrs.get("transB") else 0]
        elif node.op_type == "MatMul" and len(w) >= 2 and len(shape) >= 1:
            axis, size = len(shape) - 1, w[-2]
        if axis is not None and axis < len(shape) and size > 0:
            yield tuple(size if k == axis else d for k, d in enumerate(shape))


def _load_file(path: str | os.PathLike, names: list[str]) -> dict[str, np.ndarray]:
    path = existing_file(path, "data", "a .npy or .npz file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:  # members load lazily: read them here, inside the try
                arrays = {k: loaded[k] for k in loaded.files}
            if len(names) == 1 and len(arrays) == 1 and names[0] not in arrays:
                # one array for one input: whatever np.savez called it (arr_0), it is that
                key = next(iter(arrays))
                log.info("data %s: its one array %r is the model's one input %r", path, key,
                         names[0])
                return {names[0]: arrays[key]}
            return arrays
    except Exception as err:  # numpy raises ValueError/OSError/BadZipFile variously
        raise InputError(f"cannot read data file {path} as .npy or .npz: {err}") from err
    if len(names) != 1:
        raise InputError(
            f"{path} holds one array but the model has {len(names)} inputs "
            f"({', '.join(names)}): give an .npz with one array per input name, e.g. "
            f"np.savez('batch.npz', {', '.join(f'{n}=...' for n in names)})"
        )
    return {names[0]: loaded}


def load_batch(data: BatchLike, model: onnx.ModelProto, warn_small: bool = True,
               warn: bool = True) -> dict[str, np.ndarray]:
    """Load ``data`` and check it against ``model``'s inputs.

    Args:
        data: A numpy array (single-input models), a mapping input name -> array, or the path of
            a .npy (single input) or .npz (one array per input name) file.
        model: The model whose inputs the data must feed.
        warn_small: Warn about a batch of fewer than 16 samples. Defaults to True.
        warn: Warn about keys that are not inputs (a stream does so on its first pass only).
            Defaults to True.

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
        raise InputError(_missing_inputs(data, missing, names, list(arrays)))
    initializers = {t.name for t in model.graph.initializer}
    for key in [k for k in arrays if k not in names]:
        if warn and key in initializers:
            log.warning("data key %r is a weight the model stores (an initializer that the "
                        "exporter also lists as a graph input), not data: not fed", key)
        elif warn:
            log.warning("data key %r is not an input of the model (it expects %s): ignored",
                        key, ", ".join(names))
        del arrays[key]

    feeds: dict[str, np.ndarray] = {}
    for vi in inputs:
        feeds[vi.name] = _check_one(vi, np.asarray(arrays[vi.name]))
    if warn_small:
        _warn_small(feeds, model)
    return feeds


def _missing_inputs(data, missing: list[str], names: list[str], keys: list[str]) -> str:
    """What is missing, the keys found instead, and how to write the data so that its keys
    are the model's input names (np.savez's default keys arr_0, arr_1, ... are not)."""
    what = f"data file {os.fspath(data)}" if isinstance(data, (str, os.PathLike)) else "data"
    found = ", ".join(repr(k) for k in keys) or "none"
    default = keys and all(k.startswith("arr_") and k[4:].isdigit() for k in keys)
    why = (" (numpy's default names: np.savez was given the arrays without names)"
           if default else "")
    save = ", ".join(f"{n}=x{k}" if len(names) > 1 else f"{n}=x" for k, n in enumerate(names))
    key_hint = "" if all(n.isidentifier() for n in names) else (
        "; for names that are not Python identifiers: np.savez(path, **{"
        + ", ".join(f"{n!r}: x{k}" for k, n in enumerate(names)) + "})")
    return (f"{what} does not match the model's inputs: missing input(s) "
            f"{', '.join(repr(n) for n in missing)}; it holds {found}{why}; the model expects "
            f"{', '.join(repr(n) for n in names)}: save one array per input under its name, "
            f"np.savez(path, {save}){key_hint}")


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


def constant_inputs(feeds: Mapping[str, np.ndarray]) -> list[str]:
    """When every input of the batch holds one value throughout, each as "name = value";
    else none. A constant batch gives every layer a constant output (or one shaped only by
    padding and biases): nothing LSUV can measure."""
    found = []
    for name, a in feeds.items():
        flat = np.asarray(a).reshape(-1)
        if flat.size == 0 or not np.all(flat == flat[0]):
            return []
        found.append(f"{name} = {flat[0].item():.6g}" if flat.dtype.kind == "f"
                     else f"{name} = {flat[0].item()}")
    return found


def data_files(items) -> list[str]:
    """The files that ``load_batches`` reads for ``items`` (directories expanded): what an
    output must never overwrite."""
    items = items if isinstance(items, (list, tuple)) else [items]
    return [os.fspath(p) for item in items for p in _expand_directory(item)
            if isinstance(p, (str, os.PathLike))]


def _is_directory(item) -> bool:
    return isinstance(item, (str, os.PathLike)) and os.path.isdir(item)


def _expand_directory(item):
    """A directory's .npy and .npz files in name order; anything else as it is."""
    if _is_directory(item):
        files = sorted(f for f in os.listdir(item) if f.endswith((".npy", ".npz")))
        if not files:
            raise InputError(f"data directory {os.fspath(item)} holds no .npy or .npz files")
        return [os.path.join(item, f) for f in files]
    return [item]


def is_stream(data) -> bool:
    """Whether ``data`` is read as a stream of batches: a directory (or a list holding one),
    or an iterable that is not an array, a mapping, a path, a list or a tuple (a generator,
    a DataLoader)."""
    if isinstance(data, (list, tuple)):
        return any(_is_directory(item) for item in data)
    if _is_directory(data):
        return True
    return isinstance(data, Iterable) and not isinstance(
        data, (np.ndarray, Mapping, str, bytes, os.PathLike)) and not hasattr(data, "__array__")


def _to_numpy(value: Any) -> np.ndarray:
    """An array from a numpy array, a torch tensor (any device) or anything array-like."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor
        value = value.detach().cpu()
        if str(getattr(value, "dtype", "")) == "torch.bfloat16":  # numpy has no bfloat16
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _as_batch(item: Any, names: list[str]):
    """One item of a stream as ``load_batch`` takes it: a dict stays a dict; a tuple or list
    (a DataLoader's (inputs, labels)) gives its first len(inputs) elements, in the order of
    the model's inputs; anything else is the single input's array."""
    if isinstance(item, Mapping):
        return {k: _to_numpy(v) for k, v in item.items()}
    if isinstance(item, (list, tuple)):
        if len(item) < len(names):
            raise InputError(f"a batch of the stream has {len(item)} element(s) but the model "
                             f"has {len(names)} inputs ({', '.join(names)})")
        return dict(zip(names, (_to_numpy(v) for v in item[:len(names)])))
    return _to_numpy(item)


def _fingerprint(feeds: dict[str, np.ndarray]) -> tuple:
    """A cheap summary of one batch (shapes, sums, a few elements): what must repeat when a
    re-iterable stream is read again."""
    out = []
    for k in sorted(feeds):
        a = feeds[k]
        flat = a.reshape(-1)
        picks = flat[:: max(1, flat.size // 16)][:16]
        out.append((k, a.shape, str(a.dtype), float(np.sum(a, dtype=np.float64)),
                    picks.astype(np.float64).tobytes()))
    return tuple(out)


class Stream:
    """The data as a stream of batches, read again on every pass, one batch in memory.

    A list of files (a directory's) is read file by file. A re-iterable object (a DataLoader,
    a class whose ``__iter__`` starts over) is iterated once per pass, and every pass must
    yield the same batches: a shuffling loader is refused at its second pass. A one-shot
    iterator (a generator) is written batch by batch to a temporary directory on the first
    read, and read from there; ``close`` removes it.

    Every batch is checked against the model's inputs as ``load_batch`` checks one.
    """

    def __init__(self, source, model: onnx.ModelProto) -> None:
        self._model = model
        self._names = [i.name for i in graph_inputs(model)]
        if not self._names:
            raise InputError("the model has no graph inputs to feed")
        self._spool: str | None = None  # the spool directory this stream owns
        self._spooled = False
        self._read_one = False
        self._files: list | None = None
        self._source = None
        self._prints: list[tuple] | None = None
        self._transform: Callable[[dict], dict] | None = None
        items = source if isinstance(source, (list, tuple)) else [source]
        if isinstance(source, (list, tuple)) or _is_directory(source):
            self._files = [p for item in items for p in _expand_directory(item)]
        elif iter(source) is source:  # a generator: read it once, spooled to disk
            self._spool = tempfile.mkdtemp(prefix="onnx-lsuv-stream-")
            self._spooled = True
            self._files = []
            try:
                for k, item in enumerate(source):
                    feeds = load_batch(_as_batch(item, self._names), model, warn_small=False,
                                       warn=self._first_read())
                    path = os.path.join(self._spool, f"batch{k:07d}.npz")
                    _spool_write(path, feeds)
                    self._files.append(path)
            except BaseException:
                self.close()
                raise
        else:
            self._source = source
        self.count = 0
        self.samples = 0
        self.first: dict[str, np.ndarray] | None = None
        for feeds in self:  # the first pass: validates every batch, counts them
            if self.first is None:
                self.first = feeds
        if self.count == 0:
            self.close()
            raise InputError("the data stream yielded no batch")
        _warn_small_total(self.samples, model)

    def _first_read(self) -> bool:
        """True once: the first batch read warns about keys that are not inputs, no other."""
        first, self._read_one = not self._read_one, True
        return first

    def map(self, transform: Callable[[dict], dict]) -> Stream:
        """This stream with ``transform`` applied to each batch (a float32 view, say)."""
        other = object.__new__(Stream)
        other.__dict__.update(self.__dict__)
        other._spool = None  # read from, not owned: this stream removes it
        other._transform = transform
        other.first = transform(self.first)
        return other

    def _raw(self) -> Iterator[dict[str, np.ndarray]]:
        if self._files is not None:
            for path in self._files:
                batch = _spool_read(path) if self._spooled else path
                yield load_batch(batch, self._model, warn_small=False, warn=self._first_read())
            return
        prints = []
        for item in self._source:
            feeds = load_batch(_as_batch(item, self._names), self._model, warn_small=False,
                               warn=self._first_read())
            prints.append(_fingerprint(feeds))
            if self._prints is not None and (len(prints) > len(self._prints)
                                             or prints[-1] != self._prints[len(prints) - 1]):
                raise InputError(self._changed())
            yield feeds
        if self._prints is None:
            self._prints = prints
        elif len(prints) != len(self._prints):
            raise InputError(self._changed())

    @staticmethod
    def _changed() -> str:
        return ("the data stream yielded other batches when read again (a shuffling "
                "DataLoader, random augmentation?): LSUV reads the stream once per layer, so "
                "it must repeat; use shuffle=False, or pass a generator (read once, spooled)")

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        first_pass = self.count == 0 and self.first is None
        for feeds in self._raw():
            if first_pass:
                self.count += 1
                self.samples += _batch_size(feeds, self._model)
            yield self._transform(feeds) if self._transform else feeds

    def close(self) -> None:
        """Remove the spooled batches of a generator, if any."""
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


_BF16_KEY = "::bfloat16"


def _spool_write(path: str, feeds: dict[str, np.ndarray]) -> None:
    """One spooled batch: .npz has no bfloat16, so it is stored as its uint16 bits."""
    arrays = {}
    for name, a in feeds.items():
        if _BF16 is not None and a.dtype == _BF16:
            arrays[name + _BF16_KEY] = a.view(np.uint16)
        else:
            arrays[name] = a
    np.savez(path, **arrays)


def _spool_read(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {(k[:-len(_BF16_KEY)] if k.endswith(_BF16_KEY) else k):
                (z[k].view(_BF16) if k.endswith(_BF16_KEY) else z[k]) for k in z.files}


def _batch_size(feeds: dict[str, np.ndarray], model: onnx.ModelProto) -> int:
    for vi in graph_inputs(model):
        if feeds[vi.name].ndim > 0:
            return int(feeds[vi.name].shape[0])
    return 1


def _warn_small_total(samples: int, model: onnx.ModelProto) -> None:
    if 0 < samples < MIN_RECOMMENDED_BATCH:
        log.warning("the data stream has %d samples in all; LSUV's variance estimate wants at "
                    "least %d", samples, MIN_RECOMMENDED_BATCH)


def load_data(data, model: onnx.ModelProto) -> dict[str, np.ndarray] | Stream:
    """The data as one batch (``load_batches``) or, for a stream (``is_stream``), a
    ``Stream``."""
    if is_stream(data):
        return Stream(data, model)
    return load_batches(data, model)


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
            zero = ("; the model declares it 0, which ONNX Runtime takes as a size of 0, not "
                    "as a dynamic axis (as it does -1): re-export with a dynamic axis, or set "
                    "it to a name (its dim_param) in the model") if dims[bad[0]] == 0 else ""
            raise InputError(
                f"input {name!r}: expected shape {_fmt_shape(dims)}, got {tuple(arr.shape)} "
                f"(axis {bad[0]} differs{zero})"
            )
    if arr.size == 0:
        raise InputError(f"input {name!r}: the array is empty (shape {tuple(arr.shape)})")
    if _is_float(arr.dtype) and not np.all(np.isfinite(arr)):
        raise InputError(f"input {name!r}: the data contains NaN or Inf values")
    if dtype is not None and arr.dtype != dtype:
        arr = _cast(name, arr, dtype)
    # (np.ascontiguousarray makes a scalar 1-D: a scalar input, an If's sample rate, stays 0-D)
    return arr if arr.ndim == 0 else np.ascontiguousarray(arr)
