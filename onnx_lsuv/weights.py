"""The target layers' weights and biases while LSUV works on them, and their write-back."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import ConstRef, GraphIndex
from .layers import Layer
from .model_io import DATA_FIELDS, tensor_nbytes

PLACEHOLDER = "onnx-lsuv-in-memory"
# Other initializers from this size on also reach sessions as OrtValues: a measuring model must
# serialise below protobuf's 2 GiB, and there is no point copying big constants into it.
LARGE_CONSTANT = 1 << 20


class WeightState:
    """Current weight (as base x scale) and bias of every target layer.

    A weight is kept as its pre-scaling array plus one accumulated factor, so repeated tries do
    not compound rounding: the written weight is ``base * scale`` computed once, in float64.
    """

    def __init__(self, model: onnx.ModelProto, layers: list[Layer]) -> None:
        self.index = GraphIndex(model.graph)
        self.layers = layers
        # The weight as each layer reads it (through its chain of layout ops, if any); the
        # stored constant of a chain that drops elements (a Slice) is kept for the write-back.
        self.base = {}
        self._stored: dict[int, np.ndarray] = {}
        for lay in layers:
            stored = self.index.const_array(lay.weight)
            if lay.chain is None:
                self.base[lay.index] = stored
            else:
                self.base[lay.index] = lay.chain.effective(stored, lay.dtype)
                if not lay.chain.covers_all:
                    self._stored[lay.index] = stored
        self.scale = {lay.index: np.ones(len(lay.blocks)) for lay in layers}
        # Recurrent weights R: orthonormal per gate, never scaled.
        self.recurrent = {lay.index: self.index.const_array(lay.recurrent) for lay in layers
                          if lay.recurrent is not None}
        self.bias = {
            lay.index: self.index.const_array(lay.bias) if lay.bias is not None else None
            for lay in layers
        }
        self.changed_bias: set[int] = set()
        # Weights handed to sessions as OrtValues; the rest (Constant nodes, initializers that
        # old exporters also list as graph inputs) are written into each measuring model.
        graph_inputs = {i.name for i in model.graph.input}
        pairs = [(lay, ref) for lay in layers for ref in _weights_of(lay)]
        as_value = [ref.constant_node is None and ref.name not in graph_inputs for _, ref in pairs]
        self._in_memory = [pair for pair, ok in zip(pairs, as_value) if ok]
        self._in_proto = [pair for pair, ok in zip(pairs, as_value) if not ok]
        # Target weights and biases change: they are supplied from this state, never cached.
        targets = {ref.name for lay in layers for ref in (lay.weight, lay.bias, lay.recurrent)
                   if ref is not None}
        self._large = {
            t.name: numpy_helper.to_array(t) for t in model.graph.initializer
            if t.name not in targets and t.name not in graph_inputs
            and tensor_nbytes(t) >= LARGE_CONSTANT
        }

    def weight(self, layer: Layer) -> np.ndarray:
        """The layer's current weight, in its own dtype."""
        s = self.scale[layer.index]
        base = self.base[layer.index]
        if np.all(s == 1.0):
            return base
        if len(s) == 1:
            return (base.astype(np.float64) * s[0]).astype(layer.dtype)
        mats = layer.layout.to_matrices(base.astype(np.float64)) * s[:, None, None]
        return layer.layout.from_matrices(mats).astype(layer.dtype)

    def set_base(self, layer: Layer, weight: np.ndarray) -> None:
        """A new weight, as the layer reads it."""
        self.base[layer.index] = np.ascontiguousarray(weight.astype(layer.dtype))
        self.scale[layer.index] = np.ones(len(layer.blocks))

    def multiply(self, layer: Layer, factor) -> None:
        """Scale the weight by ``factor``: one number, or one per block."""
        self.scale[layer.index] = self.scale[layer.index] * np.asarray(factor, np.float64)

    def zero_bias(self, layer: Layer) -> None:
        b = self.bias[layer.index]
        if b is not None and np.any(b != 0):
            self.bias[layer.index] = np.zeros_like(b)
            self.changed_bias.add(layer.index)

    def set_forget_bias(self, layer: Layer, value: float) -> None:
        """LSTM: the input bias of the forget gate (gates i, o, f, c; B is [Wb, Rb]) = value."""
        b = self.bias[layer.index]
        if b is None:
            return
        hidden = layer.layout.matrix_shape[1]
        b = b.copy()
        b[:, 2 * hidden:3 * hidden] = value
        self.bias[layer.index] = b
        self.changed_bias.add(layer.index)

    def has_nonzero_bias(self, layer: Layer) -> bool:
        b = self.bias[layer.index]
        return b is not None and bool(np.any(b != 0))

    def in_memory(self) -> dict[str, np.ndarray]:
        """Current weights stored as initializers, by name: what ``skeleton`` leaves out."""
        arrays = {ref.name: np.ascontiguousarray(self._current(lay, ref))
                  for lay, ref in self._in_memory}
        arrays.update(self._large)
        return arrays

    def _current(self, layer: Layer, ref: ConstRef) -> np.ndarray:
        """The current value of ``ref`` as stored (through the inverse of the layer's chain)."""
        if ref != layer.weight:
            return self.recurrent[layer.index]
        if layer.chain is None:
            return self.weight(layer)
        old = self._stored.get(layer.index)
        if old is None:
            old = np.zeros(layer.chain.stored_shape, layer.chain.stored_dtype)
        return layer.chain.stored(self.weight(layer), old)

    def write_constants(self, model: onnx.ModelProto) -> None:
        """Write the current weights that ``in_memory`` does not supply into ``model``."""
        index = GraphIndex(model.graph)
        for layer, ref in self._in_proto:
            _write_const(index, ref, self._current(layer, ref))

    def skeleton(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of ``model`` with the changed biases written and every target weight that is
        an initializer left as a placeholder without bytes, to be supplied at session creation
        (``in_memory``): no multi-megabyte copy and serialisation per measuring session."""
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        index = GraphIndex(copy.graph)
        for layer in self.layers:
            if layer.index in self.changed_bias and layer.bias is not None:
                _write_const(index, layer.bias, self.bias[layer.index])
        names = {ref.name for _, ref in self._in_memory} | set(self._large)
        for t in copy.graph.initializer:
            if t.name in names:
                for f in DATA_FIELDS:
                    t.ClearField(f)
                t.data_location = onnx.TensorProto.EXTERNAL
                del t.external_data[:]
                entry = t.external_data.add()
                entry.key, entry.value = "location", PLACEHOLDER
        return copy

    def changed(self) -> dict[str, np.ndarray]:
        """Every target weight and every changed bias, by tensor name, as written."""
        out = {ref.name: self._current(lay, ref) for lay in self.layers
               for ref in _weights_of(lay)}
        for lay in self.layers:
            if lay.index in self.changed_bias and lay.bias is not None:
                out[lay.bias.name] = self.bias[lay.index]
        return out

    def write(self, model: onnx.ModelProto) -> None:
        """Write the current weights and changed biases into ``model`` (same names, dtypes)."""
        index = GraphIndex(model.graph)
        for layer in self.layers:
            for ref in _weights_of(layer):
                _write_const(index, ref, self._current(layer, ref))
            if layer.index in self.changed_bias and layer.bias is not None:
                _write_const(index, layer.bias, self.bias[layer.index])


def _weights_of(layer: Layer) -> list[ConstRef]:
    """The weights LSUV sets for a layer: W, and a recurrent op's R."""
    return [ref for ref in (layer.weight, layer.recurrent) if ref is not None]


def _write_const(index: GraphIndex, ref: ConstRef, value: np.ndarray) -> None:
    proto = index.tensor_proto(ref)
    new = numpy_helper.from_array(np.ascontiguousarray(value).astype(
        onnx.helper.tensor_dtype_to_np_dtype(proto.data_type)), proto.name)
    proto.CopyFrom(new)


def unshare_biases(model: onnx.ModelProto, layers: list[Layer], zeroing: set[int]) -> list[str]:
    """Give each layer whose bias will be zeroed its own bias tensor where others read it too.

    PyTorch's exporter deduplicates equal initializers (through Identity nodes), so one bias
    tensor often serves several layers. Zeroing it is harmless when every reader zeroes it; any
    other reader would silently change, so that layer gets a private copy instead.

    Args:
        model: The model to edit (rewires the layer's bias input, appends initializers).
        layers: All target layers; their ``bias`` and ``bias_input`` are updated.
        zeroing: Indices of the layers whose biases are zeroed.

    Returns:
        One note per bias that was unshared.
    """
    index = GraphIndex(model.graph)
    graph = model.graph
    by_ref: dict[ConstRef, list[Layer]] = {}
    for layer in layers:
        if layer.bias is not None:
            by_ref.setdefault(layer.bias, []).append(layer)
    notes = []
    taken = set(index.initializers) | set(index.producer)
    for ref, owners in by_ref.items():
        users = set(index.users_of_const(ref))
        zeroed_slots = {use.bias_input for lay in owners if lay.index in zeroing
                        for use in lay.uses if use.bias_input is not None}
        if users <= zeroed_slots and not index.const_is_graph_output(ref):
            continue  # every reader zeroes it: nothing else changes
        if not np.any(index.const_array(ref)):
            continue  # already zero: zeroing changes nothing, for any reader
        for lay in owners:
            if lay.index not in zeroing:
                continue
            name = f"{lay.name}.bias"
            k = 1
            while name in taken:
                name = f"{lay.name}.bias.{k}"
                k += 1
            taken.add(name)
            tensor = numpy_helper.from_array(index.const_array(ref), name)
            graph.initializer.append(tensor)
            if model.ir_version < 4:  # initializers must be graph inputs there
                graph.input.append(onnx.helper.make_tensor_value_info(
                    name, tensor.data_type, list(tensor.dims)))
            for use in lay.uses:
                node_i, pos = use.bias_input
                graph.node[node_i].input[pos] = name
            lay.bias = ConstRef(name)
            others = sorted({index.node_name(j) for j, _ in users} - {
                index.node_name(u.bias_input[0]) for u in lay.uses})
            notes.append(f"layer {lay.name}: its bias {ref.name!r} is also read by "
                         f"{', '.join(others) or 'a graph output'} (the exporter stored equal "
                         f"tensors, often all zeros, once); zeroing it gave the layer its own "
                         f"copy {name!r}")
    return notes
