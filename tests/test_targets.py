"""The targets beyond the paper (issue 18): a target mean through the bias, targets after the
activation, per-channel scaling, and streams of batches.

Every statistic is measured here: the tensors come from the test's own ONNX Runtime session
(``output_values``), the means and variances are numpy float64, per layer or per channel on
the axis the test knows from the op.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnx_lsuv import lsuv_init
from onnx_lsuv.errors import InputError

import models
from conftest import initializers, make_model, output_values, rand
from independent import matrices

TOL = 0.1


def stats(model, feeds, name, axis=1):
    """(per-channel mean, per-channel var, pooled mean, pooled var) of tensor ``name``."""
    (y,) = output_values(model, feeds, [name])
    y = np.moveaxis(np.asarray(y, np.float64), axis, -1).reshape(-1, y.shape[axis])
    return y.mean(axis=0), y.var(axis=0), float(y.mean()), float(y.var())


def weights(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def node_list(model):
    return [(n.op_type, n.name, n.output[:]) for n in model.graph.node]


# --- item 1: a target mean through the bias -------------------------------------------------

@pytest.mark.parametrize("build,names,axes", [
    (models.conv_chain, ["y1", "y2"], [1, 1]),
    (models.conv_transpose, ["y1", "y2"], [1, 1]),  # deconv2 has no bias: it gets one
    (models.gemm_mlp, ["y1", "y2", "y3"], [1, 1, 1]),  # fc2's beta 0.5, fc3 without a bias
])
@pytest.mark.parametrize("mean", [0.5, -1.0])
def test_target_mean_is_reached_by_the_bias_and_the_variance_stays_on_target(
        build, names, axes, mean):
    model, feeds, _ = build()
    result = lsuv_init(model, feeds, provider="cpu", target_mean=mean)
    assert result.report.converged
    for name, axis in zip(names, axes):
        _, _, m, v = stats(result.model, feeds, name, axis)
        assert abs(m - mean) < TOL and abs(v - 1) < TOL, (name, m, v)
    # Same node list; a layer without a bias took one through its optional input only.
    assert node_list(result.model) == node_list(model)
    for before, after in zip(model.graph.node, result.model.graph.node):
        assert list(after.input[:len(before.input)]) == list(before.input) or \
            len(before.input) == 2 and after.input[:2] == before.input[:2]
    rows = {r.name: r for r in result.report.layers}
    assert all(abs(r.mean_after - mean) < TOL for r in rows.values())


def test_a_layer_without_a_bias_gets_one_named_after_it():
    model, feeds, _ = models.conv_transpose()
    result = lsuv_init(model, feeds, provider="cpu", target_mean=0.25)
    node = next(n for n in result.model.graph.node if n.name == "deconv2")
    assert node.input[2] == "deconv2.bias"
    bias = weights(result.model)["deconv2.bias"]
    assert bias.dtype == np.float32 and bias.shape == (3,) and np.all(bias != 0)
    assert "deconv2.bias" in result.weights
    assert any("deconv2" in n and "had no bias" in n for n in result.report.notes)


def test_a_matmul_without_a_bias_is_reported_and_keeps_its_mean():
    model, feeds, _ = models.matmul_linear()  # lin1: MatMul + Add; lin2: a bare MatMul
    result = lsuv_init(model, feeds, provider="cpu", target_mean=0.5)
    assert node_list(result.model) == node_list(model)
    assert len(result.model.graph.initializer) == len(model.graph.initializer)
    _, _, m1, v1 = stats(result.model, feeds, "y1", -1)
    assert abs(m1 - 0.5) < TOL and abs(v1 - 1) < TOL
    _, _, m2, v2 = stats(result.model, feeds, "y2", -1)
    assert abs(v2 - 1) < TOL and abs(m2 - 0.5) > TOL  # its mean is what the data makes it
    assert any("lin2" in n and "MatMul has no bias input" in n for n in result.report.notes)
    assert result.report.converged  # judged on its variance alone, as reported


def test_a_shared_bias_gets_a_copy_per_shifting_layer_and_other_readers_keep_theirs():
    model, feeds, _ = models.shared_bias(non_target_reader=True)
    shared = weights(model)["shared_b"]
    result = lsuv_init(model, feeds, provider="cpu", target_mean=0.3)
    assert np.array_equal(weights(result.model)["shared_b"], shared)  # plain_add's operand
    for name in ("y1", "y2"):
        _, _, m, v = stats(result.model, feeds, name)
        assert abs(m - 0.3) < TOL and abs(v - 1) < TOL
    assert sum("shifting it gave the layer its own copy" in n for n in result.report.notes) == 2


def test_keep_bias_adds_the_shift_to_the_kept_bias():
    model, feeds, _ = models.gemm_mlp()
    result = lsuv_init(model, feeds, provider="cpu", keep_bias=True, target_mean=0.2)
    for name in ("y1", "y2", "y3"):
        _, _, m, v = stats(result.model, feeds, name)
        assert abs(m - 0.2) < TOL and abs(v - 1) < TOL


# --- item 3: per-channel scaling ---------------------------------------------------------

def _rows_orthonormal_in_direction(mats):
    for m in np.asarray(mats, np.float64):
        unit = m / np.linalg.norm(m, axis=1, keepdims=True)
        gram = unit @ unit.T if m.shape[0] <= m.shape[1] else None
        if gram is not None and not np.allclose(gram, np.eye(len(gram)), atol=1e-4):
            return False
    return True


@pytest.mark.parametrize("build,names,axes", [
    (models.conv_chain, ["y1", "y2"], [1, 1]),
    (lambda: models.conv_chain(group=2), ["y1", "y2"], [1, 1]),
    (models.conv_transpose, ["y1", "y2"], [1, 1]),
    (models.gemm_mlp, ["y1", "y2", "y3"], [1, 1, 1]),
    (models.matmul_linear, ["y1", "y2"], [-1, -1]),
])
@pytest.mark.parametrize("mean", [None, 0.5])
def test_per_channel_every_channel_is_on_target(build, names, axes, mean):
    model, feeds, _ = build()
    result = lsuv_init(model, feeds, provider="cpu", per_channel=True, target_mean=mean)
    assert result.report.converged
    for name, axis in zip(names, axes):
        cm, cv, _, _ = stats(result.model, feeds, name, axis)
        assert np.all(np.abs(cv - 1) < TOL), (name, cv)
        bare_matmul = build is models.matmul_linear and name == "y2"  # no bias: mean as is
        if mean is not None and not bare_matmul:
            assert np.all(np.abs(cm - mean) < TOL), (name, cm)
    rows = result.report.layers
    assert all(r.channels and r.channels_constant == 0 for r in rows)
    # The rows keep their orthonormal directions; their lengths now differ.
    ws = weights(result.model)
    for node in result.model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            mats = matrices(node, ws[node.input[1]])
            assert _rows_orthonormal_in_direction(mats), node.name
            norms = np.linalg.norm(mats.reshape(-1, mats.shape[-1]), axis=1)
            assert norms.max() / norms.min() > 1.01, node.name


def test_per_channel_differs_from_one_factor_per_layer_exactly_where_the_paper_is_coarse():
    model, feeds, _ = models.conv_chain()
    plain = lsuv_init(model, feeds, provider="cpu")
    per = lsuv_init(model, feeds, provider="cpu", per_channel=True)
    _, cv_plain, _, v_plain = stats(plain.model, feeds, "y1")
    _, cv_per, _, _ = stats(per.model, feeds, "y1")
    assert abs(v_plain - 1) < TOL and np.abs(cv_plain - 1).max() > TOL  # pooled only
    assert np.abs(cv_per - 1).max() < TOL


def test_per_channel_recurrent_gate_units_each_get_unit_variance():
    from test_sequence_models import T, rnn_model

    model, inputs = rnn_model("LSTM", bidirectional=True, stacked=False)
    feeds = {"x": np.random.default_rng(5).standard_normal((T, 16, 5)).astype(np.float32)}
    result = lsuv_init(model, feeds, provider="cpu", per_channel=True, target_mean=1.0)
    assert result.report.converged
    (x,) = output_values(result.model, feeds, [inputs[0]])
    w = weights(result.model)["lstm0.W"].astype(np.float64)
    proj = np.concatenate([x.reshape(-1, 5).astype(np.float64) @ w[d].T for d in range(2)], 1)
    assert np.all(np.abs(proj.var(axis=0) - 1) < TOL)
    assert any("lstm0" in n and "recurrent op's bias" in n for n in result.report.notes)


def test_a_constant_channel_is_counted_not_judged():
    model, feeds, _ = models.conv_chain(group=2)
    x = feeds["x"].copy()
    x[:, :2] = 0.0  # group 0 of conv1 reads input channels 0 and 1: its outputs 0..3 are 0
    result = lsuv_init(model, {"x": x}, provider="cpu", per_channel=True,
                       include=["conv1"], exclude=["*"])
    (rec,) = result.report.layers
    assert rec.channels == 8 and rec.channels_constant == 4
    assert rec.status == "converged" and "4 of 8 channels constant" in rec.message
    _, cv, _, _ = stats(result.model, {"x": x}, "y1")
    assert np.all(cv[:4] == 0) and np.all(np.abs(cv[4:] - 1) < TOL)


# --- item 2: targets after the activation -----------------------------------------------

def activations_mlp(acts=("Relu", "Tanh", "LeakyRelu"), shift=0.5):
    nodes, inits, x = [], {}, "x"
    width = 24
    for i, act in enumerate(acts):
        inits[f"w{i}"] = rand(width, width if i else 12, seed=i + 1)
        inits[f"b{i}"] = rand(width, seed=i + 11)
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"y{i}"], name=f"fc{i}",
                                      transB=1))
        nodes.append(helper.make_node(act, [f"y{i}"], [f"a{i}"], name=f"act{i}"))
        x = f"a{i}"
    inits["wo"] = rand(4, width, seed=99)
    nodes.append(helper.make_node("Gemm", [x, "wo"], ["out"], name="head", transB=1))
    model = make_model(nodes, [("x", ["N", 12])], [("out", None)], inits)
    return model, {"x": rand(256, 12, seed=7) + shift}


@pytest.mark.parametrize("acts,target,mean", [
    (("Relu", "LeakyRelu", "Relu"), 1.0, None),  # no shift: pre-activation not centred
    (("Relu", "Tanh", "LeakyRelu"), 0.25, 0.3),
    (("Sigmoid", "Sigmoid"), 0.02, 0.5),
    (("Tanh", "Sigmoid"), 0.04, 0.4),
])
@pytest.mark.parametrize("per_channel", [False, True])
def test_after_activation_the_activation_output_is_on_target(acts, target, mean, per_channel):
    model, feeds = activations_mlp(acts)
    tol = 0.1 * target
    mean_tol = tol / np.sqrt(target)  # the variance's tolerance in units of the output
    result = lsuv_init(model, feeds, provider="cpu", after_activation=True, target_var=target,
                       tol=tol, target_mean=mean, per_channel=per_channel, max_iter=20)
    assert result.report.converged, result.report.table()
    rows = {r.name: r for r in result.report.layers}
    for i in range(len(acts)):
        cm, cv, m, v = stats(result.model, feeds, f"a{i}")
        if per_channel:  # a channel a Relu never opens is counted, not scaled
            live = cv > 0
            assert rows[f"fc{i}"].channels_constant == int((~live).sum())
            assert np.all(np.abs(cv[live] - target) < tol), (i, cv)
            cm = cm[live]
        else:
            assert abs(v - target) < tol, (i, v)
        if mean is not None:
            assert (np.all(np.abs(cm - mean) < mean_tol) if per_channel
                    else abs(m - mean) < mean_tol)
    assert [rows[f"fc{i}"].point for i in range(len(acts))] == list(acts)
    assert rows["head"].point == "output"  # no activation after it: reported, at its output
    assert any("head" in n and "not after an activation" in n for n in result.report.notes)
    _, cv_head, _, v_head = stats(result.model, feeds, "out")
    assert np.all(np.abs(cv_head - target) < tol) if per_channel else abs(v_head - target) < tol


def test_after_a_relu_without_bias_the_first_step_is_exact():
    model, feeds = activations_mlp(("Relu", "Relu"))
    result = lsuv_init(model, feeds, provider="cpu", after_activation=True, tol=0.01)
    assert [r.tries for r in result.report.layers] == [1, 1, 1]


def test_maxout_and_a_missing_activation_are_handled():
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["y1"], name="piece1", transB=1),
        helper.make_node("Gemm", ["x", "w2", "b2"], ["y2"], name="piece2", transB=1),
        helper.make_node("Max", ["y1", "y2"], ["m"], name="maxout"),
        helper.make_node("Gemm", ["m", "w3"], ["y3"], name="fc", transB=1),
        helper.make_node("Softmax", ["y3"], ["p"], name="softmax"),
    ]
    inits = {"w1": rand(16, 8, seed=1), "b1": rand(16, seed=2), "w2": rand(16, 8, seed=3),
             "b2": rand(16, seed=4), "w3": rand(5, 16, seed=5)}
    model = make_model(nodes, [("x", ["N", 8])], [("p", None)], inits)
    feeds = {"x": rand(128, 8, seed=6)}
    result = lsuv_init(model, feeds, provider="cpu", after_activation=True)
    assert result.report.converged
    rows = {r.name: r for r in result.report.layers}
    assert rows["piece1"].point == rows["piece2"].point == "Max"
    assert rows["fc"].point == "output"
    assert any("fc" in n and "Softmax, not an activation" in n for n in result.report.notes)
    _, _, _, v = stats(result.model, feeds, "m")
    assert abs(v - 1) < TOL


# --- item 4: streams of batches -----------------------------------------------------------

def _batches(feeds, k=8):
    return [{n: a[i::k] for n, a in feeds.items()} for i in range(k)]


@pytest.mark.parametrize("kw", [{}, {"per_channel": True, "target_mean": 0.5},
                                {"after_activation": True, "target_mean": 0.5}])
def test_a_stream_of_8_batches_gives_the_factors_of_the_batches_concatenated(kw):
    model, feeds, _ = models.residual_block()
    feeds = {"x": rand(128, 3, 8, 8, seed=3)}
    parts = _batches(feeds)
    whole = {"x": np.concatenate([p["x"] for p in parts])}
    ref = lsuv_init(model, whole, provider="cpu", strategy="sequential", **kw)
    streamed = lsuv_init(model, (p for p in parts), provider="cpu", **kw)  # a generator
    assert streamed.report.converged and ref.report.converged
    assert streamed.weights.keys() == ref.weights.keys()
    for k, v in ref.weights.items():
        np.testing.assert_allclose(streamed.weights[k], v, rtol=1e-5,
                                   atol=1e-6 * np.abs(v).max(), err_msg=k)
    assert any("stream of batches" in n for n in streamed.report.notes)
    if not kw:  # the default one-pass solve on the concatenated batch: to its float32 rounding
        fast = lsuv_init(model, whole, provider="cpu")
        for k, v in fast.weights.items():
            np.testing.assert_allclose(streamed.weights[k], v, rtol=1e-4,
                                       atol=1e-5 * np.abs(v).max(), err_msg=k)


class Loader:
    """A DataLoader-like re-iterable: yields (inputs, labels) tuples, a new iterator per pass."""

    def __init__(self, parts, shuffle=False):
        self.parts, self.shuffle, self.passes = parts, shuffle, 0

    def __iter__(self):
        self.passes += 1
        order = list(range(len(self.parts)))
        if self.shuffle:
            np.random.default_rng(self.passes).shuffle(order)
        for i in order:
            yield self.parts[i]["x"], np.zeros(len(self.parts[i]["x"]))


def test_a_reiterable_loader_is_read_once_per_pass_and_a_shuffling_one_refused():
    model, feeds, _ = models.conv_chain()
    feeds = {"x": rand(64, 4, 6, 6, seed=1)}
    parts = _batches(feeds)
    loader = Loader(parts)
    result = lsuv_init(model, loader, provider="cpu", per_channel=True)
    assert result.report.converged and loader.passes >= 3
    ref = lsuv_init(model, {"x": np.concatenate([p["x"] for p in parts])}, provider="cpu",
                    per_channel=True)
    for k, v in ref.weights.items():
        np.testing.assert_allclose(result.weights[k], v, rtol=1e-5, atol=1e-6 * abs(v).max())
    with pytest.raises(InputError, match="other batches when read again"):
        lsuv_init(model, Loader(parts, shuffle=True), provider="cpu")


def test_a_torch_dataloader_streams():
    torch = pytest.importorskip("torch")
    model, feeds, _ = models.gemm_mlp()
    x = torch.from_numpy(rand(96, 20, seed=4))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(96)),
                                         batch_size=12)
    result = lsuv_init(model, loader, provider="cpu")
    assert result.report.converged
    for name in ("y1", "y2", "y3"):
        _, _, _, v = stats(result.model, {"x": x.numpy()}, name)
        assert abs(v - 1) < TOL


def test_a_generator_is_spooled_to_a_temporary_directory_that_is_removed(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model, feeds, _ = models.conv_chain()
    result = lsuv_init(model, iter(_batches(feeds, 4)), provider="cpu")
    assert result.report.converged
    assert os.listdir(tmp_path) == []
    with pytest.raises(InputError, match="yielded no batch"):
        lsuv_init(model, iter([]), provider="cpu")
    assert os.listdir(tmp_path) == []
    bad = iter([feeds, {"x": feeds["x"][:, :2]}])
    with pytest.raises(InputError, match="input 'x'"):
        lsuv_init(model, bad, provider="cpu")
    assert os.listdir(tmp_path) == []


def test_check_variances_on_a_stream_and_with_the_targets():
    from onnx_lsuv import check_variances

    model, feeds, _ = models.conv_chain()
    parts = _batches(feeds, 4)
    done = lsuv_init(model, feeds, provider="cpu", per_channel=True, target_mean=0.5)
    assert check_variances(done.model, iter(parts), provider="cpu", per_channel=True,
                           target_mean=0.5).converged
    off = check_variances(done.model, iter(parts), provider="cpu", target_mean=-0.5)
    assert not off.converged and all(r.status == "off_target" for r in off.layers)
    plain = lsuv_init(model, feeds, provider="cpu")
    assert not check_variances(plain.model, feeds, provider="cpu", per_channel=True).converged


# --- options, the untouched rest ----------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    ({"target_mean": float("nan")}, "target_mean must be a finite number"),
    ({"target_mean": "1"}, "target_mean must be a finite number"),
    ({"per_channel": 1}, "per_channel must be True or False"),
    ({"strategy": "naive", "after_activation": True}, "strategy 'naive'"),
])
def test_bad_options_are_refused(kw, match):
    model, feeds, _ = models.conv_chain()
    with pytest.raises(InputError, match=match):
        lsuv_init(model, feeds, **kw)


def test_naive_refuses_a_stream():
    model, feeds, _ = models.conv_chain()
    with pytest.raises(InputError, match="strategy 'naive' measures one batch"):
        lsuv_init(model, iter(_batches(feeds, 2)), strategy="naive")


def test_the_defaults_are_the_papers_and_the_other_tensors_are_untouched():
    model, feeds, _ = models.residual_block()
    before = initializers(model)
    for kw in ({"per_channel": True}, {"target_mean": 0.1}, {"after_activation": True}):
        result = lsuv_init(model, feeds, provider="cpu", seed=3, **kw)
        again = lsuv_init(model, feeds, provider="cpu", seed=3, **kw)
        assert result.model.SerializeToString() == again.model.SerializeToString()
        after = initializers(result.model)
        changed = {k for k in before if after[k] != before[k]}
        assert changed <= {"w0", "b0", "w1", "b1", "w2", "b2", "wf", "bf"}
    assert initializers(model) == before
    assert onnx.helper.printable_graph(model.graph)  # the input model is intact


# --- low precision, the command line ----------------------------------------------------

def test_a_bfloat16_model_measured_in_float32_gets_its_shifted_biases_in_bfloat16():
    from onnx import TensorProto
    from test_precision import cast_model

    model32, feeds, names = models.gemm_mlp()
    model = cast_model(model32, TensorProto.BFLOAT16)
    result = lsuv_init(model, feeds, provider="cpu", target_mean=0.5, per_channel=True)
    assert any("float32" in n for n in result.report.notes)  # measured on the twin
    assert all(t.data_type == TensorProto.BFLOAT16 for t in result.model.graph.initializer)
    back = cast_model(result.model, TensorProto.FLOAT)
    bf16 = onnx.helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)
    rounded = {k: v.astype(bf16).astype(np.float32) for k, v in feeds.items()}
    for name in names:  # bfloat16 keeps 8 bits: the targets hold to its rounding
        cm, cv, _, _ = stats(back, rounded, name)
        assert np.all(np.abs(cm - 0.5) < 0.15) and np.all(np.abs(cv - 1) < 0.15), name


def test_the_command_line_options_and_a_directory_stream(tmp_path):
    from test_cli_features import invoke

    model, feeds, names = models.conv_chain()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    (tmp_path / "batches").mkdir()
    for i, part in enumerate(_batches(feeds, 4)):
        np.save(tmp_path / "batches" / f"{i}.npy", part["x"])
    out = tmp_path / "out.onnx"
    res = invoke(path, "-d", tmp_path / "batches", "-o", out, "--target-mean", "0.5",
                 "--per-channel", "--after-activation", "--report", tmp_path / "r.json",
                 "--provider", "cpu")
    assert res.exit_code == 0, res.output
    assert "mean after" in res.output and "not after an activation" in res.output
    written = onnx.load(out)
    cm, cv, _, _ = stats(written, feeds, "r1")  # conv1's Relu
    assert np.all(np.abs(cm - 0.5) < TOL) and np.all(np.abs(cv - 1) < TOL)
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["options"]["target_mean"] == 0.5 and report["options"]["per_channel"]
    assert [r["point"] for r in report["layers"]] == ["Relu", "output"]
    assert all(r["channels"] == 8 for r in report["layers"])
    # --check with the same targets passes; with another mean it fails with exit 3.
    ok = invoke(out, "-d", tmp_path / "batches", "--check", "--target-mean", "0.5",
                "--per-channel", "--after-activation", "--provider", "cpu")
    assert ok.exit_code == 0, ok.output
    off = invoke(out, "-d", tmp_path / "batches", "--check", "--target-mean", "2",
                 "--provider", "cpu")
    from onnx_lsuv.errors import EXIT_CHECK_FAILED

    assert off.exit_code == EXIT_CHECK_FAILED, off.output
    bad = invoke(path, "-d", tmp_path / "batches", "-o", tmp_path / "x.onnx",
                 "--strategy", "naive", "--per-channel")
    assert bad.exit_code == 2 and "--strategy naive" in bad.output
    helptext = invoke("--help").output
    for flag in ("--target-mean", "--after-activation", "--per-channel", "sequential"):
        assert flag in helptext


# --- regressions found in review ---------------------------------------------------------

def _maxout_with_a_residual():
    """Max(g1(x), g2(x)) + g2(x): g1 is read at the Max, g2 at its own output, and solving g2
    after g1 moves the Max that g1 was judged on."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["y1"], name="g1"),
             helper.make_node("Gemm", ["x", "w2"], ["y2"], name="g2"),
             helper.make_node("Max", ["y1", "y2"], ["mx"], name="maxout"),
             helper.make_node("Add", ["mx", "y2"], ["y"], name="residual")]
    inits = {"w1": rng.standard_normal((16, 16)).astype(np.float32),
             "w2": (rng.standard_normal((16, 16)) * 0.2).astype(np.float32)}
    model = make_model(nodes, [("x", ["N", 16])], [("y", None)], inits)
    return model, {"x": (rng.standard_normal((256, 16)) * 2 + 1).astype(np.float32)}


