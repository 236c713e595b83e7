"""Pure-PyTorch reference models for the LSUV benchmarks, plus ONNX export.

No torchvision: every network is written by hand.

* ``fitnet4``       -- FitNet-4 (Romero et al. 2014) in the ReLU form used by the
                       LSUV paper's own Caffe files (ducha-aiki/LSUVinit,
                       examples/lsuv/cifar10/fitnet4_relu_lsuv.prototxt):
                       conv3x3 32,32,32,48,48 - maxpool 2/2 -
                       conv3x3 80 x6 - maxpool 2/2 - conv3x3 128 x6 -
                       global max pool (8x8) - fc 500 - ReLU - fc classes.
                       17 conv + 2 fc = 19 LSUV-able layers, 1.28M params
                       (the paper's ~2.5M counts the 2-piece maxout version).
* ``resnet18_like`` -- ResNet-18 (BasicBlock [2,2,2,2]), torchvision layout.
* ``resnet50_like`` -- ResNet-50 (Bottleneck [3,4,6,3], stride on the 3x3 as in
                       torchvision "v1.5"), torchvision layout.
* ``caffenet_like`` -- BVLC CaffeNet (AlexNet variant: pool before LRN, grouped
                       conv2/4/5), 227x227 input, fc6 4096x9216, 61M params.
                       LRN exports as one ONNX ``LRN`` node.

Module registration order equals execution order in every model (this matters:
``lsuv`` 0.3.0 walks layers in ``Module.apply`` order, i.e. registration order).

All ReLUs are out-of-place on purpose. ``lsuv`` 0.3.0 keeps the hooked layer
output as ``output.detach().cpu()`` -- on CPU that aliases the tensor, so an
``nn.ReLU(inplace=True)`` right after a conv/linear rewrites it before ``.std()``
is taken and lsuv then normalises the *post-ReLU* std to 1 (pre-activation std
ends up ~1.7). With out-of-place ReLUs lsuv measures the raw conv/linear output,
as the paper's Caffe code and an ONNX graph (separate Conv output tensor) do.

``export_onnx`` writes an opset-17 / IR-8 ONNX file with the TorchScript
exporter, with BatchNorm kept as separate ``BatchNormalization`` nodes (not folded
into the convolutions) and initializer names equal to ``state_dict`` names.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = [
    "fitnet4",
    "resnet18_like",
    "resnet50_like",
    "caffenet_like",
    "greedy_decoder",
    "MODELS",
    "DEFAULT_INPUT_SHAPES",
    "export_onnx",
    "verify_onnx",
]


# --------------------------------------------------------------------------- FitNet-4
class FitNet4(nn.Module):
    def __init__(self, in_ch: int = 3, classes: int = 10, dropout: float = 0.0):
        super().__init__()

        def stage(cin: int, widths: Sequence[int]) -> list[nn.Module]:
            layers: list[nn.Module] = []
            for w in widths:
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.ReLU()]
                cin = w
            return layers

        def drop() -> list[nn.Module]:
            return [nn.Dropout(dropout)] if dropout > 0 else []

        self.features = nn.Sequential(
            *drop(),  # the prototxt has a 0.2 dropout on the input as well
            *stage(in_ch, [32, 32, 32, 48, 48]),
            nn.MaxPool2d(2, 2),
            *drop(),
            *stage(48, [80] * 6),
            nn.MaxPool2d(2, 2),
            *drop(),
            *stage(80, [128] * 6),
            nn.AdaptiveMaxPool2d(1),  # "global_pooling: true" (8x8 for 32x32 input)
            *drop(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(128, 500),
            nn.ReLU(),
            *drop(),
            nn.Linear(500, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def fitnet4(in_ch: int = 3, classes: int = 10, dropout: float = 0.0) -> nn.Module:
    """FitNet-4, ReLU version, 32x32 input. ``dropout=0.2`` reproduces the
    prototxt's dropout layers (identity in eval mode, so irrelevant to LSUV)."""
    return FitNet4(in_ch, classes, dropout)


