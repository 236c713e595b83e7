"""The LSUV paper's Table 1 architectures as ONNX graphs, built with onnx.helper.

FitNet-MNIST, FitNet-1, FitNet-4 and FitResNet-4 (Mishkin & Matas 2016, Table 1, after Romero et
al. 2015), with a choice of activation: relu, vlrelu (leaky ReLU with slope 0.333), tanh,
sigmoid, maxout (max of two feature maps: each conv or fc produces twice the channels), and
optionally a BatchNormalization before or after every hidden non-linearity (the paper's
Table 5). Weights are drawn from N(0, 0.01^2) (an arbitrary starting point LSUV replaces),
biases 0. Convs are 3x3, padding 1, as in the paper; pools are max pools.

FitResNet-4, as the paper's Section 5.1 describes it: "The output of each even convolutional
layer is summed with the output of the previous non-linearity layer and then fed into the next
non-linearity". Table 1 marks those convs "-> sum": the 2nd and 4th of the first block (32, 32,
48, 48, 48 channels) and every second one after. A ("sum", c) conv here is such a conv: its
output plus its own input, then the activation. With maxout the shortcut is added to both
pieces, max(a + s, b + s) = max(a, b) + s, so the sum still comes before the non-linearity.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # accepted by onnxruntime >= 1.14; the newest onnx would write 14 otherwise
ACTIVATIONS = ("relu", "vlrelu", "tanh", "sigmoid", "maxout")
VLRELU_SLOPE = 0.333  # the negative slope of the paper's very leaky ReLU

# ("conv", out_channels) | ("sum", out_channels: a conv summed with its input, see above)
# | ("fc", out_units) | ("pool", kernel, stride) | ("gpool",).
# "input" is (channels, height, width), or (features,) for an MLP.
_C = "conv"
_S = "sum"
BN_POSITIONS = ("before", "after")  # BatchNormalization before or after the non-linearity
ARCHITECTURES: dict[str, dict] = {
    "fitnet_mnist": {
        "input": (1, 28, 28),
        "layers": [(_C, 16), (_C, 16), ("pool", 4, 2), (_C, 16), (_C, 16), ("pool", 4, 2),
                   (_C, 12), (_C, 12), ("pool", 2, 2)],
    },
    "fitnet1": {
        "input": (3, 32, 32),
        "layers": [(_C, 16)] * 3 + [("pool", 2, 2)] + [(_C, 32)] * 3 + [("pool", 2, 2)]
        + [(_C, 48)] * 3 + [("gpool",)],
    },
    "fitnet4": {  # as in the authors' Caffe file (LSUVinit, fitnet4_relu_lsuv.prototxt)
        "input": (3, 32, 32),
        "layers": [(_C, 32)] * 3 + [(_C, 48)] * 2 + [("pool", 2, 2)] + [(_C, 80)] * 6
        + [("pool", 2, 2)] + [(_C, 128)] * 6 + [("gpool",), ("fc", 500)],
    },
    # Table 1's column lists 5 convs per block; as its FitNet-4 column also does, where the
    # paper's Table 8 names 6 in the second and third blocks. Here the second and third
    # blocks have 6, so that both nets have FitNet-4's 17 convs.
    "fitresnet4": {
        "input": (3, 32, 32),
        "layers": [(_C, 32), (_S, 32), (_C, 48), (_S, 48), (_C, 48), ("pool", 2, 2)]
        + [(_C, 80), (_S, 80)] * 3 + [("pool", 2, 2)]
        + [(_C, 128), (_S, 128)] * 3 + [("gpool",), ("fc", 500)],
    },
}
# Deep, thin nets for the experiments (experiments/README.md), sized for scikit-learn's 8x8
# digits on 2 CPU cores: FitNet-4's 17 convs and hidden fc at half width (fc 500 -> 128) on
# 16x16 inputs, and a 25-layer plain MLP on the 64 raw pixels.
EXPERIMENT_ARCHITECTURES: dict[str, dict] = {
    "fitnet4_digits": {
        "input": (1, 16, 16),
        "layers": [(_C, 16)] * 3 + [(_C, 24)] * 2 + [("pool", 2, 2)] + [(_C, 40)] * 6
        + [("pool", 2, 2)] + [(_C, 64)] * 6 + [("gpool",), ("fc", 128)],
    },
    "mlp25_digits": {
        "input": (64,),
        "layers": [("fc", 64)] * 24,
    },
    # FitResNet-4 (above) at fitnet4_digits's widths: 16, 24, 40, 64 channels, fc 128.
    "fitresnet4_digits": {
        "input": (1, 16, 16),
        "layers": [(_C, 16), (_S, 16), (_C, 24), (_S, 24), (_C, 24), ("pool", 2, 2)]
        + [(_C, 40), (_S, 40)] * 3 + [("pool", 2, 2)]
        + [(_C, 64), (_S, 64)] * 3 + [("gpool",), ("fc", 128)],
    },
}
ARCHITECTURES.update(EXPERIMENT_ARCHITECTURES)


class _Builder:
    def __init__(self, seed: int, bn: str | None = None) -> None:
        self.rng = np.random.default_rng(seed)
        self.bn = bn
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{hint}{self.n}"

    def weight(self, name: str, shape: tuple[int, ...]) -> str:
        w = (self.rng.standard_normal(shape) * 0.01).astype(np.float32)
        self.inits.append(numpy_helper.from_array(w, name))
        return name

    def bias(self, name: str, n: int) -> str:
        self.inits.append(numpy_helper.from_array(np.zeros(n, np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str, n_out: int = 1, **attrs) -> list[str]:
        base = self.name(hint)
        outs = [base] if n_out == 1 else [f"{base}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=base, **attrs))
        return outs

    def conv(self, x: str, c_in: int, c_out: int, act: str | None,
             shortcut: str | None = None) -> str:
        """A 3x3 conv and its activation; with ``shortcut``, summed with it before the
        activation (after a maxout's max, which is the same)."""
        k = self.n + 1
        mult = 2 if act == "maxout" else 1
        w = self.weight(f"conv{k}.weight", (c_out * mult, c_in, 3, 3))
        b = self.bias(f"conv{k}.bias", c_out * mult)
        (y,) = self.node("Conv", [x, w, b], "conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        return self.activation(y, act, c_out * mult, shortcut)

    def fc(self, x: str, fan_in: int, n_out: int, act: str | None) -> str:
        k = self.n + 1
        mult = 2 if act == "maxout" else 1
        w = self.weight(f"fc{k}.weight", (n_out * mult, fan_in))
        b = self.bias(f"fc{k}.bias", n_out * mult)
        (y,) = self.node("Gemm", [x, w, b], "fc", transB=1)
        return y if act is None else self.activation(y, act, n_out * mult)

    def batchnorm(self, x: str, channels: int) -> str:
        """An inference BatchNormalization with fresh statistics (scale 1, shift 0, mean 0,
        variance 1); a training framework uses the batch's own statistics instead."""
        k = self.n + 1
        names = []
        for part, value in (("scale", 1.0), ("shift", 0.0), ("mean", 0.0), ("var", 1.0)):
            names.append(f"bn{k}.{part}")
            self.inits.append(numpy_helper.from_array(np.full(channels, value, np.float32),
                                                      names[-1]))
        return self.node("BatchNormalization", [x, *names], "bn", epsilon=1e-5)[0]

    def activation(self, y: str, act: str, channels: int, shortcut: str | None = None) -> str:
        """The non-linearity on a layer's ``channels`` outputs, with the shortcut's sum and
        this net's BatchNormalization where they go."""
        if self.bn == "before":
            y = self.batchnorm(y, channels)
        if act == "maxout":  # max(a + s, b + s) = max(a, b) + s: the sum may follow the max
            y = self.act(y, act)
            if shortcut is not None:
                y = self.node("Add", [y, shortcut], "add")[0]
            channels //= 2
        else:
            if shortcut is not None:
                y = self.node("Add", [y, shortcut], "add")[0]
            y = self.act(y, act)
        return self.batchnorm(y, channels) if self.bn == "after" else y

    def act(self, y: str, act: str | None) -> str:
        if act is None:
            return y
        if act == "relu":
            return self.node("Relu", [y], "relu")[0]
        if act == "vlrelu":
            return self.node("LeakyRelu", [y], "vlrelu", alpha=VLRELU_SLOPE)[0]
        if act == "tanh":
            return self.node("Tanh", [y], "tanh")[0]
        if act == "sigmoid":
            return self.node("Sigmoid", [y], "sigmoid")[0]
        if act == "maxout":
            a, b = self.node("Split", [y], "maxout_split", n_out=2, axis=1)
            return self.node("Max", [a, b], "maxout")[0]
        raise ValueError(f"unknown activation {act!r}; choose one of {ACTIVATIONS}")


def _flat(b: _Builder, x: str, shape: tuple[int, ...]) -> str:
    """``x`` as (batch, features): a Flatten node unless it already is."""
    return x if len(shape) == 1 else b.node("Flatten", [x], "flatten", axis=1)[0]


def build(arch: str, activation: str = "relu", classes: int = 10, seed: int = 0,
          batch: int | str = "N", bn: str | None = None) -> onnx.ModelProto:
    """Build one Table 1 architecture.

    Args:
        arch: One of ``ARCHITECTURES``: fitnet_mnist, fitnet1, fitnet4, fitresnet4, or an
            experiment net (fitnet4_digits, fitresnet4_digits, mlp25_digits).
        activation: One of ``ACTIVATIONS``. Defaults to "relu".
        classes: Outputs of the final fc layer. Defaults to 10.
        seed: Seed of the N(0, 0.01^2) starting weights. Defaults to 0.
        batch: The batch dimension: a number or a symbolic name. Defaults to "N".
        bn: "before" or "after": a BatchNormalization before or after every hidden
            non-linearity (each conv's and the hidden fc's; none on the last fc). Defaults to
            None, no BatchNormalization.

    Returns:
        A checked ModelProto (opset 17, IR version 8) with input "input" and output "logits".
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {list(ARCHITECTURES)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")
    if bn not in (None, *BN_POSITIONS):
        raise ValueError(f"unknown bn {bn!r}; choose one of {BN_POSITIONS} or None")
    spec = ARCHITECTURES[arch]
    shape = tuple(spec["input"])  # of the current tensor, without the batch
    b = _Builder(seed, bn)
    x = "input"
    for layer in spec["layers"]:
        kind = layer[0]
        if kind in (_C, _S):
            if kind == _S and layer[1] != shape[0]:
                raise ValueError(f"{arch}: a summed conv keeps its input's {shape[0]} channels,"
                                 f" not {layer[1]}")
            x = b.conv(x, shape[0], layer[1], activation, x if kind == _S else None)
            shape = (layer[1], *shape[1:])
        elif kind == "fc":
            x = b.fc(_flat(b, x, shape), int(np.prod(shape)), layer[1], activation)
            shape = (layer[1],)
        elif kind == "pool":
            _, k, s = layer
            pad = max(0, (k - s)) // 2
            (x,) = b.node("MaxPool", [x], "pool", kernel_shape=[k, k], strides=[s, s],
                          pads=[pad, pad, pad, pad])
            shape = (shape[0], *((d + 2 * pad - k) // s + 1 for d in shape[1:]))
        elif kind == "gpool":
            (x,) = b.node("GlobalMaxPool", [x], "gpool")
            shape = (shape[0], 1, 1)
    b.fc(_flat(b, x, shape), int(np.prod(shape)), classes, None)
    b.nodes[-1].output[0] = "logits"
    graph = helper.make_graph(
        b.nodes, arch,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, *spec["input"]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        initializer=b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION, producer_name="onnx-lsuv sample_models")
    model.doc_string = (f"{arch} ({activation}{f', BN {bn} it' if bn else ''}) after Table 1 "
                        "of Mishkin & Matas 2016")
    onnx.checker.check_model(model)
    return model


def digits_batch(n: int = 128, size: int = 28, seed: int = 0) -> np.ndarray:
    """A real batch: scikit-learn's bundled handwritten digits, resized to (n, 1, size, size).

    Pixels are scaled to [0, 1], resized with cubic spline interpolation, then standardised to
    zero mean and unit variance over the batch. The n images are drawn without replacement.
    """
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float64) / 16.0  # (1797, 8, 8)
    idx = np.random.default_rng(seed).choice(len(images), size=n, replace=False)
    big = resize_digits(images[idx], size)
    big = (big - big.mean()) / big.std()
    return big[:, None].astype(np.float32)


def resize_digits(images: np.ndarray, size: int) -> np.ndarray:
    """(n, 8, 8) digit images resized to (n, size, size) with cubic spline interpolation."""
    from scipy.ndimage import zoom

    return np.stack([zoom(im, size / 8.0, order=3) for im in images])
