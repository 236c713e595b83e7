"""Loading models (from a path or a ModelProto) and saving them atomically."""

from __future__ import annotations

import os
import tempfile
from typing import Union

import onnx
from google.protobuf.message import DecodeError

from .errors import InputError

ModelLike = Union[onnx.ModelProto, str, os.PathLike]


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
        return copy
    path = os.fspath(model)
    if not os.path.exists(path):
        raise InputError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"model path is a directory, expected an .onnx file: {path}")
    try:
        loaded = onnx.load(path)
    except (DecodeError, RuntimeError, ValueError, OSError) as err:
        raise InputError(f"cannot read {path} as an ONNX model: {err}") from err
    if not loaded.HasField("graph") or not loaded.opset_import:
        raise InputError(f"{path} is not an ONNX model (no graph or no opset)")
    return loaded


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


def save_model_atomic(model: onnx.ModelProto, output: str | os.PathLike) -> None:
    """Write ``model`` to a temporary file beside ``output``, re-load it, then rename it in place.

    An error or Ctrl-C on the way leaves neither ``output`` nor the temporary file behind.
    """
    out = os.path.abspath(os.fspath(output))
    directory = os.path.dirname(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        onnx.load(tmp)  # the file reads back as a model
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
