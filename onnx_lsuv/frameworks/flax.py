"""Flax: ``lsuv_nnx(model, batch)`` for nnx modules (updated in place) and
``lsuv_linen(module, variables, batch)`` for linen (returns new variables), both exported
with jax2onnx.

jax2onnx names tensors ``const_0`` or ``kernel_oih_0``, with no link to the Flax paths, and
writes kernels transposed (HWIO -> OIHW) and ConvTranspose kernels flipped; the values are
the same, so the mapping finds them. Names are the state's paths joined by "." (nnx:
``conv.kernel``) or by "/" (linen: ``params/Conv_0/kernel``). Requires ``onnx-lsuv[flax]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import FrameworkResult, forward_first, initialise, unique_names


def _is_float(var) -> bool:
    """A float array (not an RNG key, a counter or a non-array)."""
    import jax

    value = getattr(var, "value", None)
    dtype = getattr(value, "dtype", None)
    if dtype is None or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return False
    return np.dtype(dtype).kind == "f"


def _kernels(params: dict[str, np.ndarray]) -> list[str]:
    return [n for n, v in params.items()
            if n.rsplit("/", 1)[-1].rsplit(".", 1)[-1] == "kernel" and v.ndim >= 2]


def _expects(params: dict[str, np.ndarray]) -> str:
    """What the state says of the input: the first kernel it lists (the state's order, which
    need not be the order of the calls: nnx sorts it by name)."""
    kernels = _kernels(params)
    if not kernels:
        return "see the module's __call__ for the shape it takes"
    return (f"the first kernel in its state, {kernels[0]}, has shape "
            f"{params[kernels[0]].shape} (Flax kernels are (..., in, out))")


def _guesses(batch: np.ndarray, params: dict[str, np.ndarray]):
    """The batch with its last axis (features, or channels last) set to a kernel's ``in``."""
    for name in _kernels(params):
        if batch.ndim:
            yield batch.shape[:-1] + (params[name].shape[-2],)


def _export(fn, batch: np.ndarray, opset: int):
    from jax2onnx import to_onnx

    return to_onnx(fn, inputs=[("B",) + tuple(batch.shape[1:])], opset=opset)


def lsuv_nnx(model, batch, *, opset: int = 17, strict: bool = True,
             **options: Any) -> FrameworkResult:
    """LSUV-initialise a Flax nnx module in place (one input).

    Args:
        model: The nnx module. Call ``model.eval()`` first if it has BatchNorm or Dropout.
        batch: The input batch, an array.
        opset: The ONNX opset. Defaults to 17.
        strict: Raise ``MatchError`` and leave the module untouched when a changed tensor
            is not found among its variables. Defaults to True.
        **options: ``lsuv_init``'s options.

    A layer whose kernel is held by a Variable that is not an ``nnx.Param`` (``nnx.Variable``,
    ``BatchStat``: a fixed STFT or mel kernel) is left alone and reported (``include`` takes
    it anyway).

    Returns:
        FrameworkResult; ``params`` are keyed by the nnx state paths joined by ".".
    """
    import jax.numpy as jnp
    from flax import nnx

    batch = np.asarray(batch)
    flat = list(nnx.to_flat_state(nnx.state(model)))
    entries = [(".".join(str(p) for p in path), path, var) for path, var in flat]
    unique_names((n for n, _, _ in entries), "the nnx module")
    names = {n: path for n, path, _ in entries}
    params = {n: np.asarray(var.value) for n, _, var in entries if _is_float(var)}
    # what nnx trains is its Params; any other Variable (BatchStat, a plain nnx.Variable
    # holding a fixed kernel) is not
    frozen = {n: params[n] for n, _, var in entries if n in params
              and not issubclass(getattr(var, "type", type(var)), nnx.Param)}
    # each forward on a deep copy: a BatchNorm in train mode updates its statistics, a
    # Dropout its RNG count (nnx.merge of nnx.split's state shares the Variables: no copy)
    forward_first(lambda x: nnx.clone(model)(jnp.asarray(x)), batch, _expects(params), "Flax",
                  _guesses(batch, params))
    result = initialise(_export(model, batch, opset), batch, params, strict, options, frozen,
                        "Flax")
    if result.params:
        by_path = {names[n]: v for n, v in result.params.items()}
        updated = [(path, var.replace(jnp.asarray(by_path[path])) if path in by_path else var)
                   for path, var in flat]
        nnx.update(model, nnx.from_flat_state(updated))
    return result


def lsuv_linen(module, variables, batch, *, opset: int = 17, strict: bool = True,
               **options: Any) -> FrameworkResult:
    """LSUV-initialise a Flax linen module's variables (one input).

    Args:
        module: The linen module; ``module.apply(variables, x)`` is what is exported (pass
            a module whose ``__call__`` runs in inference mode, e.g. BatchNorm with
            ``use_running_average=True``).
        variables: Its variables ({"params": ..., "batch_stats": ...}).
        batch: The input batch, an array.
        opset: The ONNX opset. Defaults to 17.
        strict: Raise ``MatchError`` when a changed tensor is not found among the
            variables. Defaults to True.
        **options: ``lsuv_init``'s options.

    A layer whose kernel is held outside the "params" collection (a fixed STFT or mel kernel
    in a collection of its own) is left alone and reported (``include`` takes it anyway).

    Returns:
        FrameworkResult; ``variables`` holds the new variables (the argument is unchanged),
        ``params`` the changed ones, keyed by their paths joined by "/".
    """
    import jax.numpy as jnp
    from flax import traverse_util

    batch = np.asarray(batch)
    flat = traverse_util.flatten_dict(variables, sep="/")
    params = {k: np.asarray(v) for k, v in flat.items() if np.asarray(v).dtype.kind == "f"}
    # what linen trains is the "params" collection; "batch_stats" and any other are not
    frozen = {k: v for k, v in params.items() if k.split("/", 1)[0] != "params"}
    forward_first(lambda x: module.apply(variables, jnp.asarray(x)), batch, _expects(params),
                  "Flax", _guesses(batch, params))
    result = initialise(_export(lambda x: module.apply(variables, x), batch, opset), batch,
                        params, strict, options, frozen, "Flax")
    new = dict(flat)
    for name, value in result.params.items():
        new[name] = jnp.asarray(value)
    result.variables = traverse_util.unflatten_dict(new, sep="/")
    return result
