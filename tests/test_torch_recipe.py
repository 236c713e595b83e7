"""The README's PyTorch recipe, end to end: export, onnx-lsuv, load_state_dict, and the torch
model's own layer outputs have unit variance. Skipped where torch is not installed."""

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