@pytest.mark.parametrize("kw", [{}, {"target_mean": 0.5}, {"per_channel": True}])
def test_a_layer_moved_by_a_later_one_is_measured_again_and_never_reported_on_target_falsely(kw):
    model, feeds = _maxout_with_a_residual()
    result = lsuv_init(model, feeds, provider="cpu", init="rescale", after_activation=True,
                       **kw)
    cm, cv, m, v = stats(result.model, feeds, "mx")
    rec = next(r for r in result.report.layers if r.name == "g1")
    on = (np.all(np.abs(cv - 1) < TOL) if kw.get("per_channel") else abs(v - 1) < TOL) and (
        "target_mean" not in kw or abs(m - 0.5) < TOL)
    assert (rec.status == "converged") == on, (rec, v, m)


def test_check_mode_skips_the_mean_of_a_bias_that_is_not_per_unit_as_the_run_did():
    from onnx_lsuv import check_variances

    model, feeds, _ = models.full_matrix_bias()
    done = lsuv_init(model, feeds, provider="cpu", keep_bias=True, target_mean=0.5)
    skipped = [n for n in done.report.notes if "does not hold one value per output unit" in n]
    assert skipped
    assert check_variances(done.model, feeds, provider="cpu",
                           target_mean=0.5).converged == done.report.converged


