"""The PyTorch models of benchmarks/sweep.py, exported to ONNX in one process.

Run by sweep.py in a fresh Python (torch's threads never share the sweep's cores, and torch
is imported once for every export):

    python -c "import sweep_models; sweep_models.export_all('specs.json')"

A spec is a dict: {"kind": "resnet", "depth": 18 | 34 | 50 | 101, "hw": H, "cifar": bool},
{"kind": "fitnet4", "hw": H} or {"kind": "encoder", "d": D, "layers": L, "heads": H,
"features": F, "seq": T}, with
"path" (where the .onnx goes) and "batch" (the export's dummy batch; the batch axis stays
dynamic). ResNets are torch_models.ResNet in torchvision's layout; the encoder is a pre-norm
transformer encoder written by hand (separate q, k, v, o Linears, as Hugging Face exports).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from torch_models import (  # noqa: E402
    BasicBlock,
    Bottleneck,
    ResNet,
    _Attention,
    export_onnx,
    fitnet4,
)

# torchvision's block counts; 18 and 34 use BasicBlock, 50 and 101 Bottleneck
RESNET_BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


def resnet(depth: int, cifar: bool = False, classes: int = 1000) -> nn.Module:
    """ResNet-``depth`` (18, 34, 50, 101); ``cifar``: the 3x3 stride-1 stem without max pool."""
    block = BasicBlock if depth < 50 else Bottleneck
    return ResNet(block, RESNET_BLOCKS[depth], classes, cifar_stem=cifar)


class _EncoderLayer(nn.Module):
    """Pre-norm: self-attention (no mask), then a GELU MLP of 4 d."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = _Attention(d, heads)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class Encoder(nn.Module):
    """A transformer encoder over a sequence of float features (an audio or sensor front end):
    a Linear embedding plus learned positions, ``layers`` pre-norm layers, a final LayerNorm
    and a Linear head on every token."""

    def __init__(self, features: int, d: int, layers: int, heads: int, seq: int,
                 classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(features, d)
        self.position = nn.Parameter(torch.randn(seq, d) * 0.1)
        self.layers = nn.ModuleList(_EncoderLayer(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        with torch.no_grad():  # non-default LayerNorm statistics, as a trained model has
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.embed(x) + self.position[: x.shape[1]]
        for layer in self.layers:
            y = layer(y)
        return self.head(self.norm(y))


def build(spec: dict) -> tuple[nn.Module, tuple[int, ...]]:
    """The module a spec names and the export's input shape."""
    if spec["kind"] == "resnet":
        return resnet(spec["depth"], spec.get("cifar", False)), (spec["batch"], 3, spec["hw"],
                                                                 spec["hw"])
    if spec["kind"] == "fitnet4":
        return fitnet4(), (spec["batch"], 3, spec["hw"], spec["hw"])
    if spec["kind"] == "encoder":
        m = Encoder(spec["features"], spec["d"], spec["layers"], spec["heads"], spec["seq"])
        return m, (spec["batch"], spec["seq"], spec["features"])
    raise ValueError(f"unknown model kind {spec['kind']!r}")


def export_all(specs_json: str) -> None:
    """Export every spec in the JSON list ``specs_json`` to its "path" (seed 0 for each, so a
    model's weights do not depend on which others were exported)."""
    with open(specs_json) as f:
        specs = json.load(f)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    for spec in specs:
        torch.manual_seed(0)
        module, shape = build(spec)
        export_onnx(module, shape, spec["path"])
