"""Loading models (from a path or a ModelProto) and saving them atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Union

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import load_external_data_for_model

from .errors import InputError

ModelLike = Union[onnx.ModelProto, str, os.PathLike]
PROTOBUF_LIMIT = 2**31 - 1  # bytes: a larger ModelProto cannot be serialised in one piece
EXTERNAL_THRESHOLD = 1024  # bytes: smaller tensors stay inside the .onnx file


def existing_file(path: str | os.PathLike, what: str, expected: str) -> str:
    """``path`` as a string; InputError if it is missing or a directory."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{what} file not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"{what} path is a directory, expected {expected}: {path}")
    return path


def load_model(model: ModelLike) -> onnx.ModelProto:
    """A private copy of ``model``: the caller's ModelProto or file is never modified.

    Args:
        model: A ModelProto, or the path of an .onnx file (external data is loaded from its
            directory).

    Raises:
        InputError: The file is missing, unreadable or not an ONNX model.
    """
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        check_tensor_sizes(copy, "the model")
        return copy
    path = existing_file(model, "model", "an .onnx file")
    try:
        loaded = onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as err:
        raise InputError(f"cannot read {path} as an ONNX model: {err}") from err
    if not loaded.HasField("graph") or not loaded.opset_import:
        raise InputError(f"{path} is not an ONNX model (no graph or no opset)")
    if _has_external(loaded):
        try:
            load_external_data_for_model(loaded, os.path.dirname(os.path.abspath(path)))
        except (OSError, ValueError, RuntimeError) as err:
            raise InputError(f"cannot read the external data of {path}: {err}") from err
    check_tensor_sizes(loaded, path)
    return loaded


_T = onnx.TensorProto
# Where a tensor without raw_data keeps its values, and how many numbers each element takes.
_TYPED_FIELD = {
    _T.FLOAT: ("float_data", 1), _T.COMPLEX64: ("float_data", 2),
    _T.DOUBLE: ("double_data", 1), _T.COMPLEX128: ("double_data", 2),
    _T.INT64: ("int64_data", 1), _T.UINT32: ("uint64_data", 1), _T.UINT64: ("uint64_data", 1),
    **{t: ("int32_data", 1) for t in (_T.INT32, _T.INT16, _T.INT8, _T.UINT16, _T.UINT8,
                                      _T.BOOL, _T.FLOAT16, _T.BFLOAT16)},
}


def check_tensor_sizes(model: onnx.ModelProto, source: str) -> None:
    """Refuse a tensor whose stored data does not hold as many elements as its dims say (a
    truncated or corrupt file), naming the tensor and ``source``.

    Raises:
        InputError: The first such tensor.
    """
    for t in _all_tensors(model, subgraphs=True):
        if t.data_location == _T.EXTERNAL or t.data_type not in _TYPED_FIELD:
            continue
        count = int(np.prod(t.dims, dtype=np.int64))
        if t.HasField("raw_data"):
            want, have, unit = tensor_nbytes(t), len(t.raw_data), "bytes"
        else:
            field_name, per = _TYPED_FIELD[t.data_type]
            want, have, unit = count * per, len(getattr(t, field_name)), "values"
        if have != want:
            raise InputError(f"tensor {t.name!r} in {source} has shape {list(t.dims)} "
                             f"({want} {unit}) but holds {have} {unit}: the file is truncated "
                             "or corrupt")


def _has_external(model: onnx.ModelProto) -> bool:
    from onnx.external_data_helper import uses_external_data

    return any(uses_external_data(t) for t in _all_tensors(model))


def _all_tensors(model: onnx.ModelProto, subgraphs: bool = False):
    """The main graph's initializers and Constant values (and, with ``subgraphs``, those of
    every If/Loop/Scan body too)."""
    yield from _graph_tensors(model.graph, subgraphs)


