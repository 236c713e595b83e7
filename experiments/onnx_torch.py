"""An ONNX graph as a trainable PyTorch module, for the experiments' training runs.

``OnnxModule(model)`` holds every floating-point initializer as an ``nn.Parameter`` (keyed by
its ONNX name) and evaluates the graph's nodes in order with ``torch.nn.functional``, so
autograd trains exactly the weights onnx-lsuv wrote. ``to_onnx_weights`` gives them back.
A BatchNormalization's mean and variance are buffers, not parameters: in training mode
(``module.train()``, torch's default) it normalises with the batch's statistics and updates
them as ``torch.nn.BatchNorm2d`` does (momentum 0.1); in eval mode it uses them, as ONNX
Runtime does.

Why not onnx2torch: it imports torchvision at import time (for its NMS and RoIAlign
converters), and PyPI's torchvision fails to import beside the CPU build of torch; the CUDA
build of torch with a matching torchvision is a 5.5 GB install. The experiment nets use the
ops in ``OPS`` and nothing else; any other op, or an attribute this port does not implement,
is refused by name, and ``max_rel_diff_vs_ort`` checks each converted model against ONNX
Runtime before it is trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper


def _symmetric_pads(pads: list[int] | None, spatial: int) -> list[int]:
    """ONNX's [begin..., end...] pads as torch's one padding per axis."""
    pads = pads or [0] * 2 * spatial
    if pads[:spatial] != pads[spatial:]:
        raise ValueError(f"asymmetric pads {pads} are not supported")
    return pads[:spatial]


def _explicit(auto_pad: str | bytes, op: str) -> None:
    if auto_pad not in ("NOTSET", b"NOTSET"):
        raise ValueError(f"{op} auto_pad={auto_pad!r} is not supported")


def _conv(x, w, b=None, *, kernel_shape=None, pads=None, strides=None, dilations=None, group=1,
          auto_pad="NOTSET"):
    """ONNX Conv (1-D to 3-D, grouped, explicit pads)."""
    _explicit(auto_pad, "Conv")
    spatial = w.dim() - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return conv(x, w, b, stride=strides or 1, dilation=dilations or 1,
                padding=_symmetric_pads(pads, spatial), groups=group)


def _gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
    """ONNX Gemm: alpha * A' B' + beta * C."""
    y = alpha * ((a.t() if transA else a) @ (b.t() if transB else b))
    return y if c is None else y + beta * c


def _max_pool(x, *, kernel_shape, pads=None, strides=None, ceil_mode=0, dilations=None,
              auto_pad="NOTSET", storage_order=0):
    """ONNX MaxPool (its first output; explicit pads)."""
    _explicit(auto_pad, "MaxPool")
    spatial = len(kernel_shape)
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
    return pool(x, kernel_shape, stride=strides or 1, ceil_mode=bool(ceil_mode),
                padding=_symmetric_pads(pads, spatial), dilation=dilations or 1)


def _split(x, split=None, *, axis=0, num_outputs=None, n_out):
    """ONNX Split: the sizes given, or equal parts (the last one smaller, as ONNX says)."""
    if split is not None:
        return torch.split(x, [int(s) for s in split], dim=axis)
    size = math.ceil(x.shape[axis] / n_out)
    return torch.split(x, [size] * (n_out - 1) + [x.shape[axis] - size * (n_out - 1)], dim=axis)


def _max(*xs):
    """ONNX Max: elementwise over any number of inputs."""
    y = xs[0]
    for x in xs[1:]:
        y = torch.maximum(y, x)
    return y


def _batch_norm(x, scale, bias, mean, var, *, epsilon=1e-5, momentum=0.9, training=False):
    """ONNX BatchNormalization (inference form). ``training``: the module's mode, not the
    node's; ONNX's momentum (the weight of the old statistic) is not torch's, which is left
    at BatchNorm2d's default."""
    del momentum
    return F.batch_norm(x, mean, var, scale, bias, training=training, momentum=0.1, eps=epsilon)


