"""Back into PyTorch: ``onnx_lsuv.frameworks.torch.lsuv_module`` and the CLI's ``--match`` on
models built here in plain torch (a ResNet-style net with BatchNorm, a BERT-style encoder),
through both exporters at their default settings.

Measured in torch itself, with forward hooks on the updated module: every Conv2d / Linear
output (or, where the exporter folded a BatchNorm into the conv, as both exporters do in eval
mode, the BatchNorm's output: that is what the ONNX conv computes) has unit variance within
tol, in float64; the module's own forward equals ONNX Runtime's on the initialised ONNX model;
and every tensor that changed between the export and the initialised model (counted here, from
the two models) reached the module.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from _common import changed_tensors, ort_output  # tests/frameworks: the checks' own

torch = pytest.importorskip("torch")
nn = torch.nn

TOL = 0.1
CLI = [sys.executable, "-m", "onnx_lsuv"]


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=True)  # a bias before BN, too
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                      nn.BatchNorm2d(c_out))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return torch.relu(h + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = Block(8, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = self.layer2(self.layer1(h))
        return self.fc(h.mean((2, 3)))

    folded = {"stem": "bn", "layer1.conv1": "layer1.bn1", "layer1.conv2": "layer1.bn2",
              "layer2.conv1": "layer2.bn1", "layer2.conv2": "layer2.bn2",
              "layer2.down.0": "layer2.down.1"}


class Encoder(nn.Module):
    """BERT-style: separate query/key/value Linears, softmax attention, LayerNorms, GELU FFN."""

    def __init__(self, d: int = 16, heads: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.d, self.heads = d, heads
        self.embed = nn.Linear(6, d)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict({
                "query": nn.Linear(d, d), "key": nn.Linear(d, d), "value": nn.Linear(d, d),
                "out": nn.Linear(d, d), "ln1": nn.LayerNorm(d),
                "ff1": nn.Linear(d, 2 * d), "ff2": nn.Linear(2 * d, d), "ln2": nn.LayerNorm(d)}))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        n, t, _ = x.shape
        h = self.embed(x)
        for b in self.blocks:
            def split(y):
                return y.view(n, t, self.heads, -1).transpose(1, 2)
            q, k, v = split(b["query"](h)), split(b["key"](h)), split(b["value"](h))
            a = torch.softmax(q @ k.transpose(-1, -2) / (self.d // self.heads) ** 0.5, -1) @ v
            h = b["ln1"](h + b["out"](a.transpose(1, 2).reshape(n, t, self.d)))
            h = b["ln2"](h + b["ff2"](torch.nn.functional.gelu(b["ff1"](h))))
        return self.head(h[:, 0])

    folded: dict[str, str] = {}


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Non-zero biases, BatchNorm statistics and affine parameters away from the defaults."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
    return model


def make(kind: str, seed: int = 0, fresh: bool = False):
    torch.manual_seed(seed)
    if kind == "resnet":
        model, x = ResNet(), torch.randn(32, 3, 12, 12)
    else:
        model, x = Encoder(), torch.randn(32, 8, 6)
    return (model if fresh else randomise(model, seed + 1)).eval(), x


def measured(model: nn.Module, x) -> dict[str, float]:
    """float64 variance of each Conv2d / Linear output, or of its folded BatchNorm's."""
    names = dict(model.named_modules())
    taps = {n: model.folded.get(n, n) for n, m in names.items()
            if isinstance(m, (nn.Conv2d, nn.Linear))}
    seen: dict[str, list] = {}
    hooks = [names[t].register_forward_hook(
        lambda mod, inp, out, t=t: seen.setdefault(t, []).append(out.detach().double()))
        for t in set(taps.values())]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return {n: float(torch.cat([o.reshape(-1) for o in seen[t]]).var(unbiased=False))
            for n, t in taps.items()}


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("kind", ["resnet", "encoder"])
def test_lsuv_module(kind, exporter):
    from onnx_lsuv.frameworks.torch import lsuv_module

    model, x = make(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = lsuv_module(model, x, exporter=exporter, seed=3)
    assert result.report.converged
    if model.folded:  # both exporters fold BatchNorm into the conv in eval mode
        assert "BatchNormalization" not in {n.op_type for n in result.exported.graph.node}

    variances = measured(model, x)
    assert len(variances) == (7 if kind == "resnet" else 14)
    off = {n: v for n, v in variances.items() if abs(v - 1.0) >= TOL}
    assert not off, f"off unit variance in torch's own forward: {off}"

    changed = set(changed_tensors(result.exported, result.model))
    assert changed and result.match.changed == len(changed)
    assert result.match.complete and {m["onnx"] for m in result.match.mapped} == changed

    with torch.no_grad():
        ours = model(x).numpy()
    np.testing.assert_allclose(ours, ort_output(result.model, x.numpy()), rtol=1e-4,
                               atol=1e-4)
    # what changed in the module is exactly what the call says it wrote
    state = model.state_dict()
    moved = {k for k in state if not torch.equal(state[k], before[k])}
    assert moved == set(result.params)
    assert not any(k.endswith(("running_mean", "running_var")) for k in moved)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_fresh_model_with_default_batchnorm(exporter):
    """A model as built, BatchNorm at its defaults (gamma 1, var 1: every BN alike, and the
    folded factor 1/sqrt(1 + eps) within 1e-5 of 1): still folded, still mapped."""
    from onnx_lsuv.frameworks.torch import lsuv_module

    model, x = make("resnet", fresh=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = lsuv_module(model, x, exporter=exporter, seed=2)
    assert result.match.complete and result.match.changed == len(
        changed_tensors(result.exported, result.model))
    assert not {n: v for n, v in measured(model, x).items() if abs(v - 1.0) >= TOL}
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), ort_output(result.model, x.numpy()),
                                   rtol=1e-4, atol=1e-4)