# --------------------------------------------------------------------------- ResNets
def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample  # registered last, runs last (as torchvision)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck],
                 layers: Sequence[int], classes: int = 1000, in_ch: int = 3,
                 cifar_stem: bool = False):
        super().__init__()
        self.inplanes = 64
        if cifar_stem:  # 3x3 stride-1 stem, no max pool: full resolution into layer1
            self.conv1 = nn.Conv2d(in_ch, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_ch, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, classes)
        # torchvision's init: kaiming_normal_(fan_out, relu) for convs, BN 1/0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18_like(classes: int = 1000, in_ch: int = 3) -> nn.Module:
    """ResNet-18: 20 convs (incl. 3 downsample 1x1) + 1 fc = 21 LSUV layers."""
    return ResNet(BasicBlock, [2, 2, 2, 2], classes, in_ch)


def resnet18_cifar(classes: int = 10, in_ch: int = 3) -> nn.Module:
    """ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max pool): 21 LSUV layers, and
    16x the compute of the ImageNet stem at the same input size."""
    return ResNet(BasicBlock, [2, 2, 2, 2], classes, in_ch, cifar_stem=True)


def resnet50_like(classes: int = 1000, in_ch: int = 3) -> nn.Module:
    """ResNet-50: 53 convs (incl. 4 downsample 1x1) + 1 fc = 54 LSUV layers."""
    return ResNet(Bottleneck, [3, 4, 6, 3], classes, in_ch)


# --------------------------------------------------------------------------- CaffeNet
class _LRNFunction(torch.autograd.Function):
    """F.local_response_norm in torch; a single ONNX ``LRN`` node when exported
    (nn.LocalResponseNorm is traced into ~40 Pad/AveragePool/If/... nodes)."""

    @staticmethod
    def forward(ctx, x, size: int, alpha: float, beta: float, k: float):
        return nn.functional.local_response_norm(x, size, alpha, beta, k)

    @staticmethod
    def symbolic(g, x, size, alpha, beta, k):
        return g.op("LRN", x, size_i=size, alpha_f=alpha, beta_f=beta, bias_f=k)


class LRN(nn.Module):
    """Cross-channel LRN, b = a / (k + alpha/size * sum_window a^2)^beta, which is
    the definition shared by Caffe, torch and ONNX ``LRN``. No parameters."""

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LRNFunction.apply(x, self.size, self.alpha, self.beta, self.k)

    def extra_repr(self) -> str:
        return f"{self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


class CaffeNet(nn.Module):
    def __init__(self, classes: int = 1000, in_ch: int = 3, lrn: bool = True,
                 dropout: float = 0.5):
        super().__init__()

        def norm() -> list[nn.Module]:
            # Caffe LRN (ACROSS_CHANNELS, local_size 5, alpha 1e-4, beta 0.75, k 1);
            # torch and ONNX use the same alpha/n scaling as Caffe.
            return [LRN(5, alpha=1e-4, beta=0.75, k=1.0)] if lrn else []

        self.features = nn.Sequential(
            nn.Conv2d(in_ch, 96, 11, stride=4),                 # 227 -> 55
            nn.ReLU(),
            nn.MaxPool2d(3, 2),                                  # 55 -> 27
            *norm(),
            nn.Conv2d(96, 256, 5, padding=2, groups=2),          # 27
            nn.ReLU(),
            nn.MaxPool2d(3, 2),                                  # 27 -> 13
            *norm(),
            nn.Conv2d(256, 384, 3, padding=1),                   # 13
            nn.ReLU(),
            nn.Conv2d(384, 384, 3, padding=1, groups=2),
            nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1, groups=2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),                                  # 13 -> 6
        )
        self.classifier = nn.Sequential(
            nn.Flatten(1),                                       # 256*6*6 = 9216
            nn.Linear(9216, 4096),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(4096, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def caffenet_like(classes: int = 1000, in_ch: int = 3, lrn: bool = True) -> nn.Module:
    """CaffeNet (5 conv + 3 fc, ~61M params), 227x227 input."""
    return CaffeNet(classes, in_ch, lrn)


# --------------------------------------------------------------------------- greedy decoder
class _Attention(nn.Module):
    """Multi-head attention with separate q, k, v, o Linears (as hand-written decoders and
    Hugging Face's export), softmax(q k^T / sqrt(d_head) + mask) v."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, memory: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(b, -1, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(memory)), split(self.v(memory))
        scores = q @ k.transpose(-1, -2) / (d // h) ** 0.5
        if mask is not None:
            scores = scores + mask
        y = torch.softmax(scores, dim=-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class _DecoderLayer(nn.Module):
    """Pre-norm: self-attention (causal), cross-attention to the memory, a GELU MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = _Attention(d, heads)
        self.cross_attn = _Attention(d, heads)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, memory, mask):
        y = self.norm1(x)
        x = x + self.self_attn(y, y, mask)
        x = x + self.cross_attn(self.norm2(x), memory)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm3(x))))


