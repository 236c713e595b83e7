"""The experiments' side-by-side with the paper (issue 17): the quoted tables, FitResNet-4 and
BN-FitNet-4 as built, BatchNormalization in the ONNX-to-PyTorch port, the Table 10 gradient
statistic, the new tables, and the modern net's export round trip. Skipped without torch."""

import math
import os
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from conftest import ROOT, output_values, rand  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "experiments"))

from onnx_lsuv import lsuv_init  # noqa: E402

import paper  # noqa: E402
import result_tables as tables  # noqa: E402
from fitnets import ACTIVATIONS, build  # noqa: E402
from onnx_torch import OnnxModule, max_rel_diff_vs_ort  # noqa: E402
from run import FULL, QUICK, convs_after_pools  # noqa: E402
from training import (  # noqa: E402
    GRAD_VAR_BATCHES,
    Budget,
    RunResult,
    arch_data,
    fan_ins,
    gradient_ratios,
    target_weights,
    train,
)


def _shapes(model):
    return {t.name: tuple(t.dims) for t in model.graph.initializer}


def test_the_quoted_orthonormal_column_is_what_the_papers_net_gives():
    """The paper's OrthoNorm stds (Table 8) against an orthonormal matrix's entry std on our
    build of its FitNet4, 1 / sqrt(max(fan_in, outputs)): the layer names line up with our
    layers and the paper's fan-ins are the ones the tables use."""
    model = build("fitnet4", "relu")
    shapes = _shapes(model)
    weights = list(target_weights(model).values())
    assert len(paper.LAYERS) == len(weights) - 1  # the paper's tables leave out the classifier
    for layer, name in zip(paper.LAYERS, weights):
        out, fan_in = shapes[name][0], math.prod(shapes[name][1:])
        expected = 1 / math.sqrt(max(fan_in, out))
        assert abs(paper.TABLE8["orthonormal"][layer] - expected) < 0.003, layer
    # MSRA's sqrt(2 / fan_in) where the paper's column follows it (conv11 to conv14, ip1)
    fans = fan_ins("fitnet4", "relu")
    for layer, label in [("conv11", "conv1"), ("conv13", "conv3"), ("ip1", "fc1")]:
        assert abs(paper.TABLE8["msra"][layer] - math.sqrt(2 / fans[label])) < 0.01


@pytest.mark.parametrize("arch", ["fitresnet4", "fitresnet4_digits"])
@pytest.mark.parametrize("activation", ["relu", "maxout"])
def test_fitresnet_sums_each_even_conv_with_its_input_before_the_non_linearity(arch, activation):
    model = build(arch, activation)
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    convs = [n for n in nodes if n.op_type == "Conv"]
    adds = [n for n in nodes if n.op_type == "Add"]
    assert len(convs) == 17 and len(adds) == 8
    summed = []
    for add in adds:
        branch, shortcut = add.input
        # the shortcut is the input of the conv on the other branch
        src = producer[branch]
        if activation == "maxout":
            assert src.op_type == "Max"
            src = producer[producer[src.input[0]].input[0]]  # Max <- Split <- Conv
        assert src.op_type == "Conv" and src.input[0] == shortcut
        summed.append(convs.index(src))
        consumers = {n.op_type for n in nodes if add.output[0] in n.input}
        # relu: the sum, then the non-linearity; maxout: the max came first, and the sum
        # goes on to the next layer or pool
        assert consumers == {"Relu"} if activation == "relu" else \
            consumers <= {"Conv", "MaxPool", "GlobalMaxPool"}
    # the 2nd and 4th conv of the first block, then every second conv (1-based: even ones
    # within each block)
    assert summed == [1, 3, 6, 8, 10, 12, 14, 16]
    assert convs_after_pools(arch) == [5, 11]