def _graph_tensors(graph: onnx.GraphProto, subgraphs: bool):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif subgraphs and attr.type == onnx.AttributeProto.GRAPH:
                yield from _graph_tensors(attr.g, True)
            elif subgraphs and attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graph_tensors(g, True)


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, from its dims and type (strings count as 0)."""
    if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return 0
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize


def _tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by the model's tensors (ByteSize() is not reliable past 2 GiB)."""
    return sum(tensor_nbytes(t) for t in _all_tensors(model))


def external_data_files(path: str | os.PathLike) -> list[str]:
    """Absolute paths of the external data files the model file at ``path`` reads."""
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError):
        return []
    base = os.path.dirname(os.path.abspath(os.fspath(path)))
    return sorted({os.path.abspath(os.path.join(base, e.value)) for t in _all_tensors(model)
                   for e in t.external_data if e.key == "location"})


def uses_external_data(path: str | os.PathLike) -> bool:
    """Whether the model file at ``path`` keeps tensors in external data files."""
    return bool(external_data_files(path))


def default_opset(model: onnx.ModelProto) -> int:
    """The model's version of the default ONNX domain."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise InputError("the model does not import the default ONNX domain")


def check_output_path(output: str | os.PathLike, inputs: list[str], overwrite: bool) -> str:
    """Refuse an output that would clobber an input or land in a missing directory."""
    out = os.path.abspath(os.fspath(output))
    directory = os.path.dirname(out)
    if not os.path.isdir(directory):
        raise InputError(f"output directory does not exist: {directory}")
    if os.path.isdir(out):
        raise InputError(f"output path is a directory: {out}")
    for src in inputs:
        same = os.path.exists(out) and os.path.exists(src) and os.path.samefile(out, src)
        if (same or os.path.abspath(src) == out) and not overwrite:
            raise InputError(
                f"output path {output} is the input file; pass --overwrite to replace it"
            )
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_model_atomic(model: onnx.ModelProto, output: str | os.PathLike,
                      external_data: bool | None = None) -> list[str]:
    """Write ``model`` beside ``output`` in a temporary place, re-load it, then rename it in place.

    An error or Ctrl-C on the way leaves neither ``output`` nor a temporary file behind.

    Args:
        model: The model (not modified).
        output: The .onnx path.
        external_data: Keep tensors of 1 KiB and more in ``<output name>.data`` beside it
            (location relative to the model). Defaults to doing so only when the model is too
            large for one protobuf (2 GiB).

    Returns:
        The paths written: the model, then its data file if any.
    """
    out = os.path.abspath(os.fspath(output))
    directory = os.path.dirname(out)
    if external_data is None:
        external_data = _tensor_bytes(model) > PROTOBUF_LIMIT - (64 << 20)
    if not external_data:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp",
                                   dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(model.SerializeToString())
            onnx.load(tmp)  # the file reads back as a model
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 is not what users expect
            os.replace(tmp, out)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return [out]

    location = os.path.basename(out) + ".data"
    tmpdir = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=directory)
    try:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # onnx.save strips raw_data from the proto it is given
        tmp_model = os.path.join(tmpdir, os.path.basename(out))
        onnx.save_model(copy, tmp_model, save_as_external_data=True,
                        all_tensors_to_one_file=True, location=location,
                        size_threshold=EXTERNAL_THRESHOLD)
        del copy
        check = onnx.load(tmp_model, load_external_data=False)  # reads back; data file present
        if _has_external(check) and not os.path.exists(os.path.join(tmpdir, location)):
            raise OSError(f"external data file {location} was not written")
        written = [out]
        mode = 0o666 & ~_umask()
        if os.path.exists(os.path.join(tmpdir, location)):
            os.chmod(os.path.join(tmpdir, location), mode)
            os.replace(os.path.join(tmpdir, location), os.path.join(directory, location))
            written.append(os.path.join(directory, location))
        os.chmod(tmp_model, mode)
        # Two renames, data first: an interruption between them leaves the old model beside
        # the new data file.
        os.replace(tmp_model, out)
        return written
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
