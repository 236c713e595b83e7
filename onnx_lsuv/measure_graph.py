"""Measuring copies of a model: graph rewrites that compute layer statistics inside ONNX Runtime.

Two rewrites, both on a private copy whose original graph outputs are dropped (so ONNX Runtime
prunes the nodes that no statistic needs):

* ``stats_model``: the variance of every target layer's output as scalar graph outputs.
* ``normalizing_model``: LSUV as batch normalisation done once (the paper's own remark): after
  each target output the graph computes the factor that brings it to the target variance and
  multiplies it in, so every downstream layer sees exactly what it will see in the final model.
  One forward pass yields every layer's factor.

Statistics are reduced in two stages (rows of a flattened view, then the rows), which keeps a
float32 mean over tens of millions of elements accurate to ~1e-7 (one ReduceMean over all of them
was off by 0.3%). Reductions use ``axes`` as an attribute below opset 18 and as an input from 18.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .layers import Layer
from .model_io import default_opset

_PREFIX = "onnx_lsuv::"


class GraphEditor:
    """Appends uniquely named nodes and initializers to a graph (a measuring copy)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = default_opset(model)
        self._count = 0
        self._consts: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{_PREFIX}{hint}_{self._count}"

    def const(self, value: np.ndarray, hint: str = "c") -> str:
        value = np.asarray(value)
        key = (value.dtype.str, value.shape, value.tobytes())
        if key not in self._consts:
            name = self.fresh(hint)
            self.graph.initializer.append(numpy_helper.from_array(value, name))
            self._consts[key] = name
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.fresh(hint or op_type.lower())
        self.graph.node.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def reduce_mean(self, x: str, axes: list[int] | None, keepdims: int) -> str:
        if axes is None:
            return self.op("ReduceMean", [x], keepdims=keepdims)
        if self.opset >= 18:
            return self.op("ReduceMean", [x, self.const(np.array(axes, np.int64))],
                           keepdims=keepdims)
        return self.op("ReduceMean", [x], axes=axes, keepdims=keepdims)

    def mean(self, x: str, rank: int | None) -> str:
        """Scalar mean of ``x`` in two stages over a 2-D view."""
        flat = self.op("Flatten", [x], axis=2 if rank is not None and rank >= 3 else 1)
        return self.reduce_mean(self.reduce_mean(flat, [1], 1), None, 0)

    def mean_var(self, x: str, rank: int | None) -> tuple[str, str]:
        """Scalar mean and population variance of ``x`` (centred, two stages each)."""
        flat = self.op("Flatten", [x], axis=2 if rank is not None and rank >= 3 else 1)
        mean = self.reduce_mean(self.reduce_mean(flat, [1], 1), None, 0)
        d = self.op("Sub", [flat, mean])
        sq = self.op("Mul", [d, d])
        var = self.reduce_mean(self.reduce_mean(sq, [1], 1), None, 0)
        return mean, var


def _stat_dtype(layer: Layer) -> np.dtype:
    return np.dtype(np.float64) if layer.dtype == np.float64 else np.dtype(np.float32)


def _as_stat_type(ed: GraphEditor, name: str, layer: Layer) -> str:
    """Cast a float16/bfloat16 tensor to float32 for statistics (squares overflow float16)."""
    if layer.dtype in (np.float32, np.float64):
        return name
    return ed.op("Cast", [name], to=TensorProto.FLOAT)


def _measuring_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.output[:]
    return copy


def _set_outputs(graph: onnx.GraphProto, names: list[str]) -> None:
    for n in names:
        graph.output.append(helper.make_empty_tensor_value_info(n))