def test_weight_norm_is_refused_not_unscaled():
    """weight_norm's kernel g v / |v| is v times a factor per unit, like a folded BatchNorm,
    but the factor depends on v: mapping it back would be wrong, so the call refuses."""
    from onnx_lsuv.frameworks import MatchError
    from onnx_lsuv.frameworks.torch import lsuv_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv1d(3, 6, 3)), nn.ReLU(),
                          nn.utils.parametrizations.weight_norm(nn.Conv1d(6, 4, 3))).eval()
    x = torch.randn(16, 3, 20)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings(), pytest.raises(MatchError, match="NOT mapped"):
        warnings.simplefilter("ignore")
        lsuv_module(model, x, exporter="dynamo")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight  # the head tied to the embedding

    def forward(self, ids):
        return self.out(torch.tanh(self.mid(self.emb(ids))))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_tied_head_read_by_the_embedding_is_refused(exporter):
    """The exporter writes the embedding table for the Gather and a copy for the head's
    MatMul; only the copy is initialised. torch has one parameter for both, so writing it
    would change the embedding as well: MatchError, and the module is left as it was."""
    from onnx_lsuv.frameworks import MatchError
    from onnx_lsuv.frameworks.torch import lsuv_module

    torch.manual_seed(0)
    model = TiedLM().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings(), pytest.raises(MatchError, match="tied"):
        warnings.simplefilter("ignore")
        lsuv_module(model, torch.randint(0, 20, (16, 5)), exporter=exporter)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_numpy_float64_batch():
    from onnx_lsuv.frameworks.torch import lsuv_module

    model, x = make("resnet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = lsuv_module(model, x.double().numpy(), exporter="torchscript")
    assert result.match.complete and result.report.converged


def test_nothing_to_initialise_is_said(caplog):
    """TorchScript writes weight norm's kernel as ops on g and v: no target at all. The call
    changes nothing, and says so rather than returning as if it had initialised."""
    from onnx_lsuv.frameworks.torch import lsuv_module

    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 6))).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = lsuv_module(model, torch.randn(16, 3), exporter="torchscript")
    assert not result.report.layers and not result.params
    assert "no layer that onnx-lsuv initialises" in caplog.text