class GreedyDecoder(nn.Module):
    """A small encoder-decoder transformer whose greedy decoding is a Python loop, so that
    ``torch.onnx.export`` unrolls it: each step embeds the tokens so far (an embedding
    Gather of the previous step's ArgMax), runs every decoder layer over the whole prefix
    (no cache: each weight is read by one MatMul per step) and picks the next token. The
    input is a sequence of float features (what an OCR or speech front end hands a decoder);
    the output, every step's logits (batch, steps, vocab)."""

    def __init__(self, features: int = 32, d: int = 48, layers: int = 3, heads: int = 4,
                 vocab: int = 64, steps: int = 16):
        super().__init__()
        self.steps = steps
        self.encode = nn.Linear(features, d)
        self.embed = nn.Embedding(vocab, d)
        self.position = nn.Parameter(torch.randn(steps, d) * 0.1)
        self.layers = nn.ModuleList(_DecoderLayer(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory = self.encode(x)
        tokens = torch.zeros(x.shape[0], 1, dtype=torch.long)  # BOS = 0
        logits = []
        for t in range(self.steps):
            y = self.embed(tokens) + self.position[: t + 1]
            mask = torch.triu(torch.full((t + 1, t + 1), float("-inf")), diagonal=1)
            for layer in self.layers:
                y = layer(y, memory, mask)
            step = self.head(self.norm(y[:, -1]))
            logits.append(step)
            tokens = torch.cat([tokens, step.argmax(-1, keepdim=True)], dim=1)
        return torch.stack(logits, dim=1)


def greedy_decoder(steps: int = 18, layers: int = 2, d: int = 48) -> nn.Module:
    """``GreedyDecoder``: 2 layers, d 48, 18 greedy steps unrolled by the export."""
    return GreedyDecoder(d=d, layers=layers, steps=steps)


MODELS = {
    "fitnet4": fitnet4,
    "resnet18_like": resnet18_like,
    "resnet18_cifar": resnet18_cifar,
    "resnet50_like": resnet50_like,
    "caffenet_like": caffenet_like,
    "greedy_decoder": greedy_decoder,
}

# (N, C, H, W) each model is designed for; the ResNets accept any H, W >= 32.
DEFAULT_INPUT_SHAPES = {
    "fitnet4": (1, 3, 32, 32),
    "resnet18_like": (1, 3, 224, 224),
    "resnet18_cifar": (1, 3, 32, 32),
    "resnet50_like": (1, 3, 224, 224),
    "caffenet_like": (1, 3, 227, 227),
    "greedy_decoder": (1, 24, 32),  # (N, source length, features)
}


# --------------------------------------------------------------------------- export
def export_onnx(module: nn.Module, input_shape: Sequence[int], path: str | os.PathLike,
                opset: int = 17, dynamic_batch: bool = True) -> str:
    """Export ``module`` (in eval mode) to ``path`` and return the path.

    * TorchScript exporter (``dynamo=False``; the dynamo exporter would need
      onnxscript, which is not installed, and renames/optimises the graph).
    * ``training=PRESERVE`` with the module in eval mode and
      ``do_constant_folding=False``: BatchNorm stays a ``BatchNormalization`` node
      (``TrainingMode.EVAL`` would run the eval peephole pass, which folds
      Conv+BN and renames the conv weights). Dropout disappears (eval mode).
    * Initializer names are the ``state_dict`` names, e.g. ``layer1.0.conv1.weight``,
      ``layer1.0.bn1.running_mean`` (every parameter and BN buffer except
      ``num_batches_tracked``); initializers are not listed in ``graph.input``.
    * Input ``"input"``, output ``"output"``; batch axis dynamic if ``dynamic_batch``.
    * ``ir_version`` is forced to 8 so onnxruntime 1.31 accepts the file.
    """
    import onnx

    path = os.fspath(path)
    was_training = module.training
    module.eval()
    dummy = torch.randn(*input_shape)
    kwargs = dict(
        export_params=True,
        opset_version=opset,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        input_names=["input"],
        output_names=["output"],
        # True disables the exporter's deduplicate_initializers pass, which would
        # otherwise merge equal-valued tensors (all BN gammas = 1, betas = 0, ...)
        # into one initializer + Identity nodes, losing the parameter names.
        # The initializers are removed from graph.input again below.
        keep_initializers_as_inputs=True,
    )
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"input": {0: "N"}, "output": {0: "N"}}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    try:
        with torch.no_grad():
            torch.onnx.export(module, (dummy,), path, **kwargs)
    finally:
        module.train(was_training)

    model = onnx.load(path)
    init_names = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in init_names]
    del model.graph.input[:]
    model.graph.input.extend(graph_inputs)
    model.ir_version = 8
    onnx.save(model, path)
    return path