def test_maxout_shortcut_after_the_max_is_the_shortcut_before_it():
    """max(a + s, b + s) = max(a, b) + s, checked on the built graph: the sum after the Max
    equals summing into both pieces, computed here with numpy from the pieces."""
    model = build("fitresnet4_digits", "maxout", seed=3)
    model = lsuv_init(model, None, init="msra", seed=0).model
    x = arch_data("fitresnet4_digits")[0][:8]
    add = next(n for n in model.graph.node if n.op_type == "Add")
    mx = next(n for n in model.graph.node if n.output[0] == add.input[0])
    split = next(n for n in model.graph.node if n.output[0] == mx.input[0])
    a, b, s, y = output_values(model, {"input": x}, [*split.output, add.input[1], add.output[0]])
    assert np.allclose(np.maximum(a + s, b + s), y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("activation", ["relu", "maxout"])
def test_bn_fitnet_puts_a_batchnorm_by_every_hidden_non_linearity(position, activation):
    model = build("fitnet4_digits", activation, bn=position)
    nodes = list(model.graph.node)
    bns = [n for n in nodes if n.op_type == "BatchNormalization"]
    assert len(bns) == 18  # 17 convs and the hidden fc; none on the classifier
    act_op = "Max" if activation == "maxout" else "Relu"
    producer = {o: n for n in nodes for o in n.output}
    shapes = _shapes(model)
    for bn in bns:
        src = producer[bn.input[0]]
        if position == "before":
            assert src.op_type in ("Conv", "Gemm")
            channels = shapes[src.input[1]][0]  # maxout: both pieces, 2x the outputs
        else:
            assert src.op_type == act_op
            layer = src
            while layer.op_type not in ("Conv", "Gemm"):
                layer = producer[layer.input[0]]
            channels = shapes[layer.input[1]][0] // (2 if activation == "maxout" else 1)
        assert shapes[bn.input[1]] == (channels,)
    with pytest.raises(ValueError, match="bn"):
        build("fitnet4_digits", "relu", bn="middle")


def _with_statistics(model, seed=0):
    """``model`` with non-default BatchNormalization scale, shift, mean and variance."""
    rng = np.random.default_rng(seed)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name.startswith("bn"):
            n = t.dims[0]
            value = {"scale": rng.uniform(0.5, 2, n), "shift": rng.normal(0, 0.5, n),
                     "mean": rng.normal(0, 0.5, n), "var": rng.uniform(0.3, 3, n)}[
                         t.name.split(".")[-1]]
            t.CopyFrom(numpy_helper.from_array(value.astype(np.float32), t.name))
    return m


@pytest.mark.parametrize("position", ["before", "after"])
def test_port_runs_batchnorm_on_its_statistics_in_eval_mode_as_onnxruntime_does(position):
    model = lsuv_init(build("fitnet4_digits", "tanh", bn=position), None, init="xavier").model
    model = _with_statistics(model)
    module = OnnxModule(model)
    # mean and variance are buffers (not trained); scale and shift are parameters
    assert len(list(module.buffers())) == 2 * 18
    assert max_rel_diff_vs_ort(model, module, rand(16, 1, 16, 16, seed=1)) < 1e-5
    assert module.training  # the check put it back in training mode


def test_port_trains_batchnorm_on_batch_statistics_and_updates_its_running_ones():
    model = _with_statistics(build("fitnet4_digits", "relu", bn="before"))
    module = OnnxModule(model)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    x = torch.from_numpy(rand(32, 1, 16, 16, seed=2) * 3 + 1)
    conv_out = torch.nn.functional.conv2d(x, module.parameter("conv1.weight"),
                                          module.parameter("conv1.bias"), padding=1)
    batch_mean = conv_out.mean((0, 2, 3)).detach()
    before = dict(module.named_buffers())[module.statistics[bn.input[3]]].clone()
    module(x)
    after = dict(module.named_buffers())[module.statistics[bn.input[3]]]
    # torch's BatchNorm2d momentum 0.1: new = 0.9 old + 0.1 batch mean
    assert torch.allclose(after, 0.9 * before + 0.1 * batch_mean, atol=1e-5)

    # the gradient at init is taken in training mode but leaves the statistics as they were
    state = {k: v.clone() for k, v in module.named_buffers()}
    x_tr, y_tr = arch_data("fitnet4_digits")[0][:64], arch_data("fitnet4_digits")[1][:64]
    gradient_ratios(module, {label: module.parameter(name)
                             for label, name in target_weights(model).items()}, x_tr, y_tr)
    assert all(torch.equal(state[k], v) for k, v in module.named_buffers())


def test_table10_statistic_is_the_variance_of_each_layers_gradient_over_ten_batches():
    """With the training set one mini-batch, plain SGD (no momentum, no weight decay) moves
    the weights each step; the test steps its own copy of the net the same way and takes the
    variance of each layer's gradient at each of the first 10 steps with numpy: the recorded
    figure must be their mean (an 11th or a 9th step would change it)."""
    model = lsuv_init(build("mlp25_digits", "tanh"), None, init="msra", seed=1).model
    x_tr, y_tr, x_te, y_te = arch_data("mlp25_digits")
    x_tr, y_tr = x_tr[:64], y_tr[:64]
    lr = 0.5
    weights = target_weights(model)
    mine = OnnxModule(model)
    seen = {label: [] for label in weights}
    for _ in range(GRAD_VAR_BATCHES):
        mine.zero_grad()
        torch.nn.functional.cross_entropy(mine(torch.from_numpy(x_tr)),
                                          torch.from_numpy(y_tr)).backward()
        with torch.no_grad():
            for label, name in weights.items():
                seen[label].append(np.var(mine.parameter(name).grad.numpy().astype(np.float64)))
            for p in mine.parameters():
                p -= lr * p.grad
    expected = {label: float(np.mean(v)) for label, v in seen.items()}
    assert max(seen["fc1"]) > 1.5 * min(seen["fc1"])  # the steps do change the gradient

    module = OnnxModule(model)
    res = RunResult(config={})
    budget = Budget(epochs=GRAD_VAR_BATCHES + 2, lr=lr, momentum=0.0, weight_decay=0.0)
    train(module, budget, 0, x_tr, y_tr, x_te, y_te, res,
          {label: module.parameter(name) for label, name in weights.items()})
    assert set(res.grad_var) == set(weights)
    for label in weights:
        assert res.grad_var[label] == pytest.approx(expected[label], rel=1e-3), label
    assert len(res.epoch_s) == budget.epochs and res.epoch_s == sorted(res.epoch_s)


def _run(acc, seed=0, **cfg):
    config = dict(arch="a", activation="relu", init="lsuv", seed=seed, lsuv_batch=128, tol=0.1,
                  variant="", bn="")
    config.update(cfg)
    loss = [2.3, 0.5] if acc else [2.3, 2.3]
    return dict(config=config, train_loss=loss, test_acc=[0.1, acc or 0.1], diverged=False,
                weight_std={}, test_var_worst=0.05, epoch_s=[1.0, 2.0], init_s=0.5,
                lsuv_converged=True, lsuv_tries=3 + seed)


def _rows(text):
    rows = [line.replace("\\|", "/").split("|") for line in text.splitlines()[2:]]
    return {cells[1].strip(): [c.strip() for c in cells[2:-1]] for cells in rows}


def test_table3_with_paper_interleaves_the_papers_rows_and_counts_agreement():
    quoted = {"lsuv": {"relu": "92.11", "sigmoid": "n/c"},
              "xavier": {"relu": "90.63", "sigmoid": "n/c"}}
    results = [_run(0.95, activation="relu"), _run(None, activation="sigmoid"),
               _run(None, activation="relu", init="xavier"),
               _run(0.5, activation="sigmoid", init="xavier"),
               _run(0.99, activation="relu", tol=0.02)]  # the Tol_var study: not the grid
    text = tables.table3_with_paper(results, "a", ["relu", "sigmoid"], ["lsuv", "xavier"],
                                    0.9, 128, quoted, 3)
    assert _rows(text) == {"LSUV": ["95.0 (2)", "n/c"],
                           "LSUV, paper (Table 3)": ["92.11", "n/c"],
                           "Xavier": ["n/c", "50.0 (-)"],
                           "Xavier, paper (Table 3)": ["90.63", "n/c"]}
    line = tables.convergence_agreement(results, "a", ["relu", "sigmoid"], ["lsuv", "xavier"],
                                        128, quoted, 3)
    assert line.startswith("Converges or not, as in the paper's Table 3: 2 of 4 cells")
    assert "Xavier relu (ours n/c, paper learns)" in line
    assert "Xavier sigmoid (ours learns, paper n/c)" in line


def test_table5_sets_each_bn_position_and_lsuv_beside_the_papers():
    results = [_run(0.9, init="xavier", bn="before"), _run(0.8, init="xavier", bn="after"),
               _run(0.95)]
    results[0]["epoch_s"] = [3.0, 6.0]
    rows = _rows(tables.table5(results, "a", ["relu"], ["before", "after"], "xavier", 0.85,
                               128, paper.TABLE5, paper.TABLE3["lsuv"]))
    assert rows == {"relu": ["90.0 (2)", "92.60", "80.0 (-)", "92.58", "95.0 (2)", "92.11",
                             "3.00", "1.00", "1.00"]}


def test_tol_table_reports_each_tolerance_and_its_tries():
    results = [_run(0.9, seed=0), _run(0.9, seed=1), _run(0.92, seed=0, tol=0.02),
               _run(0.94, seed=1, tol=0.02)]
    results[2]["lsuv_tries"] = 9
    rows = _rows(tables.table_tol(results, "a", "relu", [0.1, 0.02], 0.85, 128))
    assert rows["0.1"][:2] == ["90.0 (2, 2)", "3, 4"]
    assert rows["0.02"][:2] == ["93.0 (2, 2)", "9, 4"]


def test_table10_patterns_are_the_convs_spread_and_slope():
    r = _run(0.9)
    r["grad_var"] = {"conv1": 1e-4, "conv2": 4e-4, "conv3": 2e-4, "fc1": 1.0}
    quoted = {"lsuv": {"conv11": 1e-9, "conv12": 1e-9, "conv13": 3e-9, "ip1": 5.0}}
    rows = _rows(tables.table10_with_paper([r], "a", "relu", ["lsuv"], 128, quoted,
                                           ["conv11", "conv12", "conv13", "ip1"]))
    assert rows["conv2 (conv12)"] == ["4.00e-04", "1.00e-09"]
    assert rows["fc1 (ip1)"] == ["1.00e+00", "5.00e+00"]
    assert rows["largest / smallest, convs"] == ["4", "3"]
    assert rows["last conv / first conv"] == ["2", "3"]


def test_full_plan_holds_every_study_once_and_narrowing_drops_the_modern_net():
    configs = FULL.configs()
    keys = [(c.arch, c.activation, c.init, c.seed, c.lsuv_batch, c.variant, c.bn, c.tol)
            for c in configs]
    assert len(set(keys)) == len(keys)
    assert {c.arch for c in configs} == {"fitnet4_digits", "fitresnet4_digits", "mlp25_digits",
                                         "vit_digits"}
    bn = [c for c in configs if c.bn]
    assert {(c.activation, c.bn, c.init) for c in bn} == {
        (a, p, "xavier") for a in ("tanh", "relu", "maxout") for p in ("before", "after")}
    assert {c.tol for c in configs} == {0.1, 0.02}
    assert len([c for c in configs if c.arch == "vit_digits"]) == 2 * len(FULL.modern_seeds)
    assert set(ACTIVATIONS) == set(FULL.activations)
    narrowed = FULL.narrowed(("fitnet4_digits",), ("relu",), ("lsuv",))
    assert not narrowed.has_modern_study and not narrowed.has_bn_study
    assert FULL.narrowed(("vit_digits",), (), ()).configs() == [
        c for c in configs if c.arch == "vit_digits"]
    assert QUICK.has_bn_study and QUICK.has_tol_study and QUICK.has_modern_study


def test_vit_round_trip_writes_unit_variance_weights_back_into_the_module():
    """LSUV through the export round trip on the modern net: every Linear is mapped back, and
    the PyTorch module itself (forward hooks, float64, not onnx-lsuv) then has unit variance
    at each Linear's output on the batch."""
    from onnx_lsuv.frameworks.torch import lsuv_module

    from modern import ViT, linears, output_variances, vit_data

    torch.manual_seed(0)
    module = ViT()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x = vit_data()[0][:64]
    done = lsuv_module(module, torch.from_numpy(x), exporter="torchscript", seed=0,
                       provider="cpu", threads=1)
    assert done.match.complete and done.report.converged
    changed = {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}
    assert {f"{name}.weight" for name in linears(module)} <= changed
    # LayerNorms and the position embedding are not LSUV's: untouched, bit for bit
    assert not {k for k in changed if "norm" in k or k == "pos"}
    for name, var in output_variances(module, x).items():
        assert abs(var - 1.0) < 0.1, name