def stats_model(model: onnx.ModelProto, layers: list[Layer]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose outputs are the variances of the layers' outputs.

    Returns:
        The measuring model, and per layer the name of its (scalar) variance output.
    """
    copy = _measuring_copy(model)
    ed = GraphEditor(copy)
    names = []
    for layer in layers:
        x = _as_stat_type(ed, layer.output, layer)
        names.append(ed.mean_var(x, layer.output_rank)[1])
    _set_outputs(copy.graph, names)
    return copy, names


@dataclass(frozen=True)
class LayerBias:
    """A kept, non-zero bias, as the layer adds it: ``value`` broadcasts against the output."""

    value: np.ndarray  # already multiplied by Gemm's beta, shaped for broadcasting
    mean: float
    var: float


@dataclass(frozen=True)
class NormalizedOutputs:
    """Names of one layer's outputs in the normalising model."""

    var_before: str  # variance of the layer's output as it came in
    scale: str  # the factor the weight gets (1 when already within tolerance or degenerate)


def normalizing_model(
    model: onnx.ModelProto,
    layers: list[Layer],
    biases: dict[int, LayerBias],
    target: float,
    tol: float,
) -> tuple[onnx.ModelProto, list[NormalizedOutputs]]:
    """A copy of ``model`` that normalises each layer's output to ``target`` variance in-graph.

    For a layer without bias (or a zeroed one) the output scales exactly with its weight, so the
    factor is sqrt(target / var). With a kept bias b the output is a z + b for factor a, whose
    variance a^2 var(z) + 2 a cov(z, b) + var(b) is set to ``target`` in closed form (the positive
    root; sqrt(target / var(z)) where none exists). A layer already within ``tol`` keeps factor 1,
    as in the paper's loop; a zero or non-finite variance also gets 1 (the caller skips it).

    Args:
        model: The model with its current (pre-initialised) weights.
        layers: The target layers, in topological order.
        biases: Layer index -> its kept non-zero bias; layers not listed have none.
        target: Target variance.
        tol: Tolerance on the variance.

    Returns:
        The normalising model, and per layer the names of its variance and factor outputs.
    """
    from .layers import GraphIndex

    copy = _measuring_copy(model)
    index = GraphIndex(copy.graph)
    ed = GraphEditor(copy)
    result = []
    for layer in layers:
        consumers = list(index.consumers.get(layer.output, []))
        dt = _stat_dtype(layer)
        c_target = ed.const(np.array(target, dt), "target")
        c_tol = ed.const(np.array(tol, dt), "tol")
        c_zero = ed.const(np.array(0, dt), "zero")
        c_big = ed.const(np.array(np.finfo(np.float32).max, dt), "big")
        bias = biases.get(layer.index)
        if bias is None:
            z = layer.output
            _, vz = ed.mean_var(_as_stat_type(ed, z, layer), layer.output_rank)
            var_y = vz
            factor = ed.op("Sqrt", [ed.op("Div", [c_target, vz])])
        else:
            b_model = ed.const(bias.value.astype(layer.dtype), "bias")
            z = ed.op("Sub", [layer.output, b_model])
            zs = _as_stat_type(ed, z, layer)
            mz, vz = ed.mean_var(zs, layer.output_rank)
            b_stat = ed.const(bias.value.astype(dt), "bias_stat")
            mzb = ed.mean(ed.op("Mul", [zs, b_stat]), layer.output_rank)
            c_mb = ed.const(np.array(bias.mean, dt), "bias_mean")
            c_vb = ed.const(np.array(bias.var, dt), "bias_var")
            cov = ed.op("Sub", [mzb, ed.op("Mul", [mz, c_mb])])
            two_cov = ed.op("Add", [cov, cov])
            var_y = ed.op("Add", [ed.op("Add", [vz, two_cov]), c_vb])
            # vz a^2 + 2 cov a + (vb - target) = 0
            disc = ed.op("Sub", [ed.op("Mul", [cov, cov]),
                                 ed.op("Mul", [vz, ed.op("Sub", [c_vb, c_target])])])
            root = ed.op("Div", [ed.op("Sub", [ed.op("Sqrt", [ed.op("Max", [disc, c_zero])]), cov]),
                                 vz])
            has_root = ed.op("And", [ed.op("Not", [ed.op("Less", [disc, c_zero])]),
                                     ed.op("Greater", [root, c_zero])])
            unbiased = ed.op("Sqrt", [ed.op("Div", [c_target, vz])])
            factor = ed.op("Where", [has_root, root, unbiased])
        valid = ed.op("And", [ed.op("Greater", [vz, c_zero]), ed.op("Less", [vz, c_big])])
        within = ed.op("Less", [ed.op("Abs", [ed.op("Sub", [var_y, c_target])]), c_tol])
        apply = ed.op("And", [valid, ed.op("Not", [within])])
        one = ed.const(np.array(1, dt), "one")
        scale = ed.op("Where", [apply, factor, one])
        scale_model = scale if dt == layer.dtype else ed.op(
            "Cast", [scale], to=helper.np_dtype_to_tensor_dtype(layer.dtype))
        y_new = ed.op("Mul", [z, scale_model])
        if bias is not None:
            y_new = ed.op("Add", [y_new, b_model])
        for i, pos in consumers:
            copy.graph.node[i].input[pos] = y_new
        result.append(NormalizedOutputs(var_y, scale))
    _set_outputs(copy.graph, [n for r in result for n in (r.var_before, r.scale)])
    return copy, result
