"""The training experiments (experiments/): the ONNX-to-PyTorch port, the plan, the tables, and
the quick mode end to end (the CI smoke test). Skipped where torch is not installed."""

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

import result_tables as tables  # noqa: E402
from fitnets import ACTIVATIONS, EXPERIMENT_ARCHITECTURES, build  # noqa: E402
from onnx_torch import OnnxModule, max_rel_diff_vs_ort  # noqa: E402
from run import FULL, QUICK, _plan_dict, _plan_from_dict, analytic_gains  # noqa: E402
from training import INITS, arch_data, fan_ins, target_weights  # noqa: E402


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("arch", sorted(EXPERIMENT_ARCHITECTURES))
def test_ported_net_computes_what_onnxruntime_computes(arch, activation):
    # LSUV keeps every layer's signal at unit variance, so an error anywhere in the port
    # reaches the output (a deep sigmoid net on a default init would hide it).
    x = arch_data(arch)[0][:48]
    model = lsuv_init(build(arch, activation), x, provider="cpu").model
    # float32 rounding through 19 layers differs with torch's thread count and summation
    # order: up to 6e-5 was seen when the whole suite runs (3.9e-6 alone); a wrong op is O(1).
    assert max_rel_diff_vs_ort(model, OnnxModule(model), x) < 2e-4


def test_port_matches_onnxruntime_on_strided_pools_gemm_options_and_uneven_split():
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         strides=[2, 1], group=2),
        helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[3, 2], strides=[2, 1],
                         pads=[1, 0, 1, 0]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["w2", "f", "b2"], ["g"], alpha=0.5, beta=2.0, transA=1,
                         transB=1),
        helper.make_node("Split", ["g"], ["s0", "s1"], axis=1, num_outputs=2),  # 3 -> 2 + 1
        helper.make_node("Max", ["s0", "s1"], ["y"]),
    ]
    model = make_model(nodes, [("x", [3, 4, 6, 5])], [("y", None)], {
        "w": rand(6, 2, 3, 3, seed=1), "b": rand(6, seed=2), "w2": rand(48, 5, seed=3),
        "b2": rand(5, 3, seed=4)}, opset=18)
    assert max_rel_diff_vs_ort(model, OnnxModule(model), rand(3, 4, 6, 5, seed=5)) < 1e-5


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