# op type -> function(*inputs, **attributes) returning one tensor, or a tuple for multi-output
OPS: dict[str, Callable] = {
    "Add": torch.add,
    "BatchNormalization": _batch_norm,
    "Conv": _conv,
    "Gemm": _gemm,
    "Relu": lambda x: F.relu(x),
    "LeakyRelu": lambda x, *, alpha=0.01: F.leaky_relu(x, alpha),
    "Tanh": torch.tanh,
    "Sigmoid": torch.sigmoid,
    "Max": _max,
    "MaxPool": _max_pool,
    "GlobalMaxPool": lambda x: torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True),
    "Flatten": lambda x, *, axis=1: x.reshape(int(np.prod(x.shape[:axis])), -1),
    "Split": _split,
}


class OnnxModule(torch.nn.Module):
    """A single-input, single-output ONNX graph of ``OPS``, evaluated node by node in torch.

    Args:
        model: The ModelProto. Its float initializers become parameters; others (such as
            Split sizes) stay constant tensors.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        graph = model.graph
        unknown = sorted({f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx")
                          else n.op_type for n in graph.node} - set(OPS))
        if unknown:
            raise ValueError(f"ops {unknown} are not supported; supported: {sorted(OPS)}")
        inits = {t.name for t in graph.initializer}
        inputs = [i.name for i in graph.input if i.name not in inits]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise ValueError("only single-input, single-output graphs are supported")
        self.input_name, self.output_name = inputs[0], graph.output[0].name
        # (op, inputs, outputs, attributes), parsed once
        self.steps = [(n.op_type, list(n.input), list(n.output),
                       {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute})
                      for n in graph.node]
        self.weights = torch.nn.ParameterDict()
        self.names: dict[str, str] = {}  # ONNX name -> key in self.weights (no dots allowed)
        self.constants: dict[str, torch.Tensor] = {}
        self.statistics: dict[str, str] = {}  # ONNX name -> buffer name: BN mean, variance
        running = {name for n in graph.node if n.op_type == "BatchNormalization"
                   for name in n.input[3:5]}
        for t in graph.initializer:
            array = numpy_helper.to_array(t)
            if t.name in running:
                self.statistics[t.name] = key = f"s{len(self.statistics)}"
                self.register_buffer(key, torch.from_numpy(array.copy()))
            elif np.issubdtype(array.dtype, np.floating):
                self.names[t.name] = key = f"p{len(self.names)}"
                self.weights[key] = torch.nn.Parameter(torch.from_numpy(array.copy()))
            else:
                self.constants[t.name] = torch.from_numpy(array.copy())

    def parameter(self, onnx_name: str) -> torch.nn.Parameter:
        """The parameter that holds initializer ``onnx_name``."""
        return self.weights[self.names[onnx_name]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {self.input_name: x, **self.constants}
        env.update({name: self.weights[key] for name, key in self.names.items()})
        env.update({name: getattr(self, key) for name, key in self.statistics.items()})
        for op, inputs, outputs, attrs in self.steps:
            args = [env[name] if name else None for name in inputs]
            while args and args[-1] is None:
                args.pop()
            if op == "Split":
                attrs = {**attrs, "n_out": len(outputs)}
            elif op == "BatchNormalization":
                attrs = {**attrs, "training": self.training}
            out = OPS[op](*args, **attrs)
            env.update(zip(outputs, out if isinstance(out, tuple) else (out,)))
        return env[self.output_name]

    def to_onnx_weights(self) -> dict[str, np.ndarray]:
        """The current parameters and BatchNormalization statistics, by ONNX initializer
        name."""
        out = {name: self.weights[key].detach().numpy().copy()
               for name, key in self.names.items()}
        out.update({name: getattr(self, key).numpy().copy()
                    for name, key in self.statistics.items()})
        return out


def cpu_session(model: onnx.ModelProto):
    """A plain one-thread ONNX Runtime CPU session (each run is one thread, beside others)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def max_rel_diff_vs_ort(model: onnx.ModelProto, module: OnnxModule, x: np.ndarray) -> float:
    """max |torch - ONNX Runtime| / max |ONNX Runtime| over the output on ``x``: the conversion
    check (relative, since an exploding init's outputs can be huge)."""
    sess = cpu_session(model)
    (expected,) = sess.run([module.output_name], {module.input_name: x})
    mode = module.training
    module.eval()  # BatchNormalization on its statistics, as ONNX Runtime computes it
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    module.train(mode)
    return float(np.max(np.abs(got - expected)) / max(float(np.max(np.abs(expected))), 1e-30))
