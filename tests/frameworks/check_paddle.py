"""Back into PaddlePaddle: ``onnx_lsuv.frameworks.paddle.lsuv_layer`` on a CNN with
BatchNorm (one conv with a bias, one without) through paddle2onnx; then measured in Paddle's
own forward, with forward post-hooks on every Conv2D and Linear.

Usage (in the Paddle interpreter, onnx_lsuv on PYTHONPATH):
  check_paddle.py OUT.json             the CNN
  check_paddle.py rnn KIND OUT.json    a stacked GRU or LSTM (KIND) whose input size equals its
                                       hidden size: state_dict lists each weight twice
  check_paddle.py fixed OUT.json       a fixed STFT Conv1D (stop_gradient) before trainable
                                       layers: the fixed kernel left alone
  check_paddle.py wrong OUT.json       two wrong batches to the CNN in one process (4 channels,
                                       not 3; a fifth axis): what each raised; every tensor
                                       of the state_dict as before?
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("POLYGRAPHY_AUTOINSTALL_DEPS", "0")

import numpy as np  # noqa: E402
import paddle  # noqa: E402
from paddle import nn  # noqa: E402

from _common import fixed_facts, raised, same, summary, var, write  # noqa: E402


class CNN(nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2D(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2D(8)
        self.conv2 = nn.Conv2D(8, 8, 3, padding=1, bias_attr=False)
        self.bn2 = nn.BatchNorm2D(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, images):  # the export's input name must be this one
        h = nn.functional.relu(self.bn(self.conv(images)))
        h = nn.functional.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


class Recurrent(nn.Layer):
    def __init__(self, kind: str):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.rnn = getattr(nn, kind)(8, 8, num_layers=2)
        self.head = nn.Linear(8, 3)

    def forward(self, seq):
        h, _ = self.rnn(self.fc(seq))
        return self.head(h[:, -1])


def off_defaults(model) -> None:
    """Non-zero biases and BatchNorm statistics (and scale) away from their defaults."""
    rng = np.random.default_rng(1)
    for k, p in model.state_dict().items():
        if k.endswith(("_mean", "bias")):
            p.set_value(rng.normal(0.0, 1.0, p.shape).astype("float32"))
        elif k.endswith("_variance"):
            p.set_value(rng.uniform(0.5, 2.0, p.shape).astype("float32"))
        elif k.startswith("bn") and k.endswith("weight"):
            p.set_value(rng.uniform(0.5, 1.5, p.shape).astype("float32"))


def rnn(kind: str, out_path: str) -> int:
    """The one call on a stacked GRU/LSTM; measured: the Linear outputs (hooks) and, per
    layer and gate, the input projection x W_g of the recurrent layer's input (Paddle's gate
    blocks of weight_ih), in Paddle's own forward."""
    from onnx_lsuv.frameworks.paddle import lsuv_layer

    paddle.seed(0)
    model = Recurrent(kind)
    rng = np.random.default_rng(1)
    for k, p in model.state_dict().items():  # non-zero biases
        if "bias" in k:
            p.set_value(rng.normal(0.0, 0.5, p.shape).astype("float32"))
    x = np.random.default_rng(2).standard_normal((32, 5, 6)).astype("float32")
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    result = lsuv_layer(model, x, seed=3)
    moved = [k for k, v in model.state_dict().items() if not np.array_equal(before[k], v.numpy())]
    model.eval()
    seen = {}
    for name in ("fc", "head"):
        getattr(model, name).register_forward_post_hook(
            lambda lay, inp, out, name=name: seen.__setitem__(name, var(out.numpy())))
    out = model(paddle.to_tensor(x)).numpy()
    write(out_path, summary(result, x, out, seen, moved))
    return 0


class Spectral(nn.Layer):
    """A fixed STFT Conv1D (a windowed DFT bank, no bias, weight.stop_gradient = True), log
    power, then a trainable Conv1D with a bias, a BatchNorm1D and a Linear head."""

    def __init__(self):
        super().__init__()
        n, bins = 16, 4
        t, f = np.arange(n), np.arange(1, bins + 1)
        phase = 2 * np.pi * np.outer(f, t) / n
        bank = np.concatenate([np.cos(phase), np.sin(phase)]) * np.hanning(n)
        self.stft = nn.Conv1D(1, 2 * bins, n, stride=4, bias_attr=False)
        self.stft.weight.set_value(bank[:, None, :].astype("float32"))
        self.stft.weight.stop_gradient = True
        self.conv = nn.Conv1D(2 * bins, 12, 3, padding=1)
        self.bn = nn.BatchNorm1D(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, audio):
        h = paddle.log(paddle.square(self.stft(audio)) + 1.0)
        h = nn.functional.relu(self.bn(self.conv(h)))
        return self.fc(h.mean(-1))


def fixed(out_path: str) -> int:
    from onnx_lsuv.frameworks.paddle import lsuv_layer

    paddle.seed(0)
    model = Spectral()
    off_defaults(model)
    x = np.random.default_rng(2).standard_normal((32, 1, 128)).astype("float32")
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    result = lsuv_layer(model, x, seed=3)
    now = {k: v.numpy() for k, v in model.state_dict().items()}
    moved = [k for k in before if not np.array_equal(before[k], now[k])]
    model.eval()
    seen = {}
    for name in ("conv", "fc"):
        getattr(model, name).register_forward_post_hook(
            lambda lay, inp, out, name=name: seen.__setitem__(name, var(out.numpy())))
    out = model(paddle.to_tensor(x)).numpy()
    facts = summary(result, x, out, seen, moved)
    facts.update(fixed_facts(result, {"stft.weight": before["stft.weight"]}, now))
    write(out_path, facts)
    return 0


def wrong(out_path: str) -> int:
    """Before: paddle2onnx exited -1 on each, and the second call in a process killed it with
    SIGSEGV or SIGFPE in 6 of 33 runs."""
    from onnx_lsuv.frameworks.paddle import lsuv_layer

    paddle.seed(0)
    model = CNN()
    off_defaults(model)
    model.train()
    x = np.random.default_rng(2).standard_normal((16, 3, 12, 12)).astype("float32")
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    calls = [raised(lambda bad=bad: lsuv_layer(model, bad, seed=3))
             for bad in (x[:, [0, 1, 2, 0]], x[..., None])]
    after = {k: v.numpy() for k, v in model.state_dict().items()}
    write(out_path, {"calls": calls, "same": same(before, after),
                     "training": [sub.training for sub in model.sublayers(include_self=True)]})
    return 0


def main(argv):
    if argv[0] == "wrong":
        return wrong(argv[1])
    if argv[0] == "fixed":
        return fixed(argv[1])
    from onnx_lsuv.frameworks.paddle import lsuv_layer

    if argv[0] == "rnn":
        return rnn(argv[1], argv[2])

    paddle.seed(0)
    model = CNN()
    off_defaults(model)
    x = np.random.default_rng(2).standard_normal((32, 3, 12, 12)).astype("float32")
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    result = lsuv_layer(model, x, seed=3)
    moved = [k for k, v in model.state_dict().items() if not np.array_equal(before[k], v.numpy())]
    model.eval()
    seen = {}
    for name, layer in model.named_sublayers():
        if isinstance(layer, (nn.Conv2D, nn.Linear)):
            layer.register_forward_post_hook(
                lambda lay, inp, out, name=name: seen.__setitem__(name, out.numpy()))
    out = model(paddle.to_tensor(x)).numpy()
    write(argv[0], summary(result, x, out, {k: var(v) for k, v in seen.items()}, moved))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
