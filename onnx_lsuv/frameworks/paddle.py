"""PaddlePaddle: ``lsuv_layer(layer, batch)`` exports with paddle2onnx
(``paddle.onnx.export``), initialises, and sets the new values into the layer's state_dict.

paddle2onnx names tensors by creation order (``conv2d_0.w_0``), not by state_dict key; the
values are the same, so the mapping finds them. Requires ``onnx-lsuv[paddle]``.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from typing import Any

import numpy as np

from ..errors import LSUVError
from ..model_io import load_model
from . import FrameworkResult, forward_first, initialise


def _guesses(batch: np.ndarray, weight: list[int] | None):
    """Shapes the layer may take, from its first weight: a conv's [out, in, k...] (or a
    transposed conv's [in, out, k...]) sets axis 1, a Linear's [in, out] the last axis."""
    if weight is None or batch.ndim < 2:
        return
    if len(weight) > 2:
        yield from ((*batch.shape[:1], c, *batch.shape[2:]) for c in (weight[1], weight[0]))
    else:
        yield (*batch.shape[:-1], weight[0])


def lsuv_layer(layer, batch, *, opset: int = 17, strict: bool = True,
               **options: Any) -> FrameworkResult:
    """LSUV-initialise a ``paddle.nn.Layer`` (one input) in place.

    Args:
        layer: The layer; exported in eval mode and put back in its mode after.
        batch: The input batch, an array or a paddle Tensor.
        opset: The ONNX opset. Defaults to 17.
        strict: Raise ``MatchError`` and leave the layer untouched when a changed tensor is
            not found among its parameters. Defaults to True.
        **options: ``lsuv_init``'s options.

    A layer whose weight has ``stop_gradient=True`` (a frozen parameter or a buffer; a fixed
    STFT or mel kernel) is left alone and reported (``include`` takes it anyway).

    Returns:
        FrameworkResult; ``params`` are keyed like ``layer.state_dict()`` (a tensor under
        each of its names).
    """
    os.environ.setdefault("POLYGRAPHY_AUTOINSTALL_DEPS", "0")  # paddle2onnx would pip-install
    import paddle

    batch = batch.numpy() if isinstance(batch, paddle.Tensor) else np.asarray(batch)
    modes = [(sub, sub.training) for sub in layer.sublayers(include_self=True)]
    layer.eval()
    try:
        state = layer.state_dict()
        # state_dict lists a recurrent layer's weights twice (rnn.weight_ih_l0 and
        # rnn.0.cell.weight_ih, one tensor): each tensor is given once, by its first name
        # (named_parameters' own), so that the mapping can tell it from two equal ones, and
        # written once; BatchNorm's statistics are in state_dict too (the fold carry reads
        # them)
        aliases: dict[str, list[str]] = {}
        first: dict[int, str] = {}
        for k, v in state.items():
            if v.dtype in (paddle.float16, paddle.float32, paddle.float64):
                aliases.setdefault(first.setdefault(id(v), k), []).append(k)
        params = {k: state[k].numpy() for k in aliases}
        # not trained: stop_gradient (frozen parameters, buffers; those left out of
        # state_dict too, persistable=False)
        frozen = {k: params[k] for k in aliases if state[k].stop_gradient}
        frozen.update((k, b.numpy()) for k, b in layer.named_buffers() if k not in state
                      and b.dtype in (paddle.float16, paddle.float32, paddle.float64))
        # the batch through paddle's own forward first: paddle2onnx fails a wrong shape by
        # exiting the process (and, called again, crashed it with SIGSEGV/SIGFPE)
        weight = next(((k, v.shape) for k, v in state.items() if len(v.shape) >= 2), None)
        with paddle.no_grad():
            forward_first(lambda x: layer(paddle.to_tensor(x)), batch,
                          f"the first weight in its state_dict, {weight[0]}, has shape "
                          f"{list(weight[1])}" if weight
                          else "see the layer's forward for the shape it takes", "Paddle",
                          _guesses(batch, weight[1] if weight else None))
        # the spec's name must be forward's own argument name, or the export fails
        arg = next(iter(inspect.signature(layer.forward).parameters), "x")
        spec = [paddle.static.InputSpec([None, *batch.shape[1:]], str(batch.dtype), arg)]
        with tempfile.TemporaryDirectory() as tmp:
            prefix = os.path.join(tmp, "model")
            try:
                paddle.onnx.export(layer, prefix, input_spec=spec, opset_version=opset)
            except SystemExit as stop:  # paddle2onnx exits the process on a failed export
                raise LSUVError(f"paddle2onnx could not export the layer (it exited with "
                                f"{stop.code}; its log above says why)") from None
            exported = load_model(prefix + ".onnx")
        result = initialise(exported, batch, params, strict, options, frozen, "Paddle")
        for name, value in list(result.params.items()):
            state[name].set_value(value)
            for alias in aliases[name][1:]:
                result.params[alias] = value
    finally:
        for sub, mode in modes:  # each its own mode back (a frozen BatchNorm stays frozen)
            sub.training = mode
    return result