def test_lsuv_module_keeps_training_mode_and_is_deterministic():
    from onnx_lsuv.frameworks.torch import lsuv_module

    a, x = make("encoder")
    b, _ = make("encoder")
    a.train()
    a.blocks[0]["ln1"].eval()  # a submodule the user froze stays frozen
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lsuv_module(a, x, seed=5)
        lsuv_module(b, x, seed=5)
    assert a.training and not b.training and not a.blocks[0]["ln1"].training
    assert a.blocks[1]["ln1"].training
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_strict_leaves_the_module_alone(monkeypatch):
    """When a changed tensor is not found, nothing is written and the error names it."""
    import onnx_lsuv.frameworks as frameworks
    from onnx_lsuv.frameworks import MatchError
    from onnx_lsuv.frameworks.torch import lsuv_module

    model, x = make("resnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = frameworks.match_parameters

    def without_fc(original, changed, params):  # as if fc.weight were not the model's
        return real(original, changed, {k: v for k, v in params.items() if k != "fc.weight"})

    monkeypatch.setattr(frameworks, "match_parameters", without_fc)
    with warnings.catch_warnings(), pytest.raises(MatchError, match="fc.weight"):
        warnings.simplefilter("ignore")
        lsuv_module(model, x, exporter="torchscript")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_cli_match(tmp_path):
    """The CLI on a default (dynamo) export with --match state_dict.npz --save-weights: the
    npz loads into the module by its own names and shapes, and gives unit variances."""
    model, x = make("resnet", seed=4)
    path = str(tmp_path / "net.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=True, verbose=False)
    state = {k: v.numpy() for k, v in model.state_dict().items() if v.is_floating_point()}
    np.savez(tmp_path / "params.npz", **state)
    np.save(tmp_path / "x.npy", x.numpy())
    out = tmp_path / "init.onnx"
    cmd = [*CLI, path, "--data", str(tmp_path / "x.npy"), "-o", str(out),
           "--match", str(tmp_path / "params.npz"), "--save-weights", str(tmp_path / "new.npz")]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "--match:" in run.stderr and "NOT mapped" not in run.stderr
    with np.load(tmp_path / "new.npz") as new:
        assert set(new.files) <= set(state)
        full = model.state_dict()
        for k in new.files:
            assert new[k].shape == state[k].shape and new[k].dtype == state[k].dtype
            full[k] = torch.from_numpy(new[k])
    model.load_state_dict(full)
    off = {n: v for n, v in measured(model, x).items() if abs(v - 1.0) >= TOL}
    assert not off
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), ort_output(onnx.load(str(out)), x.numpy()),
                                   rtol=1e-4, atol=1e-4)


def test_cli_match_needs_save_weights_and_reports_unmapped(tmp_path):
    model, x = make("resnet", seed=5)
    path = str(tmp_path / "net.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False)
    state = {k: v.numpy() for k, v in model.state_dict().items()
             if v.is_floating_point() and k != "fc.weight"}
    np.savez(tmp_path / "params.npz", **state)
    np.save(tmp_path / "x.npy", x.numpy())
    base = [*CLI, path, "--data", str(tmp_path / "x.npy"), "-o", str(tmp_path / "o.onnx"),
            "--match", str(tmp_path / "params.npz")]
    run = subprocess.run(base, capture_output=True, text=True)
    assert run.returncode == 2 and "--save-weights" in run.stderr
    assert not os.path.exists(tmp_path / "o.onnx")
    run = subprocess.run(base + ["--save-weights", str(tmp_path / "w.npz")], capture_output=True,
                         text=True)
    assert run.returncode == 1
    assert "NOT mapped" in run.stderr and "fc.weight" in run.stderr
    with np.load(tmp_path / "w.npz") as w:
        assert "fc.weight" not in w.files and "stem.weight" in w.files


# --- issue 26: copies stored once, symmetric weights, and a property test of the mapping ---


class Copies(nn.Module):
    """A block and its copy.deepcopy (both exporters store their equal weights once), a head
    of the same shape with other values, and an optional conv block with BatchNorm, copied."""

    def __init__(self, conv: bool = False, trained_bn: bool = False) -> None:
        import copy

        super().__init__()
        block = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.a, self.b = block, copy.deepcopy(block)
        self.head = nn.Linear(16, 16)
        self.conv = None
        if conv:
            c = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                              nn.ReLU())
            if trained_bn:
                randomise(c, 7)
            self.conv, self.conv2 = c, copy.deepcopy(c)

    def forward(self, x):
        if self.conv is not None:
            x = self.conv2(self.conv(x.view(-1, 4, 2, 2))).reshape(-1, 16)
        return self.head(self.b(self.a(x)))


