"""The name-for-name PyTorch path, end to end: a TorchScript export with
do_constant_folding=False and keep_initializers_as_inputs=True keeps one initializer per
parameter, named like state_dict(), so ``result.weights`` loads by name with no mapping;
then the torch model's own layer outputs have unit variance. (The general way back, any
exporter at its defaults, is onnx_lsuv.frameworks / match: tests/test_frameworks_torch.py.)
Skipped where torch is not installed."""

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = torch.nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def test_weights_load_back_into_pytorch_by_parameter_name(tmp_path):
    from onnx_lsuv import lsuv_init

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(64, 3, 6, 6)
    kwargs = dict(opset_version=17, do_constant_folding=False, keep_initializers_as_inputs=True)
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    torch.onnx.export(model, (x,), str(tmp_path / "net.onnx"), **kwargs)
    result = lsuv_init(str(tmp_path / "net.onnx"), x.numpy(), provider="cpu")
    assert set(result.weights) >= {"conv1.weight", "conv2.weight", "fc.weight"}

    state = model.state_dict()
    model.load_state_dict({k: torch.from_numpy(result.weights[k].copy())
                           if k in result.weights else v for k, v in state.items()})
    variances = []
    hooks = [m.register_forward_hook(lambda m, i, o: variances.append(float(o.var(False))))
             for m in (model.conv1, model.conv2, model.fc)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert np.allclose(variances, 1.0, atol=0.1), variances
    assert not model.conv1.bias.any()  # zeroed with the orthonormal pre-init


def _export(module, args, path, **extra):
    kwargs = dict(opset_version=17, do_constant_folding=False, keep_initializers_as_inputs=True)
    kwargs.update(extra)
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    torch.onnx.export(module, args, str(path), **kwargs)


def test_pytorch_transformer_encoder_export(tmp_path):
    """nn.TransformerEncoder: the fused in_proj (read through a Transpose, split by reshapes),
    out_proj and the MLP are targets; measured here through PyTorch's own modules."""
    from onnx_lsuv import lsuv_init

    torch.manual_seed(0)
    enc = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
        enable_nested_tensor=False).eval()
    x = torch.randn(32, 6, 16)
    _export(enc, (x,), tmp_path / "enc.onnx")
    result = lsuv_init(str(tmp_path / "enc.onnx"), x.numpy(), provider="cpu")
    assert result.report.converged and len(result.report.layers) == 8
    state = enc.state_dict()
    enc.load_state_dict({k: torch.from_numpy(result.weights[k].copy()) if k in result.weights
                         else v for k, v in state.items()})
    variances = []
    mods = [m for layer in enc.layers for m in (layer.linear1, layer.linear2)]
    hooks = [m.register_forward_hook(lambda m, i, o: variances.append(float(o.var(False))))
             for m in mods]
    with torch.no_grad():
        enc(x)
    for h in hooks:
        h.remove()
    assert np.allclose(variances, 1.0, atol=0.1), variances


def test_pytorch_lstm_export_gates_have_unit_input_projections(tmp_path):
    from onnx_lsuv import lsuv_init

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(5, 8, num_layers=2, bidirectional=True).eval()
    x = torch.randn(6, 16, 5)
    _export(lstm, (x,), tmp_path / "lstm.onnx", do_constant_folding=True,
            keep_initializers_as_inputs=False)
    result = lsuv_init(str(tmp_path / "lstm.onnx"), x.numpy(), provider="cpu")
    rep = result.report
    assert rep.converged and len(rep.layers) == 16  # 2 layers x 2 directions x 4 gates
    assert rep.layers[0].name.endswith("[fw.i]")
    # First layer: x is the graph input, so W_g x is measured here directly.
    w = next(v for k, v in result.weights.items()
             if v.ndim == 3 and v.shape == (2, 32, 5)).astype(np.float64)
    xs = x.numpy().reshape(-1, 5).astype(np.float64)
    for d in range(2):
        for g in range(4):
            assert abs((xs @ w[d, g * 8:(g + 1) * 8].T).var() - 1) < 0.1
