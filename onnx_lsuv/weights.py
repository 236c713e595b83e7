"""The target layers' weights and biases while LSUV works on them, and their write-back."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import ConstRef, GraphIndex, attribute, rename_input, scope_graph, scope_index
from .layers import Layer, read_inside
from .model_io import (
    DATA_FIELDS,
    MAP_MIN,
    is_mapped,
    mark_pending,
    materialize,
    set_values,
    tensor_array,
    tensor_nbytes,
)

PLACEHOLDER = "onnx-lsuv-in-memory"
# Other initializers from this size on also reach sessions from memory: a measuring model must
# serialise below protobuf's 2 GiB, and there is no point copying big constants into it.
LARGE_CONSTANT = 1 << 20
# Ops whose weights reach sessions as initializers (OrtValues, which ONNX Runtime copies): its
# CPU provider reorders a Conv's constant filter for its blocked (NCHWc) kernels. Every other
# in-memory weight is fed as a graph input, whose buffer ONNX Runtime reads in place: no copy
# per session (a MatMul or Gemm packs its B per run either way).
INITIALIZER_OPS = frozenset({"Conv", "ConvTranspose"})
ROWS_PER_STEP = 1 << 20  # elements per step of a weight's float64 rescaling (bounded memory)


class WeightState:
    """Current weight (as base x scale) and bias of every target layer.

    A weight is kept as its pre-scaling array plus one accumulated factor, so repeated tries do
    not compound rounding: the written weight is ``base * scale`` computed once, in float64.

    Weights and biases are held as the layer reads them (through a chain of layout ops, if
    any). A stored tensor is assembled from its parts when it is supplied or written: one
    layer's whole weight, or the regions that several layers read through Slices or Splits
    (tf2onnx's GRU slices one recurrent kernel for two MatMuls, and splits one bias tensor
    for both), over the stored original where no part covers it.
    """

    def __init__(self, model: onnx.ModelProto, layers: list[Layer]) -> None:
        self.index = GraphIndex(model.graph)
        self.layers = layers
        self.base: dict[int, np.ndarray] = {}
        self.bias: dict[int, np.ndarray | None] = {}
        # stored tensor name -> its readers: (layer, "weight", "bias" or "recurrent", which of
        # the chain's stored constants it is: 0 but for a chain that joins several)
        self._parts: dict[str, list[tuple[Layer, str, int]]] = {}
        self._refs: dict[str, ConstRef] = {}
        self._original: dict[str, np.ndarray] = {}
        self._keys = _keys([ref for lay in layers
                            for ref in (lay.weight, lay.bias, lay.recurrent) if ref is not None]
                           + [r for lay in layers for c in lay.chains for r, _ in c.more])
        for lay in layers:
            self.base[lay.index] = self._read(lay, lay.weight, lay.chain, "weight")
            self.bias[lay.index] = None if lay.bias is None else self._read(
                lay, lay.bias, lay.bias_chain, "bias")
        self.scale = {lay.index: np.ones(len(lay.blocks)) for lay in layers}
        self._scaled: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # index -> (scale, weight)
        self.applied = {lay.index: np.ones(len(lay.blocks)) for lay in layers}  # folded in
        # Recurrent weights R: orthonormal per gate, never scaled.
        self.recurrent = {lay.index: self._read(lay, lay.recurrent, lay.recurrent_chain,
                                                "recurrent")
                          for lay in layers if lay.recurrent is not None}
        for name, parts in self._parts.items():  # the original is needed under partial parts
            chains = [(self._chain(lay, kind), k) for lay, kind, k in parts]
            if len(parts) > 1 or any(c is not None and not c.covers(k) for c, k in chains):
                self._original[name] = self.index.const_array(self._refs[name])
        self.changed_bias: set[int] = set()
        # Weights handed to sessions as OrtValues; the rest (Constant nodes, initializers that
        # old exporters also list as graph inputs) are written into each measuring model.
        graph_inputs = {i.name for i in model.graph.input}
        weights = [name for name, parts in self._parts.items()
                   if any(kind != "bias" for _, kind, _ in parts)]
        self._in_memory = [n for n in weights if self._refs[n].constant_node is None
                           and not self._refs[n].scope and n not in graph_inputs]
        self._in_proto = [n for n in weights if n not in self._in_memory]
        # Target weights and biases change: they are supplied from this state, never cached.
        self._large = {
            t.name: tensor_array(t) for t in model.graph.initializer
            if t.name not in self._parts and t.name not in graph_inputs
            and tensor_nbytes(t) >= LARGE_CONSTANT
        }
        conv_read = {name for i, node in enumerate(model.graph.node)
                     if node.op_type in INITIALIZER_OPS for name in self.index.reads[i]}
        conv_read |= {name for name, parts in self._parts.items()
                      if any(lay.op in INITIALIZER_OPS for lay, _, _ in parts)}
        # What sessions read as graph inputs: supplied as feeds, never copied (see above).
        self.fed = {n for n in list(self._in_memory) + list(self._large) if n not in conv_read}

    def _read(self, layer: Layer, ref: ConstRef, chain, kind: str) -> np.ndarray:
        """A part as the layer reads it (through its chain: shape and dtype), from its stored
        constant (or constants, where the chain joins several)."""
        refs = [ref] + ([r for r, _ in chain.more] if chain is not None else [])
        for k, r in enumerate(refs):
            key = self._keys[r]
            self._parts.setdefault(key, []).append((layer, kind, k))
            self._refs[key] = r
        stored = [self.index.const_array(r) for r in refs]
        return stored[0] if chain is None else chain.effective(*stored)

    @staticmethod
    def _chain(layer: Layer, kind: str):
        return {"weight": layer.chain, "bias": layer.bias_chain,
                "recurrent": layer.recurrent_chain}[kind]

    def weight(self, layer: Layer) -> np.ndarray:
        """The layer's current weight as it reads it, in its own dtype: base x scale, computed
        once per scale (the last one is kept; the one before is dropped first)."""
        s = self.scale[layer.index]
        base = self.base[layer.index]
        if np.all(s == 1.0):
            return base
        cached = self._scaled.pop(layer.index, None)
        if cached is not None and np.array_equal(cached[0], s):
            self._scaled[layer.index] = cached
            return cached[1]
        del cached
        value = self._scaled_weight(layer, base, s)
        self._scaled[layer.index] = (s.copy(), value)
        return value

    @staticmethod
    def _scaled_weight(layer: Layer, base: np.ndarray, s: np.ndarray) -> np.ndarray:
        if len(s) == 1:
            out = np.empty(base.shape, layer.dtype)
            _rescale(base.reshape(-1), out.reshape(-1), s[0], _narrower_store(layer))
            return out
        g, out, _ = layer.layout.matrix_shape
        mats = layer.layout.to_matrices(base.astype(np.float64))
        if len(s) == g * out:  # one factor per output unit (per_channel)
            mats = mats * s.reshape(g, out)[:, :, None]
        else:  # one per block: a matrix group each
            mats = mats * s[:, None, None]
        return _as_written(layer, layer.layout.from_matrices(mats))

    def set_base(self, layer: Layer, weight: np.ndarray) -> None:
        """A new weight, as the layer reads it (and as it reads it back once written)."""
        self._scaled.pop(layer.index, None)
        self.base[layer.index] = np.ascontiguousarray(_as_written(layer, weight))
        self.scale[layer.index] = np.ones(len(layer.blocks))
        self.applied[layer.index] = np.ones(len(layer.blocks))

    def total_scale(self, layer: Layer) -> np.ndarray:
        """The factor(s) applied to the layer's weight since it was set: folded and pending."""
        return _broadcast_product(self.applied[layer.index], self.scale[layer.index])

    def fold(self, layers: list[Layer] | None = None) -> None:
        """Make the current weight of each of ``layers`` (default: all) its base, with scale
        1: one array per weight, not a pre-scaling one beside a scaled one. The same values
        as ``weight`` gives; rescaled in place where the base is this state's own array.
        (Later tries then scale from the folded weight: one more float rounding each.)"""
        for lay in self.layers if layers is None else layers:
            s = self.scale[lay.index]
            if np.all(s == 1.0):
                continue
            base = self.base[lay.index]
            cached = self._scaled.pop(lay.index, None)
            if cached is not None and np.array_equal(cached[0], s):
                self.base[lay.index] = cached[1]
            elif len(s) == 1 and base.flags.writeable and not isinstance(base, np.memmap) \
                    and base.flags.c_contiguous:
                _rescale(base.reshape(-1), base.reshape(-1), s[0], _narrower_store(lay))
            else:
                del cached
                self.base[lay.index] = self._scaled_weight(lay, base, s)
            del base
            self.applied[lay.index] = _broadcast_product(self.applied[lay.index], s)
            self.scale[lay.index] = np.ones(len(lay.blocks))

    def multiply(self, layer: Layer, factor) -> None:
        """Scale the weight by ``factor``: one number, one per block, or one per output unit
        (the layer's factors then become per unit)."""
        self.scale[layer.index] = _broadcast_product(self.scale[layer.index],
                                                     np.asarray(factor, np.float64))

    @staticmethod
    def lines_up(layer: Layer, b: np.ndarray) -> bool:
        """Whether the bias array ``b`` holds one value per output unit, in the units' order:
        a separate bias Add's constant ([C], [1, C, 1, 1], heads [2, 8]: checked at
        discovery), or a Gemm's own C of (N,) or (1, N), not (M, 1) or (M, N)."""
        units = layer.layout.output_units
        separate = layer.bias_input is not None and layer.bias_input[0] != layer.node_index
        return b.size == units and (units == 1 or b.shape[-1] == units or separate)

    def unit_bias(self, layer: Layer) -> np.ndarray | None:
        """The layer's bias as the op applies it (Gemm's beta in), one value per output unit;
        zeros without a bias; None where it is not one value per unit (a Gemm C of (M, N),
        a scalar)."""
        units = layer.layout.output_units
        b = self.bias[layer.index]
        if b is None:
            return np.zeros(units)
        if not self.lines_up(layer, b):
            return None
        return (b.astype(np.float64) * layer.bias_scale).reshape(units)

    def shift_bias(self, layer: Layer, delta: np.ndarray) -> str | None:
        """Add ``delta`` (one value per output unit, as the op applies it) to the bias; None
        when done, else why it cannot be."""
        b = self.bias[layer.index]
        units = layer.layout.output_units
        if b is None:
            return "the layer has no bias"
        if layer.bias_scale == 0:
            return "its Gemm's beta is 0: the bias is not applied"
        d = np.asarray(delta, np.float64).reshape(units) / layer.bias_scale
        new = b.astype(np.float64)
        separate = layer.bias_input is not None and layer.bias_input[0] != layer.node_index
        if self.lines_up(layer, b):
            new = new + d.reshape(b.shape)
        elif b.ndim >= 1 and b.shape[-1] == units and not separate:  # Gemm C of (M, N)
            new = new + d
        elif b.size == 1 and np.all(d == d[0]):
            new = new + d[0]
        else:
            return f"its bias of shape {tuple(b.shape)} does not hold one value per output unit"
        self.bias[layer.index] = new.astype(b.dtype)
        self.changed_bias.add(layer.index)
        return None

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

    def written_exactly(self, layer: Layer) -> bool:
        """Whether the layer's weight and bias are stored in float32 or float64 and reach it
        through Casts between those only: a factor written into them then gives the layer
        what the one-pass solve computed, up to float32 rounding. A float16 or bfloat16 store
        rounds the rescaled weight again (by up to 2^-11 or 2^-8 relative), and a Cast to one
        on the way does too: the written model then measures off the solve's variance."""
        exact = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)
        refs = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
        if layer.body is not None or any(self.index.tensor_proto(ref).data_type not in exact
                                         for ref in refs):
            return False  # (a body layer's chains are nodes of its body)
        casts = [self.index.graph.node[j] for j in layer.chain_nodes]
        return all(int(attribute(node, "to", 0)) in exact for node in casts
                   if node.op_type == "Cast")

    def has_nonzero_bias(self, layer: Layer) -> bool:
        b = self.bias[layer.index]
        return b is not None and bool(np.any(b != 0))

    def _value(self, layer: Layer, kind: str) -> np.ndarray:
        if kind == "weight":
            return self.weight(layer)
        if kind == "bias":
            return self.bias[layer.index]
        return self.recurrent[layer.index]

    def stored(self, name: str) -> np.ndarray:
        """The current value of stored tensor ``name``, assembled from its parts."""
        parts = self._parts[name]
        original = self._original.get(name)
        if original is None:  # one part, reading the whole tensor
            layer, kind, k = parts[0]
            chain = self._chain(layer, kind)
            value = self._value(layer, kind)
            if chain is None:
                return value
            shape = chain.stored_shape if k == 0 else chain.more[k - 1][1]
            return chain.stored(value, np.zeros(shape, chain.stored_dtype), k)
        out = np.array(original)
        for layer, kind, k in parts:
            if kind == "bias" and layer.index not in self.changed_bias:
                continue
            chain = self._chain(layer, kind)
            value = self._value(layer, kind)
            out = value.astype(out.dtype).reshape(out.shape) if chain is None else \
                chain.stored(value, out, k)
        return out

    def in_memory(self) -> dict[str, np.ndarray]:
        """Current weights stored as initializers, by name: what ``skeleton`` leaves out."""
        arrays = {name: np.ascontiguousarray(self.stored(name)) for name in self._in_memory}
        arrays.update(self._large)
        return arrays

    def fed_weights(self) -> dict[str, np.ndarray] | None:
        """Every target weight as it is now, by name, where each one reaches sessions as a
        graph input (``fed``): one session then measures any weights it is fed, try after
        try. None where one does not (a Conv's filter, a Constant node, the CUDA provider)."""
        if self._in_proto or not set(self._in_memory) <= self.fed:
            return None
        return {name: np.ascontiguousarray(self.stored(name)) for name in self._in_memory}

    def write_constants(self, model: onnx.ModelProto, biases: bool = False) -> None:
        """Write the current weights that ``in_memory`` does not supply into ``model``, and
        with ``biases`` the changed biases (which ``skeleton`` writes as they were then)."""
        index = GraphIndex(model.graph)
        for name in self._in_proto + (self._changed_biases() if biases else []):
            _write_const(index, self._refs[name], self.stored(name))

    def _changed_biases(self) -> list[str]:
        return [name for name, parts in self._parts.items()
                if all(kind == "bias" for _, kind, _ in parts)
                and any(lay.index in self.changed_bias for lay, _, _ in parts)]

    def skeleton(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of ``model`` with the changed biases written and every target weight that is
        an initializer left as a placeholder without bytes, to be supplied at session creation
        (``in_memory``): no multi-megabyte copy and serialisation per measuring session."""
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        index = GraphIndex(copy.graph)
        for name in self._changed_biases():
            _write_const(index, self._refs[name], self.stored(name))
        names = set(self._in_memory) | set(self._large)
        kept = []
        for t in copy.graph.initializer:
            if t.name in self.fed:  # a graph input now
                copy.graph.input.append(onnx.helper.make_tensor_value_info(
                    t.name, t.data_type, list(t.dims)))
                continue
            if t.name in names:
                for f in DATA_FIELDS:
                    t.ClearField(f)
                t.data_location = onnx.TensorProto.EXTERNAL
                del t.external_data[:]
                entry = t.external_data.add()
                entry.key, entry.value = "location", PLACEHOLDER
            elif is_mapped(t):  # anything else the model maps: read in
                materialize(t)
            kept.append(t)
        if len(kept) < len(copy.graph.initializer):
            del copy.graph.initializer[:]
            copy.graph.initializer.extend(kept)
        return copy

    def changed(self) -> dict[str, np.ndarray]:
        """Every target weight and every changed bias, by tensor name, as written."""
        names = [n for n in self._parts if n in self._in_memory or n in self._in_proto]
        return {name: self.stored(name) for name in names + self._changed_biases()}

    def write(self, model: onnx.ModelProto, pending: dict[str, np.ndarray] | None = None) -> None:
        """Write the current weights and changed biases into ``model`` (same names, dtypes).

        With ``pending`` (``changed()``'s arrays), the main graph's initializers of
        ``MAP_MIN`` bytes and more are only marked as PENDING on ``pending``'s array of the
        same name (``model_io.complete_model`` writes them in), the rest written."""
        index = GraphIndex(model.graph)
        for name, value in (pending or self.changed()).items():
            ref = self._refs[name]
            proto = index.tensor_proto(ref)
            if pending is not None and ref.constant_node is None and not ref.scope \
                    and value.nbytes >= MAP_MIN \
                    and value.dtype == onnx.helper.tensor_dtype_to_np_dtype(proto.data_type):
                mark_pending(proto)
            else:
                _write_const(index, ref, value)


def _keys(refs: list[ConstRef]) -> dict[ConstRef, str]:
    """The name each stored tensor goes by (in ``changed`` and the state): its own, unless
    a tensor of another If branch has it too; then, for the branch's, "<name>@<scope>"."""
    by_name: dict[str, set[ConstRef]] = {}
    for ref in refs:
        by_name.setdefault(ref.name, set()).add(ref)
    return {ref: ref.name if len(by_name[ref.name]) == 1 else ref.scoped_name for ref in refs}


def _rescale(src: np.ndarray, dst: np.ndarray, factor: float,
             via: np.dtype | None = None) -> None:
    """dst = src * factor (flat arrays, dst may be src), in float64 a bounded part at a
    time: no float64 copy of a whole weight; rounded to ``via`` first where given (a
    narrower store, see ``_narrower_store``)."""
    for k in range(0, src.size, ROWS_PER_STEP):
        part = slice(k, k + ROWS_PER_STEP)
        value = src[part].astype(np.float64) * factor
        dst[part] = value if via is None else value.astype(via)


def _narrower_store(layer: Layer) -> np.dtype | None:
    """The dtype the layer's weight is stored in where it holds less than the layer reads (a
    float16 or bfloat16 kernel Cast to float32), else None."""
    chain = layer.chain
    if chain is None or chain.stored_dtype.itemsize >= np.dtype(layer.dtype).itemsize:
        return None
    return chain.stored_dtype


def _as_written(layer: Layer, value: np.ndarray) -> np.ndarray:
    """``value`` in the layer's dtype, as the layer reads it back once written: through a
    narrower store, rounded to it. The state then holds what the written model computes with,
    and every measurement (a try's included) sees the written weight."""
    via = _narrower_store(layer)
    if via is not None:
        value = value.astype(via)
    return value.astype(layer.dtype, copy=False)


def _broadcast_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a * b, one of them per block and the other per output unit (or both alike)."""
    if a.size < b.size:
        a = np.repeat(a, b.size // a.size)
    elif b.size < a.size:
        b = np.repeat(b, a.size // b.size)
    return a * b


def _write_const(index: GraphIndex, ref: ConstRef, value: np.ndarray) -> None:
    set_values(index.tensor_proto(ref), value)


def unshare_biases(model: onnx.ModelProto, layers: list[Layer], zeroing: set[int],
                   shifting: set[int] = frozenset()) -> list[str]:
    """Give each layer whose bias will be zeroed (or shifted) its own bias tensor where others
    read it too.

    Exporters store equal tensors once (PyTorch deduplicates equal initializers behind
    Identity nodes), so one bias tensor often serves several layers. Zeroing it is harmless
    when every reader zeroes it (through the layers' own chains of layout ops included), or
    when it is zero already; any other reader would silently change, so that layer gets a
    private copy instead: of the bias as the layer reads it, or, for a layer inside a Loop or
    Scan body, of the stored tensor, which the Loop then reads under the new name.

    Args:
        model: The model to edit (rewires the layer's bias input, appends initializers).
        layers: All target layers; their ``bias`` (and ``bias_chain``) are updated.
        zeroing: Indices of the layers whose biases are zeroed.
        shifting: Indices of the layers whose biases get a shift of their own (a target
            mean): a copy wherever anything else reads the tensor, another layer included,
            zero or not.

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
        zeroers = [lay for lay in owners if lay.index in zeroing or lay.index in shifting]
        shifted = any(lay.index in shifting for lay in zeroers)
        # with the further constants a chain joins (torch's LSTM B from b_ih and b_hh)
        refs = list(dict.fromkeys([ref] + [r for lay in zeroers if lay.bias_chain
                                          for r, _ in lay.bias_chain.more]))
        if not zeroers or (not shifted and not any(np.any(index.const_array(r))
                                                   for r in refs)):
            continue  # nothing is zeroed, or it is zero already: nothing else changes
        # Its readers where it lives: the main graph, or an If branch (whose layers' nodes
        # there are theirs; discovery left alone a layer whose branch bias others read).
        where = scope_index(index, ref.scope)
        local = bool(ref.scope)
        through = {j for lay in zeroers for j in lay.chain_nodes} if not local else \
            {j for lay in zeroers for j in lay.chain_node_set}
        readers, returned = set(), False
        for r in refs:
            found, out = where.readers_through(r.name, through)
            readers |= found
            returned |= out
        # The zeroing layers' own nodes read it legitimately: the bias Add, and the node
        # itself where one tensor packs the weight and the bias (read through Slices).
        own = {j for lay in zeroers for j in (lay.local_nodes if local else lay.own_nodes)}
        others = {(j, pos) for j, pos in readers if j not in own
                  or not local and read_inside(where, j, [r.name for r in refs], zeroers)}
        if not others and not returned and not (shifted and len(zeroers) > 1):
            continue  # every reader zeroes it (or the one layer shifting it is its only one)
        # Layers that each shift it, and nothing else reads it: the last keeps the tensor.
        copying = zeroers[:-1] if shifted and not others and not returned else zeroers
        for lay in copying:
            name = f"{lay.name}.bias"
            k = 1
            while name in taken:
                name = f"{lay.name}.bias.{k}"
                k += 1
            taken.add(name)
            value = index.const_array(ref)
            if (lay.body is None or lay.branch) and lay.bias_chain is not None:
                value = lay.bias_chain.effective(value, *(  # as the layer reads it
                    index.const_array(r) for r, _ in lay.bias_chain.more))
                lay.bias_chain = None
            tensor = numpy_helper.from_array(value, name)
            if lay.branch:  # the copy lives in the layer's branch, read by the layer's node
                branch = scope_graph(graph, lay.branch)  # (not by name: an Identity alias of
                branch.initializer.append(tensor)       # a main-graph tensor, say)
                node_i, pos = lay.bias_input
                branch.node[node_i].input[pos] = name
                lay.bias = ConstRef(name, scope=lay.branch)
            else:
                graph.initializer.append(tensor)
                if model.ir_version < 4:  # initializers must be graph inputs there
                    graph.input.append(onnx.helper.make_tensor_value_info(
                        name, tensor.data_type, list(tensor.dims)))
                if lay.body is not None:
                    rename_input(graph.node[lay.node_index], ref.name, name)
                else:
                    for use in lay.uses:
                        node_i, pos = use.bias_input
                        graph.node[node_i].input[pos] = name
                lay.bias = ConstRef(name)
            who = sorted({where.node_name(j) for j, _ in others}) + (
                ["a graph output"] if returned else [])
            who += sorted(o.name for o in zeroers if o is not lay)
            shared = [r.name for r in refs if any(
                (j, p) in others for j, p in where.readers_through(r.name, through)[0])] \
                or [ref.name]
            notes.append(f"layer {lay.name}: its bias {', '.join(map(repr, shared))} "
                         "is also read by "
                         f"{', '.join(who)} (the exporter stored equal tensors, often all "
                         f"zeros, once); {'shifting' if shifted else 'zeroing'} it gave the "
                         f"layer its own copy {name!r}")
    return notes


def add_biases(model: onnx.ModelProto, layers: list[Layer]) -> tuple[list[str], list[str]]:
    """Give each Conv, ConvTranspose and Gemm target that has no bias a zero one through its
    optional bias input (the node list is unchanged), for a target mean. Layers that cannot
    take one are named with the reason: a MatMul or Einsum (a bias would need a new Add
    node), a layer applied by several nodes or inside a Loop/Scan body, a recurrent op (its
    mean is not set), a Gemm whose beta is 0. One in an If branch gets it there.

    Returns:
        (notes on the biases added, notes on the layers left without one); the caller finds
        the layers again to see the new biases.
    """
    index = GraphIndex(model.graph)
    taken = set(index.initializers) | set(index.producer)
    added, refused = [], []
    for lay in layers:
        if lay.bias is not None or lay.is_recurrent:
            continue
        graph = scope_graph(model.graph, lay.branch)
        node = graph.node[lay.body[1] if lay.branch else lay.node_index]
        why = None
        if lay.body is not None and not lay.branch:
            why = "it is inside a Loop/Scan body"
        elif lay.more_uses:
            why = "its weight is applied by several nodes"
        elif lay.op in ("MatMul", "Einsum"):
            why = f"a {lay.op} has no bias input (one would need a new Add node)"
        elif lay.op == "Gemm" and float(attribute(node, "beta", 1.0)) == 0:
            why = "its Gemm's beta is 0"
        if why:
            refused.append(f"layer {lay.name}: no bias for the target mean: {why}; its mean "
                           "is left as it is")
            continue
        name = f"{lay.name}.bias"
        k = 1
        while name in taken:
            name, k = f"{lay.name}.bias.{k}", k + 1
        taken.add(name)
        tensor = numpy_helper.from_array(np.zeros(lay.layout.output_units, lay.dtype), name)
        graph.initializer.append(tensor)
        if model.ir_version < 4 and not lay.branch:
            model.graph.input.append(onnx.helper.make_tensor_value_info(
                name, tensor.data_type, list(tensor.dims)))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
        added.append(f"layer {lay.name}: had no bias; given {name!r} (zeros, then shifted "
                     "to the target mean) through its bias input")
    return added, refused