@pytest.mark.parametrize("node", [
    helper.make_node("Softmax", ["x"], ["y"]),
    helper.make_node("Relu", ["x"], ["y"], domain="com.example"),
])
def test_port_refuses_an_op_it_does_not_know_by_name(node):
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [2, 3])],
                              [helper.make_tensor_value_info("y", 1, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    with pytest.raises(ValueError, match=f"{node.domain}:?{node.op_type}"):
        OnnxModule(model)


def _run(loss, acc, seed=0, diverged=False, **cfg):
    config = dict(arch="a", activation="relu", init="lsuv", seed=seed, lsuv_batch=128)
    config.update(cfg)
    return dict(config=config, train_loss=loss, test_acc=acc, diverged=diverged,
                weight_std={"conv1": 0.5, "fc1": 0.25}, test_var_worst=0.05)


def _rows(text):
    """A markdown table's body as {first cell: [other cells]} (``\\|`` is a literal bar)."""
    rows = [line.replace("\\|", "/").split("|") for line in text.splitlines()[2:]]
    return {cells[1].strip(): [c.strip() for c in cells[2:-1]] for cells in rows}


def test_table3_marks_non_learning_runs_nc_and_counts_epochs_to_the_threshold():
    results = [
        _run([2.3, 1.0, 0.2], [0.3, 0.92, 0.96], seed=0),
        _run([2.3, 1.2, 0.3], [0.2, 0.85, 0.94], seed=1),
        _run([2.3, 2.3, 2.3], [0.1, 0.1, 0.1], init="xavier"),
        _run([2.3, float("nan")], [0.1, 0.1], init="msra", diverged=True),
        _run([2.3, 2.3, 2.2], [0.1, 0.1, 0.1], init="orthonormal", seed=0),
        _run([2.3, 1.0, 0.5], [0.5, 0.8, 0.88], init="orthonormal", seed=1),
        _run([2.3, 1.0, 0.5], [0.1, 0.1, 0.1], lsuv_batch=2),  # another study: not in the grid
    ]
    text = tables.table3(results, "a", ["relu"], INITS, threshold=0.9, lsuv_batch=128)
    assert _rows(text) == {"LSUV": ["95.0 (2, 3)"], "Xavier": ["n/c"], "MSRA": ["n/c"],
                           "OrthoNorm": ["88.0 (n/c, -)"]}


def test_epochs_to_counts_the_first_epoch_at_or_over_the_threshold():
    assert tables.epochs_to(_run([1.0] * 3, [0.5, 0.9, 0.95]), 0.9) == 2
    assert tables.epochs_to(_run([1.0] * 3, [0.95, 0.5, 0.5]), 0.9) == 1
    assert tables.epochs_to(_run([1.0] * 3, [0.5, 0.89, 0.5]), 0.9) is None


def test_table7_puts_each_lsuv_batch_size_in_its_own_column():
    results = [_run([2.3, 0.5], [0.5, 0.91], lsuv_batch=2),
               _run([2.3, 0.5], [0.95, 0.97], lsuv_batch=128),
               _run([2.3, 0.5], [0.95, 0.97], init="msra")]
    results[0]["test_var_worst"] = 0.4
    rows = _rows(tables.table7(results, "a", "relu", [2, 128], threshold=0.9))
    assert list(rows.values()) == [["91.0 (2)", "97.0 (1)"], ["0.40", "0.05"]]


def test_table8_has_a_row_per_layer_and_a_column_per_init():
    results = [_run([1.0], [0.5], init=i) for i in ("lsuv", "msra")]
    results[1]["weight_std"] = {"conv1": 0.125, "fc1": 0.0625}
    text = tables.table8(results, "a", [("relu", "lsuv"), ("relu", "msra")], lsuv_batch=128)
    assert text.splitlines()[0] == "| layer | LSUV (relu) | MSRA (relu) |"
    assert _rows(text) == {"conv1": ["0.5", "0.125"], "fc1": ["0.25", "0.0625"]}


def test_gain_table_reads_the_baselines_formulas_back_from_their_weights():
    """std(W) x sqrt(fan_in) over the hidden layers: MSRA's sqrt(2); Xavier's 1 on the
    FitNet's square convs (fan_in = fan_out), sqrt(2/3) where maxout doubles the outputs."""
    results = []
    for act, init in [("relu", "msra"), ("relu", "xavier"), ("maxout", "xavier")]:
        model = lsuv_init(build("fitnet4_digits", act), None, init=init, seed=0).model
        weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        run = _run([1.0], [0.5], arch="fitnet4_digits", activation=act, init=init)
        run["weight_std"] = {label: float(np.std(weights[name]))
                             for label, name in target_weights(model).items()}
        results.append(run)
    fans = {act: fan_ins("fitnet4_digits", act) for act in ("relu", "maxout")}
    assert fans["relu"]["conv2"] == 16 * 9 and fans["relu"]["fc1"] == 64
    text = tables.gain_table(results, "fitnet4_digits", ["relu", "maxout"], ["xavier", "msra"],
                             lsuv_batch=128, fan_ins=fans, analytic=analytic_gains())
    rows = _rows(text)
    assert rows["Xavier"] == ["1.00", f"{np.sqrt(2 / 3):.2f}"]
    assert rows["MSRA"] == [f"{np.sqrt(2):.2f}", ""]
    assert rows["calculate_gain"] == ["1.41", "1.00"]


def test_plans_round_trip_through_json_and_narrow_to_what_was_asked():
    for plan in (FULL, QUICK):
        assert _plan_from_dict(json.loads(json.dumps(_plan_dict(plan)))) == plan
    full = FULL.configs()
    grid = len(FULL.budgets) * len(FULL.activations) * len(FULL.inits) * len(FULL.seeds)
    extra_sizes = [s for s in FULL.batch_sizes if s != FULL.lsuv_batch]
    variants = len(FULL.variants) * len(FULL.seeds)
    bn = len(FULL.bn_activations) * len(FULL.bn_positions) * len(FULL.seeds)
    tol = len(FULL.tols) * len(FULL.seeds)
    modern = 2 * len(FULL.modern_seeds)
    assert len(full) == grid + len(extra_sizes) * len(FULL.seeds) + variants + bn + tol + modern
    assert len({(c.arch, c.activation, c.init, c.seed, c.lsuv_batch, c.variant, c.bn, c.tol)
                for c in full}) == len(full)
    assert {(c.arch, c.activation, c.init) for c in full if c.variant} == {
        (FULL.variant_arch, FULL.variant_activation, "lsuv")}
    relu = FULL.narrowed(("fitnet4_digits",), ("relu",), ("lsuv", "msra"))
    assert {(c.arch, c.activation, c.init) for c in relu.configs()} == {
        ("fitnet4_digits", "relu", "lsuv"), ("fitnet4_digits", "relu", "msra")}
    assert not relu.has_batch_study  # Table 7 is a tanh study
    assert relu.has_variant_study and not FULL.narrowed((), ("tanh",), ()).has_variant_study


def test_quick_mode_writes_every_table_plot_and_curve(tmp_path):
    """The smoke test: the whole pipeline on a small budget, and what it wrote."""
    out = tmp_path / "quick"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "run.py"),
                           "--quick", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    data = json.loads((out / "results.json").read_text())
    runs = data["runs"]
    assert len(runs) == len(QUICK.configs())
    for r in runs:
        arch = r["config"]["arch"]
        budget = QUICK.modern_budget if arch == QUICK.modern_arch else QUICK.budgets[arch]
        epochs = budget.epochs
        assert len(r["test_acc"]) == len(r["train_loss"]) == epochs or r["diverged"]
        assert len(r["epoch_s"]) == len(r["test_acc"])
        assert all(0.0 <= a <= 1.0 for a in r["test_acc"])
        if arch != QUICK.modern_arch or r["config"]["init"] == "lsuv":
            assert r["conversion_diff"] < 1e-5
        if arch in ("fitnet4_digits", "fitresnet4_digits"):
            assert list(r["weight_std"]) == [f"conv{i}" for i in range(1, 18)] + ["fc1", "fc2"]
        assert list(r["grad_ratio"]) == list(r["weight_std"]) == list(r["grad_var"])
        if r["config"]["init"] == "lsuv":
            assert r["lsuv_converged"]
            if r["config"]["lsuv_batch"] >= 16 and r["config"]["variant"] != "per_channel":
                # the batch's unit variance holds on held-out images, measured apart (per
                # channel, 32 images set each unit's own factor: that need not hold, and the
                # table reports it)
                assert r["test_var_worst"] < 0.3, r["config"]

    text = (out / "RESULTS.md").read_text()
    for arch in QUICK.budgets:  # the tables in the file are the ones the results give
        assert tables.table3(runs, arch, QUICK.activations, QUICK.inits, QUICK.threshold,
                             QUICK.lsuv_batch) in text
    assert tables.table7(runs, QUICK.batch_arch, QUICK.batch_activation, QUICK.batch_sizes,
                         QUICK.threshold) in text
    assert tables.table_variants(runs, QUICK.variant_arch, QUICK.variant_activation,
                                 QUICK.variants, QUICK.threshold, QUICK.lsuv_batch) in text
    assert len([r for r in runs if r["config"]["variant"]]) == len(QUICK.variants)
    for heading in ("## Table 3:", "## Table 4:", "## Table 5 and Figure 3", "## Table 8:",
                    "## Table 9:", "## Table 10:", "## Tol_var", "## Beyond the paper: a modern",
                    "### Gain at init", "## Checks"):
        assert heading in text, heading
    assert tables.table_modern(runs, QUICK.modern_arch, ("default", "lsuv"),
                               QUICK.threshold) in text
    assert len([r for r in runs if r["config"]["bn"]]) == 2
    pngs = [f"curves_{arch}.png" for arch in QUICK.budgets] + [
        "curves_lsuv_batch.png", "wallclock_bn.png", f"curves_{QUICK.modern_arch}.png"]
    for name in pngs:
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