def verify_onnx(module: nn.Module, path: str | os.PathLike, input_shape: Sequence[int],
                seed: int = 0, rtol: float = 1e-3, atol: float = 1e-4) -> float:
    """Run ``path`` in onnxruntime (CPU) and ``module`` in torch (eval, no_grad) on
    the same random batch; raise AssertionError unless allclose. Returns max abs diff."""
    import numpy as np
    import onnxruntime as ort

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*input_shape, generator=g)
    was_training = module.training
    module.eval()
    with torch.no_grad():
        ref = module(x).numpy()
    module.train(was_training)
    sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    diff = float(np.max(np.abs(got - ref)))
    scale = float(np.max(np.abs(ref)))
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert np.allclose(got, ref, rtol=rtol, atol=atol * max(1.0, scale)), (diff, scale)
    return diff


if __name__ == "__main__":  # export every model and check it against torch
    import argparse
    import tempfile

    import onnx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="directory for the .onnx files (default: temp)")
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="torch_models_")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    for name, ctor in MODELS.items():
        m = ctor()
        shape = (args.batch,) + DEFAULT_INPUT_SHAPES[name][1:]
        p = export_onnx(m, shape, os.path.join(out, name + ".onnx"))
        diff = verify_onnx(m, p, shape)
        g = onnx.load(p).graph
        ops = sorted({n.op_type for n in g.node})
        params = dict(m.state_dict())
        inits = {i.name for i in g.initializer}
        missing = [k for k in params if k not in inits and not k.endswith("num_batches_tracked")]
        print(f"{name:14s} params={sum(p.numel() for p in m.parameters()):>10,d} "
              f"max|diff|={diff:.2e} nodes={len(g.node)} inits={len(inits)} "
              f"missing_param_names={len(missing)} ops={ops}")
