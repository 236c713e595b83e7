"""float16 / bfloat16 models: a float32 twin to measure in where the provider lacks a kernel.

ONNX Runtime's CPU provider has no bfloat16 kernels for most ops (and the ONNX spec allows no
bfloat16 Conv), while some float16 graphs run. onnx-lsuv first tries the model as it is; when
ONNX Runtime cannot build it, LSUV measures on a twin whose float16/bfloat16 tensors, types and
casts are float32, and the weights are written back in the model's own dtype.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .model_io import tensor_array

LOW_PRECISION = {TensorProto.FLOAT16, TensorProto.BFLOAT16}


def has_low_precision(model: onnx.ModelProto) -> bool:
    """Whether any initializer, Constant or graph input is float16 or bfloat16."""
    g = model.graph
    constants = (a.t for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR)
    return any(t.data_type in LOW_PRECISION for t in g.initializer) or any(
        t.data_type in LOW_PRECISION for t in constants) or any(
        i.type.tensor_type.elem_type in LOW_PRECISION for i in g.input)


def _to_float32_tensor(t: onnx.TensorProto) -> None:
    if t.data_type in LOW_PRECISION:
        arr = tensor_array(t).astype(np.float32)
        t.CopyFrom(numpy_helper.from_array(arr, t.name))


def _retype(vi: onnx.ValueInfoProto) -> None:
    tt = vi.type.tensor_type
    if vi.type.HasField("tensor_type") and tt.elem_type in LOW_PRECISION:
        tt.elem_type = TensorProto.FLOAT


def float32_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` computing in float32 wherever it used float16 or bfloat16.

    Node order and names are kept, so layers found on the model and on the twin correspond by
    node index.
    """
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    _graph_to_float32(twin.graph)
    return twin


def _graph_to_float32(g: onnx.GraphProto) -> None:
    """float16/bfloat16 tensors, types and casts of ``g`` as float32, If/Loop/Scan bodies
    included."""
    for t in g.initializer:
        _to_float32_tensor(t)
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        _retype(vi)
    for node in g.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                _to_float32_tensor(attr.t)
            elif attr.type == onnx.AttributeProto.GRAPH:
                _graph_to_float32(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for body in attr.graphs:
                    _graph_to_float32(body)
            elif node.op_type == "Cast" and attr.name == "to" and attr.i in LOW_PRECISION:
                attr.i = TensorProto.FLOAT


def float32_measuring(work: onnx.ModelProto, state, feeds: dict[str, np.ndarray],
                      selection=None, branches=None):
    """The float32 twin of a float16/bfloat16 model, its weight state (the current weights,
    factors and biases of ``state``, in float32) and the feeds (one batch, or a data.Stream)
    cast to float32.

    Returns:
        (twin model, twin WeightState, twin feeds).
    """
    from .layers import find_layers
    from .weights import WeightState

    twin = float32_twin(work)
    twin_layers = find_layers(twin, selection, branches).layers
    twin_state = WeightState(twin, twin_layers)
    for lay in twin_layers:
        twin_state.set_base(lay, state.base[lay.index].astype(np.float32))
        twin_state.scale[lay.index] = state.scale[lay.index].copy()
        if lay.index in state.recurrent:
            twin_state.recurrent[lay.index] = state.recurrent[lay.index].astype(np.float32)
        if state.bias[lay.index] is not None:
            twin_state.bias[lay.index] = state.bias[lay.index].astype(np.float32)
    twin_state.changed_bias = set(state.changed_bias)
    return twin, twin_state, float32_feeds(feeds)


def float32_feeds(feeds):
    """The batch (or a data.Stream of batches) as the float32 twin takes it: float16 and
    bfloat16 arrays cast to float32, the rest as they are."""
    low = {np.dtype(np.float16), np.dtype(onnx.helper.tensor_dtype_to_np_dtype(
        TensorProto.BFLOAT16))}

    def cast(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v.astype(np.float32) if v.dtype in low else v for k, v in batch.items()}

    return feeds.map(cast) if hasattr(feeds, "map") else cast(feeds)  # a data.Stream
