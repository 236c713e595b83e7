"""Export small Paddle models to ONNX with paddle2onnx (through paddle.onnx.export).

Usage: POLYGRAPHY_AUTOINSTALL_DEPS=0 /work/fw/paddle/bin/python export_paddle.py OUTDIR [NAME ...]

Writes OUTDIR/<name>.onnx, OUTDIR/<name>.npy (float32 input batch, cnn: [16, 3, 12, 12] NCHW)
and OUTDIR/ref/<name>.npy (Paddle's own eval-mode output). Note: paddle2onnx's default
Polygraphy constant folding sets POLYGRAPHY_AUTOINSTALL_DEPS=1 itself (paddle2onnx/convert.py),
so on a venv without onnxruntime / onnx_graphsurgeon / sympy it pip-installs them on the
first run. Weights: paddle.seed(0) default init;
every bias ~ N(0, 1); BatchNorm2D gets non-default running mean/variance, weight and bias.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("POLYGRAPHY_AUTOINSTALL_DEPS", "0")

import numpy as np  # noqa: E402
import paddle  # noqa: E402
from paddle import nn  # noqa: E402

from _runner import run_models  # noqa: E402

OPSET = 17
BATCH = 16


class CNN(nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2D(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2D(8)
        self.conv2 = nn.Conv2D(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 6 * 6, 10)

    def forward(self, x):  # [N, 3, 12, 12]
        x = nn.functional.relu(self.bn1(self.conv1(x)))
        x = nn.functional.relu(self.conv2(x))
        return self.fc(paddle.flatten(x, 1))


class LSTM(nn.Layer):
    """Extra (not in the brief's list): paddle.nn.LSTM, batch-major, one layer."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 10)

    def forward(self, x):  # [N, 8, 6]
        y, _ = self.lstm(x)
        return y


def randomise(model, seed):
    rng = np.random.default_rng(seed)
    for name, p in model.state_dict().items():
        shape = tuple(p.shape)
        leaf = name.split(".")[-1]
        is_bn = name.startswith("bn")
        if leaf == "_mean":
            v = rng.normal(0.5, 0.5, shape)
        elif leaf == "_variance":
            v = rng.uniform(0.5, 2.0, shape)
        elif is_bn and leaf == "weight":
            v = rng.uniform(0.5, 1.5, shape)
        elif leaf == "bias" or leaf.startswith("bias_"):
            v = rng.normal(0.0, 1.0, shape)
        else:
            continue
        p.set_value(v.astype(np.float32))


# name: (class, input shape without batch, extra paddle2onnx options)
MODELS = {
    "cnn": (CNN, (3, 12, 12), {}),
    # (with {"enable_optimize": False}, i.e. no Polygraphy folding, the graph is the same:
    # paddle2onnx itself already folds the conv bias Reshape into a [1,C,1,1] initializer)
    "lstm": (LSTM, (8, 6), {}),
}


def export(name, cls, shape, options, outdir, seed):
    paddle.seed(seed)
    model = cls()
    randomise(model, seed)
    model.eval()
    x = np.random.default_rng(1000 + seed).standard_normal((BATCH,) + shape).astype(np.float32)
    ref = model(paddle.to_tensor(x)).numpy()
    spec = [paddle.static.InputSpec([None, *shape], "float32", "x")]
    prefix = os.path.join(outdir, name)
    paddle.onnx.export(model, prefix, input_spec=spec, opset_version=OPSET, **options)
    np.save(prefix + ".npy", x)
    np.save(os.path.join(outdir, "ref", name + ".npy"), ref.astype(np.float32))
    np.savez(os.path.join(outdir, "params", name + ".npz"),
             **{k: v.numpy() for k, v in model.state_dict().items()})
    return list(model.state_dict().keys())


def main(argv):
    return run_models(argv, "out_paddle", MODELS, export)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
