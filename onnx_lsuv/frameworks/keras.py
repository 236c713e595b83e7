"""Keras 3: ``lsuv_model(model, batch)`` exports with tf2onnx (or Keras' own
``model.export(format="onnx")``), initialises, and assigns the new values to the model's
variables, keyed by ``variable.path``.

tf2onnx writes kernels in ONNX layouts (HWIO -> OIHW, depthwise H W C 1 -> C 1 H W, LSTM
[in, 4h] i f c o -> [1, 4h, in] i o f c) and folds BatchNormalization into a preceding conv;
the mapping undoes each. Requires ``onnx-lsuv[keras]`` (keras, tensorflow, tf2onnx); the
TensorFlow backend.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from ..errors import InputError
from ..model_io import load_model
from . import FrameworkResult, forward_first, initialise, unique_names

EXPORTERS = ("tf2onnx", "keras")


def _export(model, batch: np.ndarray, exporter: str, opset: int | None, path: str) -> None:
    if exporter == "keras":
        kwargs = {"opset_version": opset} if opset is not None else {}
        model.export(path, format="onnx", verbose=False, **kwargs)
        return
    import tensorflow as tf
    import tf2onnx

    # tf2onnx.convert.from_keras reads Keras 2 attributes: a tf.function over the model call
    # is the path that works with Keras 3
    spec = (tf.TensorSpec((None,) + batch.shape[1:], tf.as_dtype(batch.dtype), name="x"),)

    @tf.function(input_signature=spec)
    def forward(x):
        return model(x, training=False)

    tf2onnx.convert.from_function(forward, input_signature=spec, opset=opset or 17,
                                  output_path=path)


def lsuv_model(model, batch, *, exporter: str = "tf2onnx", opset: int | None = None,
               strict: bool = True, **options: Any) -> FrameworkResult:
    """LSUV-initialise a built Keras 3 model (one input) in place.

    Args:
        model: The model, built (called once, or with an Input).
        batch: The input batch, an array.
        exporter: "tf2onnx" (``tf2onnx.convert.from_function``, opset 17 unless given) or
            "keras" (``model.export(format="onnx")``). Defaults to "tf2onnx".
        opset: The ONNX opset. Defaults to the exporter's.
        strict: Raise ``MatchError`` and leave the model untouched when a changed tensor is
            not found among its variables. Defaults to True.
        **options: ``lsuv_init``'s options.

    A layer whose kernel is a non-trainable weight (``layer.trainable = False``, or a
    variable made with ``trainable=False``; a fixed STFT or mel kernel) is left alone and
    reported (``include`` takes it anyway).

    Returns:
        FrameworkResult; ``params`` are keyed by ``variable.path``.
    """
    if exporter not in EXPORTERS:
        raise InputError(f"exporter must be one of {', '.join(EXPORTERS)}, not {exporter!r}")
    if isinstance(batch, (list, tuple, dict)):
        raise InputError("lsuv_model takes a model with one input and its batch as one array; "
                         "for several inputs, export the model yourself and use "
                         "onnx_lsuv.match.match_parameters")
    batch = np.asarray(batch)
    # builds the model (its weights exist from then on), and checks that the batch fits it
    try:
        shape = model.input_shape if model.built else None
    except Exception:  # a subclassed model has none (AttributeError, or keras' own error)
        shape = None
    declared = isinstance(shape, tuple) and len(shape) > 1 and \
        all(isinstance(d, int) for d in shape[1:])
    forward_first(lambda x: model(x[:1], training=False), batch,
                  f"it takes inputs of shape {shape}" if shape is not None
                  else "see the model's first layer for the shape it takes", "Keras",
                  [(batch.shape[0], *shape[1:])] if declared and batch.ndim else [])
    unique_names((v.path for v in model.weights), "the Keras model")
    variables = {v.path: v for v in model.weights}
    params = {name: np.asarray(v.numpy()) for name, v in variables.items()}
    # layer.trainable=False makes all its weights non-trainable (a variable's own flag stays)
    frozen = {v.path: params[v.path] for v in model.non_trainable_weights}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        _export(model, batch, exporter, opset, path)
        exported = load_model(path)
    result = initialise(exported, batch, params, strict, options, frozen, "Keras")
    for name, value in result.params.items():
        variables[name].assign(value)
    return result