def _round_trip(model, x, exporter):
    from onnx_lsuv.frameworks.torch import lsuv_module

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = lsuv_module(model, x, exporter=exporter, seed=1)
    with torch.no_grad():
        ours = model(x).numpy()
    return result, ours, ort_output(result.model, x.numpy())


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_copied_block_stored_once_gets_the_new_weights_in_both_copies(exporter):
    """Before: the tensor went to one copy (its name), the twin kept its old weights and
    torch's output differed from ONNX Runtime's by ~4, with complete == True."""
    torch.manual_seed(0)
    model, x = Copies().eval(), torch.randn(64, 16)
    result, ours, theirs = _round_trip(model, x, exporter)
    assert result.match.complete, result.match.summary()
    assert {"a.0.weight", "b.0.weight"} <= set(result.params)
    assert torch.equal(model.a[0].weight, model.b[0].weight)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


class Symmetric(nn.Module):
    """nn.Linear with a symmetric weight on 3-D input (stored transposed for a MatMul) and a
    fresh BatchNorm among the parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        with torch.no_grad():
            w = torch.randn(16, 16)
            self.fc.weight.copy_((w + w.T) / 2)
        self.bn = nn.BatchNorm1d(16)  # fresh: gamma 1, running_var 1
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc(x)))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_symmetric_weight_is_refused_not_guessed(exporter):
    """Before: written untransposed because the fresh BatchNorm "explained" a factor of 1;
    torch's output differed from ONNX Runtime's by ~4. Now MatchError, module unchanged."""
    from onnx_lsuv.frameworks import MatchError
    from onnx_lsuv.frameworks.torch import lsuv_module

    torch.manual_seed(0)
    model, x = Symmetric().eval(), torch.randn(8, 8, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings(), pytest.raises(MatchError, match="ambiguous"):
        warnings.simplefilter("ignore")
        lsuv_module(model, x, exporter=exporter, seed=1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class Drawn(nn.Module):
    """A small random model for the property test: an optional conv block with BatchNorm
    (fresh or trained) and its copies, Linear blocks and their copies, a symmetric weight."""

    def __init__(self, conv_copies: int, trained_bn: bool, conv_bias: bool, copies: int,
                 symmetric: bool, head16: bool, flat: bool, seed: int) -> None:
        import copy

        super().__init__()
        torch.manual_seed(seed)
        conv = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=conv_bias), nn.BatchNorm2d(4),
                             nn.ReLU())
        if trained_bn:
            randomise(conv, seed)
        self.convs = nn.ModuleList([conv] + [copy.deepcopy(conv) for _ in range(conv_copies)])
        block = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        if symmetric:
            with torch.no_grad():
                block[0].weight.copy_((block[0].weight + block[0].weight.T) / 2)
        self.blocks = nn.ModuleList([block] + [copy.deepcopy(block) for _ in range(copies)])
        self.head = nn.Linear(16, 16 if head16 else 4)
        self.flat = flat  # 2-D: Gemm, the weights stored as they are; 3-D: MatMul, transposed

    def forward(self, x):
        n, t = x.shape[:2]
        h = x.reshape(n * t, 4, 2, 2)
        for c in self.convs:
            h = c(h)
        h = h.reshape(n * t, 16) if self.flat else h.reshape(n, t, 16)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(conv_copies=0, trained_bn=True, conv_bias=False, copies=1, symmetric=False,
         head16=True, flat=True, exporter="dynamo", seed=0)  # a copy the name picked alone
@example(conv_copies=1, trained_bn=True, conv_bias=False, copies=1, symmetric=True,
         head16=False, flat=False, exporter="torchscript", seed=1)  # folded copies, symmetric
@given(conv_copies=st.integers(0, 1), trained_bn=st.booleans(), conv_bias=st.booleans(),
       copies=st.integers(0, 2), symmetric=st.booleans(), head16=st.booleans(),
       flat=st.booleans(), exporter=st.sampled_from(["dynamo", "torchscript"]),
       seed=st.integers(0, 2 ** 16))
def test_property_the_module_computes_what_onnx_runtime_does_or_is_left_alone(
        conv_copies, trained_bn, conv_bias, copies, symmetric, head16, flat, exporter, seed):
    """After lsuv_module, the module's own forward equals ONNX Runtime's on the initialised
    model within 1e-4 relative, or the call raised MatchError and left the module bit for bit
    as it was."""
    from onnx_lsuv.frameworks import MatchError

    model = Drawn(conv_copies, trained_bn, conv_bias, copies, symmetric, head16, flat,
                  seed).eval()
    x = torch.randn(8, 4, 16, generator=torch.Generator().manual_seed(seed))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        _, ours, theirs = _round_trip(model, x, exporter)
    except MatchError:
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        return
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


# --- issue 27, pattern 6: fixed signal-processing kernels (buffers, requires_grad=False) ---


def stft_kernel(n: int = 16, bins: int = 4) -> np.ndarray:
    """A windowed DFT filter bank (cos and sin rows), [2 bins, 1, n]: what an STFT front end
    applies as a strided conv."""
    t, f = np.arange(n), np.arange(1, bins + 1)
    phase = 2 * np.pi * np.outer(f, t) / n
    return (np.concatenate([np.cos(phase), np.sin(phase)]) * np.hanning(n))[:, None, :]


class Spectral(nn.Module):
    """An STFT kernel as a buffer (persistent=False: not even in state_dict) applied by
    F.conv1d, a mel-like nn.Conv1d frozen with requires_grad_(False) (non-negative weights,
    non-zero bias), then trainable layers: a Conv1d with a bias and a BatchNorm with trained
    statistics, and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("stft", torch.tensor(stft_kernel(), dtype=torch.float32),
                             persistent=False)
        self.mel = nn.Conv1d(8, 6, 1)
        with torch.no_grad():
            self.mel.weight.abs_()
            self.mel.bias.uniform_(0.1, 0.5)
        self.mel.requires_grad_(False)
        self.conv = nn.Conv1d(6, 12, 3, padding=1)
        self.bn = nn.BatchNorm1d(12)
        self.fc = nn.Linear(12, 5)
        with torch.no_grad():
            self.conv.bias.uniform_(-1, 1)
            self.fc.bias.uniform_(-1, 1)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-1, 1)
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        power = torch.nn.functional.conv1d(x, self.stft, stride=4) ** 2
        h = torch.log1p(self.mel(power))
        h = torch.relu(self.bn(self.conv(h)))
        return self.fc(h.mean(-1))


