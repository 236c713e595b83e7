"""Stored dtypes: tensors ONNX Runtime's numpy conversion refuses (bfloat16, float8, int4),
kernels stored narrower than the layer reads them, and the metadata of rewritten tensors.
Every expectation is the test's own: its ONNX Runtime session in float64 (independent.py),
the original tensors bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnx_lsuv import lsuv_init
from onnx_lsuv_cli.main import lsuv_command

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


# -- class 3: bfloat16, float8 and int4 tensors, which ORT's numpy conversion refuses ----------

BF16 = helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)
LARGE = 1 << 20  # bytes: weights.LARGE_CONSTANT, from which constants reach sessions in memory


def bf16_store_convnet(bf16_io: bool = False):
    """A bfloat16 checkpoint run in float32: a small Conv kernel (an initializer of the
    session) and a 1 MiB MatMul weight (fed), both stored in bfloat16 and Cast to float;
    float32 biases. With ``bf16_io``, the input and the output are bfloat16 too, Cast on
    entry and on exit: ONNX Runtime runs it as it is, a probe that fetched the output as
    numpy would not."""
    rng = np.random.default_rng(7)
    kc = rng.standard_normal((32, 4, 3, 3)).astype(BF16)
    w = rng.standard_normal((32 * 8 * 8, 256)).astype(BF16)  # 2048 x 256 x 2 bytes: 1 MiB
    assert w.nbytes >= LARGE
    inits = [numpy_helper.from_array(kc, "Kc"), numpy_helper.from_array(w, "W"),
             numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "bc"),
             numpy_helper.from_array(rng.standard_normal(256).astype(np.float32), "bw"),
             numpy_helper.from_array(np.array([-1, 32 * 8 * 8], np.int64), "flat")]
    nodes = [helper.make_node("Cast", ["Kc"], ["Kc_f"], to=TensorProto.FLOAT),
             helper.make_node("Conv", ["xf", "Kc_f", "bc"], ["c"], name="conv",
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "flat"], ["f"]),
             helper.make_node("Cast", ["W"], ["W_f"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["f", "W_f"], ["m"], name="fc"),
             helper.make_node("Add", ["m", "bw"], ["yf"])]
    x = rng.standard_normal((64, 4, 8, 8)).astype(np.float32)
    if bf16_io:
        nodes.insert(0, helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT))
        nodes.append(helper.make_node("Cast", ["yf"], ["y"], to=TensorProto.BFLOAT16))
        x = x.astype(BF16)
    else:
        nodes.insert(0, helper.make_node("Identity", ["x"], ["xf"]))
        nodes.append(helper.make_node("Identity", ["yf"], ["y"]))
    model = _model(nodes, inits, [("x", ["N", 4, 8, 8])], [("y", ["N", 256])], opset=17,
                   ir_version=8)
    if bf16_io:
        for vi in (model.graph.input[0], model.graph.output[0]):
            vi.type.tensor_type.elem_type = TensorProto.BFLOAT16
        onnx.checker.check_model(model)
    return model, {"x": x}


def dequantized_table(elem: int):
    """A 1 MiB table of ``elem`` (float8 e4m3fn, int4) behind DequantizeLinear, feeding a
    MatMul (a quantised weight: not a target), then a Gemm and a MatMul with float32
    weights and non-zero biases, the targets."""
    rng = np.random.default_rng(8)
    d = 1024
    np_dtype = helper.tensor_dtype_to_np_dtype(elem)
    if elem == TensorProto.INT4:  # two to a byte: 1024 x 2048 of them make 1 MiB
        q, opset = rng.integers(-7, 8, (d, 2 * d)).astype(np_dtype), 21
    else:
        q, opset = (rng.standard_normal((d, d)) * 4).astype(np_dtype), 19
    assert len(numpy_helper.from_array(q).raw_data) >= LARGE
    inits = [numpy_helper.from_array(q, "Q"),
             numpy_helper.from_array(np.array(0.03, np.float32), "Q_scale"),
             numpy_helper.from_array(rng.standard_normal((64, q.shape[1])).astype(np.float32),
                                     "W1"),
             numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b2")]
    nodes = [helper.make_node("DequantizeLinear", ["Q", "Q_scale"], ["Q_f"]),
             helper.make_node("MatMul", ["x", "Q_f"], ["h"], name="quantised"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W1", "b1"], ["g"], name="gemm", transB=1),
             helper.make_node("Tanh", ["g"], ["t"]),
             helper.make_node("MatMul", ["t", "W2"], ["m"], name="head"),
             helper.make_node("Add", ["m", "b2"], ["y"])]
    model = _model(nodes, inits, [("x", ["N", d])], [("y", ["N", 16])], opset=opset)
    return model, {"x": rng.standard_normal((64, d)).astype(np.float32)}


CASES = {"bf16": bf16_store_convnet, "bf16_io": lambda: bf16_store_convnet(True),
         "float8": lambda: dequantized_table(TensorProto.FLOAT8E4M3FN),
         "int4": lambda: dequantized_table(TensorProto.INT4)}
TARGETS = {"bf16": ["conv", "fc"], "bf16_io": ["conv", "fc"], "float8": ["gemm", "head"],
           "int4": ["gemm", "head"]}


def _check_written(model, written, feeds, report, targets):
    """The report's variances are the test's own measurement of ``written``; every target
    converged, its weight changed in its own dtype; every other tensor bit for bit."""
    assert [rec.name for rec in report.layers] == targets
    found, _ = independent.find_targets(written)
    ort_feeds = {k: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
        v, helper.np_dtype_to_tensor_dtype(v.dtype)) for k, v in feeds.items()}
    measured = dict(zip([t.nodes[0].name for t in found],
                        independent.pooled_variances(written, ort_feeds, found)))
    for rec in report.layers:
        assert rec.status == "converged", (rec.name, rec.message)
        assert rec.var_after == pytest.approx(measured[rec.name], rel=1e-5)
        assert abs(measured[rec.name] - 1.0) < 0.1
    old = {t.name: t for t in model.graph.initializer}
    new = {t.name: t for t in written.graph.initializer}
    assert new.keys() == old.keys()
    weights = {rec.weight for rec in report.layers}
    biases = {rec.bias for rec in report.layers}
    for name, t in old.items():
        assert new[name].data_type == t.data_type and new[name].dims == t.dims
        if name in weights:
            assert numpy_helper.to_array(new[name]).tobytes() != \
                numpy_helper.to_array(t).tobytes()
        elif name not in biases:
            assert new[name].SerializeToString() == t.SerializeToString(), name


@pytest.mark.parametrize("case", list(CASES))
def test_tensors_numpy_cannot_hand_to_onnxruntime_go_as_their_onnx_type(case):
    model, feeds = CASES[case]()
    result = lsuv_init(model, feeds, provider="cpu")
    assert not any("float32" in note for note in result.report.notes)  # run as it is
    _check_written(model, result.model, feeds, result.report, TARGETS[case])


@pytest.mark.parametrize("case,external", [("bf16", False), ("float8", False), ("int4", False),
                                           ("int4", True)])
def test_the_cli_runs_models_with_such_tensors(tmp_path, case, external):
    import json
    import subprocess
    import sys

    model, feeds = CASES[case]()
    path, data = tmp_path / "in.onnx", tmp_path / "x.npy"
    out, rep = tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(model, str(path))
    np.save(data, feeds["x"])
    proc = subprocess.run([sys.executable, "-m", "onnx_lsuv", str(path), "--data", str(data),
                           "-o", str(out), "--report", str(rep), "-q", "--provider", "cpu"]
                          + (["--external-data"] if external else []),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(rep.read_text())
    assert [layer["name"] for layer in report["layers"]] == TARGETS[case]
    assert report["converged"]
    written = onnx.load(str(out))
    found, _ = independent.find_targets(written)
    measured = dict(zip([t.nodes[0].name for t in found],
                        independent.pooled_variances(written, feeds, found)))
    for layer in report["layers"]:
        assert layer["var_after"] == pytest.approx(measured[layer["name"]], rel=1e-5)
    old = {t.name: t for t in model.graph.initializer}
    new = {t.name: t for t in written.graph.initializer}
    assert new.keys() == old.keys()
    for name in ("Q", "Q_scale") if case != "bf16" else ("flat",):  # (loaded: raw_data)
        assert (new[name].data_type, new[name].dims, new[name].raw_data) == \
            (old[name].data_type, old[name].dims, old[name].raw_data), name


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


def test_save_weights_widens_bfloat16_to_float32(tmp_path):
    """The .npy format has no bfloat16: --save-weights writes the new bfloat16 weights as
    float32 (exactly their values), not as raw void bytes no framework reads back."""
    import ml_dtypes

    model, feeds = bf16_store_convnet()
    path, data, npz = tmp_path / "in.onnx", tmp_path / "x.npy", tmp_path / "w.npz"
    onnx.save(model, str(path))
    np.save(data, feeds["x"])
    res = CliRunner().invoke(lsuv_command, [str(path), "-d", str(data), "-o",
                                            str(tmp_path / "o.onnx"), "--save-weights", str(npz)])
    assert res.exit_code == 0, res.output
    written = {t.name: t for t in onnx.load(str(tmp_path / "o.onnx")).graph.initializer}
    saved = np.load(npz)
    bf16 = [n for n in saved.files if written[n].data_type == TensorProto.BFLOAT16]
    assert bf16, saved.files
    for name in bf16:
        assert saved[name].dtype == np.float32
        want = numpy_helper.to_array(written[name]).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(saved[name], want.astype(np.float32))

