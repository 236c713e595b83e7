"""The training experiments (experiments/): the ONNX-to-PyTorch port, the tables, and the quick
mode end to end (the CI smoke test). Skipped where torch is not installed."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from conftest import ROOT, make_model, rand  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "experiments"))

from onnx_lsuv import lsuv_init  # noqa: E402

import tables  # noqa: E402
from fitnets import ACTIVATIONS, EXPERIMENT_ARCHITECTURES, build  # noqa: E402
from onnx_torch import OnnxModule, max_rel_diff_vs_ort  # noqa: E402
from train import INITS, target_weights  # noqa: E402


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("arch", sorted(EXPERIMENT_ARCHITECTURES))
def test_ported_net_computes_what_onnxruntime_computes(arch, activation):
    model = lsuv_init(build(arch, activation), None, init="orthonormal").model
    module = OnnxModule(model)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = rand(8, *shape, seed=3)
    assert max_rel_diff_vs_ort(model, module, x) < 1e-5


def test_port_trains_every_onnx_weight_and_gives_them_back_bit_for_bit():
    model = lsuv_init(build("fitnet4_digits", "maxout"), None, init="xavier").model
    module = OnnxModule(model)
    weights = module.to_onnx_weights()
    assert {t.name for t in model.graph.initializer} == set(weights)
    for t in model.graph.initializer:
        assert weights[t.name].tobytes() == numpy_helper.to_array(t).tobytes()
    module(torch.from_numpy(rand(4, 1, 16, 16))).sum().backward()
    for name in target_weights(model).values():
        grad = module.parameter(name).grad
        assert grad is not None and torch.count_nonzero(grad) > 0, name


def test_port_refuses_an_op_it_does_not_know_by_name():
    model = make_model([helper.make_node("Softmax", ["x"], ["y"])], [("x", [2, 3])],
                       [("y", [2, 3])], {})
    with pytest.raises(ValueError, match="Softmax"):
        OnnxModule(model)


def _run(loss, acc, seed=0, diverged=False, **cfg):
    config = dict(arch="a", activation="relu", init="lsuv", seed=seed, lsuv_batch=128)
    config.update(cfg)
    return dict(config=config, train_loss=loss, test_acc=acc, diverged=diverged,
                weight_std={"conv1": 0.5}, train_var_worst=0.05)


def test_table3_marks_non_learning_runs_nc_and_counts_epochs_to_the_threshold():
    results = [
        _run([2.3, 1.0, 0.2], [0.3, 0.92, 0.96], seed=0),
        _run([2.3, 1.2, 0.3], [0.2, 0.85, 0.94], seed=1),
        _run([2.3, 2.3, 2.3], [0.1, 0.1, 0.1], init="xavier"),
        _run([2.3, float("nan")], [0.1, 0.1], init="msra", diverged=True),
        _run([2.3, 2.3, 2.2], [0.1, 0.1, 0.1], init="orthonormal", seed=0),
        _run([2.3, 1.0, 0.5], [0.5, 0.8, 0.88], init="orthonormal", seed=1),
    ]
    text = tables.table3(results, "a", ["relu"], INITS, threshold=0.9, lsuv_batch=128)
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in text.splitlines()[2:]}
    assert rows == {"LSUV": "95.0 (2, 3)", "Xavier": "n/c", "MSRA": "n/c",
                    "OrthoNorm": "88.0 (n/c, -)"}


def test_quick_mode_writes_every_table_plot_and_curve(tmp_path):
    """The smoke test: the whole pipeline on a small budget, and what it wrote."""
    out = tmp_path / "quick"
    subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "run.py"), "--quick",
                    "--out", str(out)], check=True, cwd=ROOT, capture_output=True, text=True)
    from run import QUICK

    data = json.loads((out / "results.json").read_text())
    runs = data["runs"]
    assert len(runs) == len(QUICK.configs())
    for r in runs:
        epochs = QUICK.budgets[r["config"]["arch"]].epochs
        assert len(r["test_acc"]) == len(r["train_loss"]) == epochs or r["diverged"]
        assert all(0.0 <= a <= 1.0 for a in r["test_acc"])
        assert r["conversion_diff"] < 1e-5
        if r["config"]["arch"] == "fitnet4_digits":
            assert list(r["weight_std"]) == [f"conv{i}" for i in range(1, 18)] + ["fc1", "fc2"]
        if r["config"]["init"] == "lsuv":
            assert r["lsuv_converged"]
            if r["config"]["lsuv_batch"] >= 16:
                # the batch's unit variance holds on all the training images, measured apart
                assert r["train_var_worst"] < 0.3, r["config"]
    text = (out / "RESULTS.md").read_text()
    for heading in ("Table 3 style", "Table 7 style", "Table 8 style", "## Checks"):
        assert heading in text
    for name in [f"curves_{arch}.png" for arch in QUICK.budgets] + ["curves_lsuv_batch.png"]:
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_experiment_nets_have_the_depth_the_study_claims():
    fitnet = build("fitnet4_digits", "relu")
    ops = [n.op_type for n in fitnet.graph.node]
    assert ops.count("Conv") == 17 and ops.count("Gemm") == 2
    mlp = build("mlp25_digits", "tanh")
    assert [n.op_type for n in mlp.graph.node].count("Gemm") == 25
    onnx.checker.check_model(mlp)
    assert np.prod([d.dim_value for d in mlp.graph.input[0].type.tensor_type.shape.dim[1:]]) == 64
