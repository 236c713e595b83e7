"""The real exporters on small models built in their frameworks (tests/exporters/export_*.py):
tf2onnx with Keras 3, jax2onnx with Flax nnx, paddle2onnx, skl2onnx. Every bias is non-zero
(std 1) and BatchNorm statistics are not the defaults, since fresh framework models hide
misplaced biases.

Each framework runs in its own interpreter, since their pins clash: the one named by
ONNX_LSUV_<FRAMEWORK>_PYTHON (KERAS, FLAX, PADDLE, SKLEARN), else this one if it imports the
framework; without either, the framework's tests are skipped. `.ci/run` builds the
interpreters (.ci/exporter-venvs) and sets the variables, so CI runs them all. Deselect them
with -m "not exporters".

The checks are the tests' own (tests/independent.py): every target the test finds is a layer
of the report, every one has unit variance after its bias (pooled over its uses and over the
iterations of a Loop), the structure is unchanged, only the targets' weights and biases
changed, and every main-graph weight is orthonormal up to scale per group.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_lsuv import lsuv_init
from onnx_lsuv.match import match_parameters

from conftest import run_export_script
from independent import (
    data_dependent,
    find_targets,
    gate_variances,
    matrices,
    orthonormal_per_gate,
    orthonormal_up_to_scale,
    pooled_variances,
    read_weights,
    weight_values,
)

TOL = 0.1

FRAMEWORKS = {  # script, the modules it needs, the models it writes
    "keras": ("export_keras.py", ("keras", "tensorflow", "tf2onnx"),
              ["conv1d", "dense3d", "depthwise", "conv2d_transpose", "lstm", "gru",
               "gru_reset_before", "mha", "keras_export"]),
    "flax": ("export_flax.py", ("flax", "jax", "jax2onnx"),
             ["cnn", "conv_transpose", "attention", "attention_hand", "lstm_unrolled",
              "lstm_scan", "gru_scan", "einsum"]),
    "paddle": ("export_paddle.py", ("paddle", "paddle2onnx"), ["cnn", "lstm"]),
    "sklearn": ("export_sklearn.py", ("sklearn", "skl2onnx"), ["mlp"]),
}

pytestmark = pytest.mark.exporters


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """framework -> the directory its export script wrote (run once, on first use)."""
    done: dict[str, str] = {}

    def get(framework: str) -> str:
        if framework not in done:
            script, modules, _ = FRAMEWORKS[framework]
            done[framework] = run_export_script(framework, modules, script,
                                                str(tmp_path_factory.mktemp(framework)), 900)
        return done[framework]

    return get


CASES = [(fw, name) for fw, (_, _, names) in FRAMEWORKS.items() for name in names]


@pytest.mark.parametrize("framework, name", CASES, ids=[f"{f}-{n}" for f, n in CASES])
def test_every_target_of_a_real_export_reaches_unit_variance(exported, framework, name):
    directory = exported(framework)
    model = onnx.load(os.path.join(directory, name + ".onnx"))
    batch = np.load(os.path.join(directory, name + ".npy"))
    feeds = {model.graph.input[0].name: batch}
    targets, recurrent = find_targets(model)
    assert targets or recurrent, "the test found nothing to check"
    before = pooled_variances(model, feeds, targets)
    result = lsuv_init(model, feeds, provider="cpu")
    rep = result.report
    # Nothing missed, nothing silent: every target the test finds is a layer.
    assert len({r.index for r in rep.layers}) == len(targets) + len(recurrent), rep.table()
    assert rep.converged, rep.table()
    after = pooled_variances(result.model, feeds, targets)
    off = [(t.outputs[0], b, a) for t, b, a in zip(targets, before, after)
           if abs(a - 1) >= TOL and not t.state]
    assert not off, (off, rep.table())
    # A weight that multiplies the previous state (a Loop body's, unrolled steps'): an LSTM
    # op's R rule, orthonormal per gate and not scaled, and reported so.
    state = [t for t in targets if t.state]
    for t, w in zip(state, read_weights(result.model, feeds, state)):
        assert orthonormal_per_gate(t.nodes[0], w), (t.weight, rep.table())
    assert len({r.index for r in rep.layers if r.message.startswith("recurrent:")}) == \
        len(state), rep.table()
    for node in recurrent:  # the paper's notion for a recurrent op: each gate's W_g x
        assert all(abs(v - 1) < TOL for v in gate_variances(result.model, feeds, node)), node
    # The structure is unchanged; only weights and biases of targets changed.
    assert [n.SerializeToString() for n in result.model.graph.node] == \
        [n.SerializeToString() for n in model.graph.node]
    assert [(t.name, list(t.dims), t.data_type) for t in result.model.graph.initializer] == \
        [(t.name, list(t.dims), t.data_type) for t in model.graph.initializer]
    old = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    changed = {t.name for t in result.model.graph.initializer
               if not np.array_equal(numpy_helper.to_array(t), old[t.name])}
    assert changed <= _feeding_targets(model, targets, recurrent), changed
    main = [t for t in targets if t.body_of is None and not t.state]
    for t, w in zip(main, weight_values(result.model, feeds, [t.weight for t in main])):
        assert orthonormal_up_to_scale(matrices(t.nodes[0], np.asarray(w))), t.weight
    # The way back: every changed tensor is found among the framework's own parameters.
    matched = match_parameters(model, result.weights,
                               os.path.join(directory, "params", name + ".npz"))
    assert matched.complete and matched.changed == len(changed), matched.summary()


def _feeding_targets(model: onnx.ModelProto, targets, recurrent) -> set[str]:
    """Initializers upstream of the targets' weight and bias inputs (and of the Loop/Scan and
    recurrent nodes that hold targets): what LSUV may change."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    wanted: list[str] = []
    loops = {t.body_of for t in targets if t.body_of}
    for node in model.graph.node:
        if node.name in loops or node.name in recurrent:
            wanted.extend(x for x in node.input if x)
        elif any(node in t.nodes for t in targets):
            wanted.extend(node.input[1:])
    for t in targets:  # separate bias Adds (after shape ops)
        for out in t.outputs:
            add = producer.get(out)
            if add is not None and add.op_type == "Add":
                wanted.extend(add.input)
    dep = data_dependent(model)
    found, stack = set(), [w for w in wanted if w not in dep]  # never along the data path
    while stack:
        name = stack.pop()
        if name in inits:
            found.add(name)
        elif name in producer:
            stack.extend(x for x in producer[name].input if x)
    return found