def test_a_gemm_with_beta_0_gets_no_mean_and_says_so():
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="g", transB=1, beta=0.0)]
    model = make_model(nodes, [("x", ["N", 8])], [("y", None)],
                       {"w": rand(6, 8, seed=1), "c": rand(6, seed=2)})
    feeds = {"x": rand(64, 8, seed=3) + 1}
    result = lsuv_init(model, feeds, provider="cpu", target_mean=0.5)
    assert result.report.converged and result.report.layers[0].tries <= 1
    assert any("beta is 0" in n for n in result.report.notes)


def test_streams_of_bfloat16_batches_and_bfloat16_torch_tensors():
    from onnx import TensorProto
    from test_precision import cast_model

    model32, feeds, _ = models.gemm_mlp()
    model = cast_model(model32, TensorProto.BFLOAT16)
    bf16 = onnx.helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)
    parts = _batches(feeds, 4)
    ref = lsuv_init(model, parts, provider="cpu", strategy="sequential")  # pooled
    gen = lsuv_init(model, ({"x": p["x"].astype(bf16)} for p in parts), provider="cpu")
    for k, v in ref.weights.items():
        np.testing.assert_array_equal(gen.weights[k], v)
    torch = pytest.importorskip("torch")
    tensors = [torch.from_numpy(p["x"]).to(torch.bfloat16) for p in parts]
    assert lsuv_init(model, iter(tensors), provider="cpu").report.converged


