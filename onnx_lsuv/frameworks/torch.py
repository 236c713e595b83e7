"""PyTorch: ``lsuv_module(module, batch)`` exports with torch.onnx (dynamo, torch's default,
or TorchScript), initialises, and copies the new weights into the module's state_dict.

Both exporters at their default settings: eval mode folds BatchNorm into the conv kernels
(its running statistics are left as they are; the kernel is unscaled and the folded bias
change is carried into the conv's bias or the BatchNorm's shift), and Linear weights may be
stored transposed. Requires ``onnx-lsuv[torch]`` (torch, and onnxscript for dynamo).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from ..errors import InputError
from ..model_io import load_model
from . import FrameworkResult, forward_first, initialise

EXPORTERS = ("dynamo", "torchscript")


def _to_numpy(t) -> np.ndarray:
    import torch

    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32,
                                                     torch.float64):
            t = t.float()  # bfloat16 and the like: numpy has no such dtype
        return t.numpy()
    return np.asarray(t)


def _feed(model, arrays: list[np.ndarray]):
    """The batch for lsuv_init: one array, or the arrays keyed by the export's input names."""
    if len(arrays) == 1:
        return arrays[0]
    init = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in init]
    if len(names) != len(arrays):
        raise InputError(f"the exported model takes {len(names)} input(s) "
                         f"({', '.join(names)}), the batch has {len(arrays)} part(s)")
    return dict(zip(names, arrays))


def _as_input(t, module):
    """A float input in the module's own float dtype and on its device (numpy gives float64;
    the export would fail on the mismatch)."""
    ref = next((p for p in module.parameters() if p.is_floating_point()), None)
    if ref is None:
        return t
    if t.is_floating_point() and t.dtype != ref.dtype:
        t = t.to(ref.dtype)
    return t.to(ref.device)


def _frozen(module) -> dict[str, np.ndarray]:
    """The float tensors torch does not train: buffers (those left out of state_dict too,
    ``persistent=False``) and parameters with ``requires_grad=False``."""
    out = {n: _to_numpy(b) for n, b in module.named_buffers() if b.is_floating_point()}
    out.update((n, _to_numpy(p)) for n, p in module.named_parameters()
               if not p.requires_grad and p.is_floating_point())
    return out


def _first_layer(module):
    """The first submodule it registers that holds weights, and its name."""
    for name, sub in module.named_modules():
        if next(sub.parameters(recurse=False), None) is not None:
            return name or type(module).__name__, sub
    return None, None


def _expects(module) -> str:
    name, sub = _first_layer(module)
    if sub is None:
        return "see the module's forward for the shape it takes"
    return f"the first layer it registers with weights, {name}, is {sub!r}"


def _guesses(batch: np.ndarray, module):
    """The batch with the first layer's in_channels on axis 1, or its in_features last."""
    _, sub = _first_layer(module)
    if sub is not None and batch.ndim >= 2:
        if isinstance(getattr(sub, "in_channels", None), int):
            yield (*batch.shape[:1], sub.in_channels, *batch.shape[2:])
        if isinstance(getattr(sub, "in_features", None), int):
            yield (*batch.shape[:-1], sub.in_features)


def lsuv_module(module, batch, *, exporter: str = "dynamo", opset: int | None = None,
                strict: bool = True, **options: Any) -> FrameworkResult:
    """LSUV-initialise a ``torch.nn.Module`` in place.

    Args:
        module: The module. It is exported in eval mode and put back in its mode after.
        batch: The example input: a tensor, a tuple of tensors (positional arguments), or
            numpy arrays. Float inputs are cast to the module's float dtype and moved to its
            device.
        exporter: "dynamo" (``torch.onnx.export(dynamo=True)``, torch's default) or
            "torchscript" (``dynamo=False``). Defaults to "dynamo".
        opset: The ONNX opset to export to. Defaults to the exporter's own.
        strict: Raise ``MatchError`` and leave the module untouched when a changed tensor
            is not found among its parameters. Defaults to True.
        **options: ``lsuv_init``'s options (seed, tol, target_var, ...; policy="transformer"
            and its targets for a transformer: see ``onnx_lsuv.policy``).

    A layer whose weight is a buffer or a parameter with ``requires_grad=False`` (a fixed
    STFT or mel kernel) is left alone and reported (``include`` takes it anyway).

    Returns:
        FrameworkResult; ``params`` are the state_dict entries that were written.
    """
    import torch

    if exporter not in EXPORTERS:
        raise InputError(f"exporter must be one of {', '.join(EXPORTERS)}, not {exporter!r}")
    args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    args = tuple(_as_input(torch.as_tensor(a), module) for a in args)
    modes = [(m, m.training) for m in module.modules()]  # each its own (a frozen BN stays)
    module.eval()
    try:
        first = _to_numpy(args[0])  # (the batch as given, then each guess in its place)
        with torch.no_grad():
            forward_first(lambda x: module(*args) if x is first
                          else module(_as_input(torch.as_tensor(x), module)), first,
                          _expects(module), "PyTorch",
                          _guesses(first, module) if len(args) == 1 else ())
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            kwargs: dict[str, Any] = {"dynamo": exporter == "dynamo"}
            if opset is not None:
                kwargs["opset_version"] = opset
            if exporter == "dynamo":
                kwargs["verbose"] = False
            torch.onnx.export(module, args, path, **kwargs)
            exported = load_model(path)
        state = module.state_dict()
        # A tied parameter is in state_dict under each of its names: it is one parameter
        # (given once, so the mapping can tell it from two equal ones), written once.
        aliases: dict[str, list[str]] = {}
        first: dict[tuple, str] = {}
        for k, v in state.items():
            if v.is_floating_point():
                where = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape),
                         v.stride(), v.dtype)
                aliases.setdefault(first.setdefault(where, k), []).append(k)
        params = {k: _to_numpy(state[k]) for k in aliases}
        data = _feed(exported, [_to_numpy(a) for a in args])
        result = initialise(exported, data, params, strict, options, _frozen(module), "torch")
        with torch.no_grad():
            for name, value in list(result.params.items()):
                target = state[name]
                target.copy_(torch.from_numpy(np.ascontiguousarray(value)).to(target.dtype))
                for alias in aliases[name][1:]:
                    result.params[alias] = value
    finally:
        for m, mode in modes:
            m.training = mode
    return result