def _holding(model: onnx.ModelProto, value: np.ndarray) -> list[str]:
    """The ONNX constants whose values are ``value`` as it is (both exporters keep torch's
    layout for Conv1d kernels)."""
    from _common import constants

    return [n for n, v in constants(model).items()
            if v.shape == value.shape and np.array_equal(v, value)]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_fixed_signal_kernels_are_left_alone(exporter):
    """Before: the STFT and mel kernels were pre-initialised and scaled like any layer (and
    the buffer was never written back: torch and the ONNX model then disagreed)."""
    from onnx_lsuv.frameworks.torch import lsuv_module

    torch.manual_seed(0)
    model, x = Spectral().eval(), torch.randn(32, 1, 128)
    fixed = {"stft": model.stft.numpy().copy(), "mel.weight": model.mel.weight.numpy().copy(),
             "mel.bias": model.mel.bias.numpy().copy()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = lsuv_module(model, x, exporter=exporter, seed=3)
    assert result.report.converged
    # bit for bit in the module, and in the ONNX model under every name the export gave them
    assert np.array_equal(model.stft.numpy(), fixed["stft"])
    assert np.array_equal(model.mel.weight.numpy(), fixed["mel.weight"])
    assert np.array_equal(model.mel.bias.numpy(), fixed["mel.bias"])
    assert not set(result.params) & set(fixed)
    from _common import constants

    after = constants(result.model)
    for name, value in fixed.items():
        where = _holding(result.exported, value)
        assert where, name
        assert all(np.array_equal(after[n], value) for n in where), name
    # reported as left alone by rule, naming the torch tensor
    alone = [s for s in result.report.left_alone if "non-trainable torch tensor" in s["reason"]]
    assert len(alone) == 2
    assert sorted(a["reason"].split("tensor ")[1].split(":")[0] for a in alone) == [
        "'mel.weight'", "'stft'"]
    assert not result.report.not_initialised
    assert len(result.report.layers) == 2  # conv (BatchNorm folded or not) and fc
    # the trainable layers reach unit variance in torch's own forward, in float64
    folded = "BatchNormalization" not in {n.op_type for n in result.exported.graph.node}
    seen: dict[str, float] = {}
    taps = {"conv": model.bn if folded else model.conv, "fc": model.fc}
    hooks = [m.register_forward_hook(
        lambda mod, inp, out, k=k: seen.__setitem__(k, float(out.double().var(unbiased=False))))
        for k, m in taps.items()]
    with torch.no_grad():
        ours = model(x).numpy()
    for h in hooks:
        h.remove()
    assert {k: v for k, v in seen.items() if abs(v - 1.0) >= TOL} == {}, seen
    np.testing.assert_allclose(ours, ort_output(result.model, x.numpy()), rtol=1e-4,
                               atol=1e-4 * np.abs(ours).max())


class CopiedKernel(nn.Module):
    """A trainable conv started from a copy of a fixed kernel held in a buffer: the export
    holds the same values for both, so which ONNX weight is the trainable one is not known."""

    def __init__(self) -> None:
        super().__init__()
        kernel = torch.tensor(stft_kernel(), dtype=torch.float32)
        self.register_buffer("stft", kernel.clone())
        self.learned = nn.Conv1d(1, 8, 16, stride=4)
        with torch.no_grad():
            self.learned.weight.copy_(kernel)
            self.learned.bias.uniform_(-1, 1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        fixed = torch.nn.functional.conv1d(x, self.stft, stride=4)
        return self.fc(torch.cat([fixed, self.learned(x)], 1).abs().mean(-1))


def test_a_kernel_both_trainable_and_fixed_is_left_alone_and_said_so():
    """The safe side: neither kernel is initialised (a fixed kernel changed would not come
    back by training), each reported as ambiguous."""
    from onnx_lsuv.frameworks.torch import lsuv_module

    torch.manual_seed(0)
    model, x = CopiedKernel().eval(), torch.randn(16, 1, 64)
    kernel = model.stft.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = lsuv_module(model, x, exporter="torchscript", seed=1)
    assert result.report.converged
    assert torch.equal(model.stft, kernel) and torch.equal(model.learned.weight, kernel)
    alone = [s["reason"] for s in result.report.left_alone]
    assert len(alone) == 2 and all("held both by the trainable torch tensor(s) "
                                   "'learned.weight'" in r and "non-trainable 'stft'" in r
                                   for r in alone), alone
    assert [r.name for r in result.report.layers] == ["/fc/Gemm"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
