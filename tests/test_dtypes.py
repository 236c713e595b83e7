"""Stored dtypes: tensors ONNX Runtime's numpy conversion refuses (bfloat16, float8, int4),
kernels stored narrower than the layer reads them, and the metadata of rewritten tensors.
Every expectation is the test's own: its ONNX Runtime session in float64 (independent.py),
the original tensors bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lsuv import lsuv_init

import independent


def _model(nodes, inits, inputs, outputs, opset, ir_version=10) -> onnx.ModelProto:
    def infos(specs):
        return [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in specs]

    graph = helper.make_graph(nodes, "dtypes", infos(inputs), infos(outputs), inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=ir_version)
    onnx.checker.check_model(model)
    return model


def _measured(model: onnx.ModelProto, feeds: dict) -> list[float]:
    targets, _ = independent.find_targets(model)
    return independent.pooled_variances(model, feeds, targets)


# -- class 4: a kernel stored in float16, read through Cast(to float) -------------------------

def float16_store_mlp():
    """Three layers whose kernels are stored in float16 and Cast to float32 (as exporters
    write a half-precision checkpoint run in float32), float32 biases, non-zero."""
    rng = np.random.default_rng(4)
    dims = [8, 16, 8, 4]  # narrow: a rounding of the weight moves the variance more
    nodes, inits, x = [], [], "x"
    for i, (k, n) in enumerate(zip(dims, dims[1:])):
        inits += [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float16),
                                          f"W{i}"),
                  numpy_helper.from_array(rng.standard_normal(n).astype(np.float32) * 0.3,
                                          f"B{i}")]
        nodes += [helper.make_node("Cast", [f"W{i}"], [f"W{i}f"], to=TensorProto.FLOAT),
                  helper.make_node("MatMul", [x, f"W{i}f"], [f"m{i}"], name=f"fc{i}"),
                  helper.make_node("Add", [f"m{i}", f"B{i}"], [f"y{i}"]),
                  helper.make_node("Tanh", [f"y{i}"], [f"t{i}"])]
        x = f"t{i}"
    model = _model(nodes, inits, [("x", ["N", dims[0]])], [(x, ["N", dims[-1]])], opset=17,
                   ir_version=8)
    feeds = {"x": np.random.default_rng(5).standard_normal((512, dims[0])).astype(np.float32)}
    return model, feeds


@pytest.mark.parametrize("keep_bias", [False, True])
def test_a_float16_store_is_not_taken_as_exact_in_one_pass(keep_bias):
    model, feeds = float16_store_mlp()
    tol = 1e-4
    result = lsuv_init(model, feeds, provider="cpu", tol=tol, keep_bias=keep_bias)
    assert result.report.measured_in == "re-measure"
    written = result.model
    assert all(t.data_type == TensorProto.FLOAT16 for t in written.graph.initializer
               if t.name.startswith("W"))
    measured = _measured(written, feeds)
    reported = [rec.var_after for rec in result.report.layers]
    assert len(measured) == len(reported) == 3
    for got, want in zip(reported, measured):
        assert got == pytest.approx(want, rel=1e-6), (reported, measured)
    for rec, want in zip(result.report.layers, measured):
        if rec.status == "converged":
            assert abs(want - 1.0) < tol, (rec.name, want)


# -- class 6: what result.model is, save() writes: rewritten tensors keep their metadata -------

def _with_metadata(t: onnx.TensorProto) -> onnx.TensorProto:
    t.doc_string = f"{t.name}: trained on the cats of the world"
    entry = t.metadata_props.add()
    entry.key, entry.value = "origin", f"checkpoint/{t.name}"
    return t


def metadata_mlp():
    """Rewritten tensors with a doc_string and metadata_props: a small Gemm weight and its
    bias, a big (1.6 MB) Gemm weight, a Constant node's MatMul weight; an untouched big
    constant with them too."""
    rng = np.random.default_rng(9)
    d = 640

    def init(name, *shape):
        return _with_metadata(numpy_helper.from_array(
            rng.standard_normal(shape).astype(np.float32), name))

    inits = [init("W_small", d, 32), init("b_small", d), init("W_big", d, d), init("b_big", d),
             init("shift", 64, d)]
    const = _with_metadata(numpy_helper.from_array(
        rng.standard_normal((d, 16)).astype(np.float32), "W_const"))
    nodes = [helper.make_node("Gemm", ["x", "W_small", "b_small"], ["g1"], name="small",
                              transB=1),
             helper.make_node("Tanh", ["g1"], ["t1"]),
             helper.make_node("Gemm", ["t1", "W_big", "b_big"], ["g2"], name="big", transB=1),
             helper.make_node("Add", ["g2", "shift"], ["s2"]),
             helper.make_node("Tanh", ["s2"], ["t2"]),
             helper.make_node("Constant", [], ["W_const"], value=const),
             helper.make_node("MatMul", ["t2", "W_const"], ["y"], name="const")]
    model = _model(nodes, inits, [("x", [64, 32])], [("y", [64, 16])], opset=17, ir_version=8)
    return model, {"x": rng.standard_normal((64, 32)).astype(np.float32)}


def _tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    found = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            found[node.output[0]] = node.attribute[0].t
    return found


def _loaded(path) -> onnx.ModelProto:
    """onnx's load, external data resolved; a resolved tensor's data_location, which onnx sets
    to DEFAULT explicitly, cleared (the proto holds the same data either way)."""
    model = onnx.load(str(path))
    for t in _tensors(model).values():
        if t.HasField("data_location") and t.data_location == TensorProto.DEFAULT:
            t.ClearField("data_location")
    return model


def _same_protos(got: onnx.ModelProto, want: onnx.ModelProto) -> None:
    """Field by field, then whole: the models are one proto."""
    a, b = _tensors(got), _tensors(want)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name
    assert got.graph.node == want.graph.node
    assert got == want


@pytest.mark.parametrize("external", [False, True])
def test_result_model_is_what_save_writes_metadata_kept(tmp_path, external):
    import subprocess
    import sys

    model, feeds = metadata_mlp()
    path, data = tmp_path / "in.onnx", tmp_path / "x.npy"
    onnx.save(model, str(path))
    np.save(data, feeds["x"])
    result = lsuv_init(str(path), feeds, provider="cpu")
    assert {rec.name for rec in result.report.layers} == {"small", "big", "const"}
    saved = tmp_path / "saved.onnx"
    result.save(str(saved), external_data=external)
    built = result.model
    _same_protos(_loaded(saved), built)
    result.save(str(saved), external_data=external)  # and once built, the same
    _same_protos(_loaded(saved), built)
    cli_out = tmp_path / "cli.onnx"
    subprocess.run([sys.executable, "-m", "onnx_lsuv", str(path), "--data", str(data), "-o",
                    str(cli_out), "-q", "--provider", "cpu"]
                   + (["--external-data"] if external else []), check=True)
    _same_protos(_loaded(cli_out), built)
    # Every tensor keeps its metadata; the rewritten ones changed their values only.
    old, new = _tensors(model), _tensors(built)
    rewritten = {"W_small", "b_small", "W_big", "b_big", "W_const"}
    for name, t in old.items():
        assert (new[name].doc_string, new[name].metadata_props) == \
            (t.doc_string, t.metadata_props), name
        if name in rewritten:
            assert numpy_helper.to_array(new[name]).tobytes() != \
                numpy_helper.to_array(t).tobytes(), name
        else:
            assert new[name] == t, name