def test_flax_head_tied_through_embed_attend_is_left_alone_by_rule(exported):
    """nnx.Embed -> nnx.Einsum -> Linear -> nnx.Embed.attend: jax2onnx writes the Einsum layer
    and the head as Einsum nodes with constant weights, the head's a Transpose of the table
    that the embedding's Gather reads too. The Einsum layer and the Linear reach unit variance
    (measured here); the head is left alone by the tie rule (exit 0), its table bit for bit."""
    directory = exported("flax")
    model = onnx.load(os.path.join(directory, "einsum_tied.onnx"))
    batch = np.load(os.path.join(directory, "einsum_tied.npy"))
    feeds = {model.graph.input[0].name: batch}
    result = lsuv_init(model, feeds, provider="cpu")
    rep = result.report
    einsums = [n for n in model.graph.node if n.op_type == "Einsum"]
    assert len(einsums) == 2, [n.op_type for n in model.graph.node]
    layer, head = einsums
    assert [r.op for r in rep.layers] == ["Einsum", "Gemm"], rep.table()
    assert [(s["name"], s["by_rule"]) for s in rep.skipped] == [(head.name, True)], rep.skipped
    assert "Gather" in rep.skipped[0]["reason"] and not rep.not_initialised
    assert rep.converged and rep.summary()["ok"], rep.table()
    targets, _ = find_targets(model)
    kept = [t for t in targets if t.nodes[0] is not head]
    assert [t.nodes[0].op_type for t in kept] == ["Einsum", "Gemm"]
    after = pooled_variances(result.model, feeds, kept)
    assert all(abs(v - 1) < TOL for v in after), (after, rep.table())
    (w,) = weight_values(result.model, feeds, [layer.input[1]])
    assert orthonormal_up_to_scale(matrices(layer, np.asarray(w)))
    head_table = next(n for n in model.graph.node if n.output[0] == head.input[1])
    table = head_table.input[0]
    old = {t.name: t.SerializeToString() for t in model.graph.initializer}
    new = {t.name: t.SerializeToString() for t in result.model.graph.initializer}
    assert new[table] == old[table]
    assert [n.SerializeToString() for n in result.model.graph.node] == \
        [n.SerializeToString() for n in model.graph.node]
