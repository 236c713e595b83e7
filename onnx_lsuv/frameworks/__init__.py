"""One call per training framework: export, initialise, map back, update the model.

Each submodule imports its framework lazily (install the extra: ``onnx-lsuv[torch]``,
``[keras]``, ``[flax]``, ``[paddle]``):

- ``onnx_lsuv.frameworks.torch.lsuv_module(module, batch)`` (TorchScript or dynamo exporter)
- ``onnx_lsuv.frameworks.keras.lsuv_model(model, batch)`` (tf2onnx or Keras' own export)
- ``onnx_lsuv.frameworks.flax.lsuv_nnx(model, batch)``, ``lsuv_linen(module, variables, batch)``
- ``onnx_lsuv.frameworks.paddle.lsuv_layer(layer, batch)`` (paddle2onnx)

Each exports the model with its exporter's default settings, runs ``lsuv_init`` on the
export, maps the changed tensors back onto the framework's own parameters by value
(``onnx_lsuv.match``), and writes them into the model (Flax linen: returns new variables).

A tensor the framework does not train (a torch buffer or a parameter with
``requires_grad=False``, a Keras non-trainable weight, a Flax variable outside ``params``, a
Paddle parameter with ``stop_gradient``) is left alone: before LSUV, each target weight of the
export is found by value among the framework's tensors (``match.fixed_weights``), and a layer
whose weight is a non-trainable one (a fixed STFT, mel or constant-Q kernel) is neither
pre-initialised nor scaled; the report lists it as left alone, with the tensor's name. One
whose values both a trainable and a non-trainable tensor hold is left alone too, and said so.
``include=[...]`` takes such a layer anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ..errors import InputError, LSUVError
from ..lsuv import lsuv_init
from ..match import MatchResult, fixed_weights, match_parameters
from ..options import LSUVOptions
from ..report import Report

log = logging.getLogger("onnx_lsuv")


class MatchError(LSUVError):
    """Some changed ONNX tensors were not found among the framework's parameters; the model
    was left as it was. ``match`` holds what was found and what was not."""

    def __init__(self, match: MatchResult) -> None:
        super().__init__("the initialised weights could not all be mapped back onto the "
                         "framework's parameters, so the model was not changed: "
                         + match.summary()
                         + " (strict=False applies the part that was mapped)")
        self.match = match


@dataclass
class FrameworkResult:
    """What the one-call front ends return.

    Attributes:
        report: onnx-lsuv's report on the exported model (``report.converged``, per layer).
        match: How each changed ONNX tensor was mapped back (``match.complete``).
        params: The new values written into the model, by the framework's names.
        model: The initialised ONNX model.
        exported: The ONNX model as the exporter wrote it.
        variables: Flax linen only: the new variables (the module itself holds none).
    """

    report: Report
    match: MatchResult
    params: dict[str, np.ndarray]
    model: onnx.ModelProto
    exported: onnx.ModelProto
    variables: Any = None


def initialise(exported: onnx.ModelProto, data: Any, params: dict[str, np.ndarray],
               strict: bool, options: dict[str, Any],
               frozen: Mapping[str, np.ndarray] | None = None,
               framework: str = "framework") -> FrameworkResult:
    """lsuv_init on the export, leaving alone the layers whose weight is one of ``frozen``
    (the framework's non-trainable tensors, by name; they may be in ``params`` too), then
    the mapping; MatchError (strict) if it is incomplete."""
    if frozen:
        options = leave_frozen(exported, params, frozen, framework, options)
    result = lsuv_init(exported, data, **options)
    if not result.report.layers:
        log.warning("the exported model has no layer that onnx-lsuv initialises (%d skipped: "
                    "%s): the framework model is left as it was", len(result.report.skipped),
                    "; ".join(f"{s['name']}: {s['reason']}" for s in result.report.skipped[:3])
                    or "none found")
    matched = match_parameters(exported, result.weights, params)
    if strict and not matched.complete:
        raise MatchError(matched)
    name_modules(result.report, matched)
    return FrameworkResult(result.report, matched, matched.params, result.model, exported)


def module_name(param: str) -> str:
    """The module (layer) a parameter belongs to, in the framework's own words: its name
    without the last part (torch ``layer1.0.conv1.weight`` -> ``layer1.0.conv1``; Flax linen
    ``params/Conv_0/kernel`` -> ``Conv_0``; Keras ``sequential/conv/kernel`` ->
    ``sequential/conv``)."""
    if param.startswith("params/"):
        param = param[len("params/"):]
    cut = max(param.rfind("."), param.rfind("/"))
    return param[:cut] if cut > 0 else param


def name_modules(report: Report, matched: MatchResult) -> None:
    """Give each layer record the framework's module name of its weight (``module``), where
    the mapping found the weight among the parameters: the table shows it beside the ONNX
    node's name (a dynamo export calls a conv ``node_conv2d_3``)."""
    owner = {m["onnx"]: m["params"] for m in matched.mapped if m.get("params")}
    for rec in report.layers:
        params = owner.get(rec.weight)
        if params:
            rec.module = ", ".join(sorted({module_name(p) for p in params}))


def forward_first(run: Callable[[np.ndarray], Any], batch: np.ndarray, expects: str,
                  framework: str, guesses: Iterable[tuple[int, ...]] = ()) -> None:
    """Run the framework's own forward on the batch before exporting it: a batch that does
    not fit the model gets the framework's own shape error, in one message naming the batch
    shape and what the model expects (a shape it runs on, where one is found), rather than
    an exporter's failure far from the cause
    (jax2onnx tracing linen's shape checks, a Reshape error, paddle2onnx exiting -1).

    ``run`` takes an array (it runs the model on a copy or without updating any state: a
    failed call leaves the model as it was). ``guesses`` are shapes the model may take, read
    from its first weights; a few are tried on zeros, and the first that runs is named: the
    message never claims a shape that the model's own forward has not taken.

    Raises:
        InputError: The forward failed on the batch.
    """
    try:
        run(batch)
    except Exception as err:  # the framework's own error type, whatever it is
        said = " ".join(str(err).split())
        said = said if len(said) <= 400 else said[:400] + " ..."
        fits = _first_that_runs(run, batch, guesses)
        shape, own = tuple(batch.shape), f"({type(err).__name__}: {said}); {expects}"
        if fits:
            raise InputError(f"the batch of shape {shape} does not fit the {framework} model: "
                             f"its own forward fails on it {own}; a batch of shape {fits} "
                             "runs through it. Nothing was exported or changed") from err
        # no shape seen to run: the cause may be the model's (a BatchNorm in training mode
        # in linen's apply, a missing RNG), not the batch's
        raise InputError(f"the {framework} model's own forward fails on the batch of shape "
                         f"{shape} {own}: either the batch does not fit the model, or the "
                         "model does not run as it is called here. Nothing was exported or "
                         "changed") from err


def _first_that_runs(run: Callable[[np.ndarray], Any], batch: np.ndarray,
                     guesses: Iterable[tuple[int, ...]], tries: int = 3) -> tuple | None:
    """The first of (at most ``tries``) guessed shapes, other than the batch's, whose zeros
    the model's forward runs on; None if none does."""
    tried: list[tuple] = []
    for shape in guesses:
        shape = tuple(int(d) for d in shape)
        if shape == tuple(batch.shape) or shape in tried or min(shape, default=1) < 1:
            continue
        if len(tried) == tries:
            break
        tried.append(shape)
        try:
            run(np.zeros(shape, batch.dtype))
        except Exception:  # not this one either
            continue
        return shape
    return None


def leave_frozen(exported: onnx.ModelProto, params: Mapping[str, np.ndarray],
                 frozen: Mapping[str, np.ndarray], framework: str,
                 options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the export's weights that are non-trainable tensors added to
    ``fixed`` (after the caller's own, whether given as a keyword or in ``options=``)."""
    found = fixed_weights(exported, {**params, **frozen}, set(frozen), framework)
    if not found:
        return options
    given = options.get("fixed", getattr(options.get("options"), "fixed", ()))
    mine = dict(LSUVOptions(fixed=given).fixed)
    log.info("%d layer weight(s) of the export are %s non-trainable tensors: left alone",
             len(set(found) - set(mine)), framework)
    return {**options, "fixed": {**found, **mine}}


def unique_names(names: Iterable[str], what: str) -> None:
    """InputError when two of a framework's parameters have one name: the mapping is by name
    on the way out, so one of them could never be written."""
    seen: set[str] = set()
    twice = sorted({n for n in names if n in seen or seen.add(n)})
    if twice:
        raise InputError(f"{what}: several parameters are named {', '.join(twice[:5])}; give "
                         "them distinct names (e.g. add_weight(name=...)) so each can be "
                         "written back")