def test_a_stream_warns_once_about_a_key_that_is_not_an_input(caplog):
    model, feeds, _ = models.conv_chain()
    parts = [{"x": p["x"], "labels": np.zeros(len(p["x"]))} for p in _batches(feeds, 4)]
    lsuv_init(model, Loader([{"x": p["x"]} for p in parts]), provider="cpu")  # no labels
    with caplog.at_level("WARNING", logger="onnx_lsuv"):
        lsuv_init(model, iter(parts), provider="cpu")
    assert sum("'labels' is not an input" in r.message for r in caplog.records) == 1


def test_a_bias_every_reader_shifts_is_kept_by_one_and_copied_for_the_others():
    nodes = [helper.make_node("Gemm", ["x", "w1", "b"], ["y1"], name="fc1", transB=1),
             helper.make_node("Relu", ["y1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "w2", "b"], ["y2"], name="fc2", transB=1)]
    model = make_model(nodes, [("x", ["N", 10])], [("y2", None)],
                       {"w1": rand(16, 10, seed=1), "w2": rand(16, 16, seed=2),
                        "b": rand(16, seed=3)})
    feeds = {"x": rand(64, 10, seed=4)}
    result = lsuv_init(model, feeds, provider="cpu", target_mean=0.3)
    read = {x for n in result.model.graph.node for x in n.input}
    assert all(t.name in read for t in result.model.graph.initializer)  # none left unused
    for name in ("y1", "y2"):
        _, _, m, v = stats(result.model, feeds, name)
        assert abs(m - 0.3) < TOL and abs(v - 1) < TOL


@pytest.mark.parametrize("per_channel", [False, True])
def test_after_a_batchnorm_and_its_relu_the_mean_and_variance_are_on_target(per_channel):
    c = 8
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["y", "s", "bb", "m", "v"], ["t"],
                              name="bn"),
             helper.make_node("Relu", ["t"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["out"], name="conv2", kernel_shape=[1, 1])]
    inits = {"w": rand(c, 3, 3, 3, seed=1), "s": np.linspace(0.5, 2.0, c).astype(np.float32),
             "bb": np.linspace(-1, 1, c).astype(np.float32),
             "m": np.linspace(-0.5, 0.5, c).astype(np.float32),
             "v": np.linspace(0.5, 3.0, c).astype(np.float32), "w2": rand(4, c, 1, 1, seed=2)}
    model = make_model(nodes, [("x", ["N", 3, 8, 8])], [("out", None)], inits)
    feeds = {"x": rand(64, 3, 8, 8, seed=5)}
    result = lsuv_init(model, feeds, provider="cpu", after_activation=True, target_mean=0.5,
                       per_channel=per_channel)
    assert result.report.converged, result.report.table()
    assert result.report.layers[0].point == "Relu"
    cm, cv, m, v = stats(result.model, feeds, "r")
    if per_channel:
        assert np.all(np.abs(cm - 0.5) < TOL) and np.all(np.abs(cv - 1) < TOL)
    else:
        assert abs(m - 0.5) < TOL and abs(v - 1) < TOL
