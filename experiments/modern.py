"""One modern net, beyond the paper: a small vision transformer on the digits, in PyTorch.

It is initialised either by PyTorch's own defaults or by onnx-lsuv the way a user would do it:
``onnx_lsuv.frameworks.torch.lsuv_module`` exports the module to ONNX, runs LSUV on the export
and writes the new weights back into the module's own parameters by name. Then the same module
trains in PyTorch with AdamW, as vision transformers are trained today.

The net: the 8x8 digit as 16 patches of 2x2 pixels, a linear patch embedding (dim 64) with a
learned position embedding, 4 pre-LayerNorm blocks (4-head self-attention with separate q, k
and v projections, then an MLP 64 -> 128 -> 64 with GELU), a final LayerNorm, the mean over
the tokens, and a linear head to the 10 classes: 26 Linear layers, 0.14 M parameters.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from onnx_torch import cpu_session
from training import RunConfig, RunResult, digits_split, gradient_ratios, lsuv_batch, train

MODERN_INITS = ("default", "lsuv")  # PyTorch's own init, or onnx-lsuv's LSUV
PATCH, DIM, DEPTH, HEADS, MLP = 2, 64, 4, 4, 128


class Block(nn.Module):
    """A transformer block with the ViT's layout (separate q, k, v and out-projections; an MLP
    with GELU): pre-LN, x + f(LN(x)), or post-LN, LN(x + f(x)); causal or not. ``logits`` is
    an nn.Identity the attention logits pass through before the mask and the Softmax: a place
    for a forward hook that exports to nothing."""

    def __init__(self, dim: int, heads: int, mlp: int, pre_ln: bool, causal: bool = False,
                 context: int = 0) -> None:
        super().__init__()
        self.pre_ln, self.causal, self.heads = pre_ln, causal, heads
        self.scale = 1.0 / math.sqrt(dim // heads)
        self.norm1 = nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)
        self.logits = nn.Identity()
        if causal:
            self.register_buffer("mask", torch.ones(context, context, dtype=torch.bool).tril(),
                                 persistent=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        return x.reshape(n, t, self.heads, d // self.heads).transpose(1, 2)

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(h)), self._split(self.k(h)), self._split(self.v(h))
        att = self.logits(q @ k.transpose(-2, -1) * self.scale)
        if self.causal:
            t = h.shape[1]
            att = att.masked_fill(~self.mask[:t, :t], float("-inf"))
        return self.proj((torch.softmax(att, dim=-1) @ v).transpose(1, 2).reshape(h.shape))

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.attention(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attention(x))
        return self.norm2(x + self.mlp(x))


class ViT(nn.Module):
    """The small vision transformer above; input (batch, 8, 8) standardised pixels."""

    def __init__(self, classes: int = 10, image: int = 8) -> None:
        super().__init__()
        self.tokens = (image // PATCH) ** 2
        self.embed = nn.Linear(PATCH * PATCH, DIM)
        self.pos = nn.Parameter(torch.zeros(1, self.tokens, DIM))
        nn.init.trunc_normal_(self.pos, std=0.02)  # as timm's ViT does
        self.blocks = nn.ModuleList(Block(DIM, HEADS, MLP, pre_ln=True) for _ in range(DEPTH))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, side = x.shape[0], x.shape[-1] // PATCH
        x = x.reshape(n, side, PATCH, side, PATCH).transpose(2, 3).reshape(
            n, side * side, PATCH * PATCH)
        x = self.embed(x) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


def vit_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits split as (n, 8, 8) images, standardised with the training set's statistics."""
    x_tr, y_tr, x_te, y_te = digits_split()
    mean, std = x_tr.mean(), x_tr.std()
    return (((x_tr - mean) / std).astype(np.float32), y_tr,
            ((x_te - mean) / std).astype(np.float32), y_te)


def linears(module: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear layer, by its name in the module."""
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def output_variances(module: nn.Module, x: np.ndarray) -> dict[str, float]:
    """Each Linear layer's output variance on ``x`` (float64), from PyTorch forward hooks:
    measured apart from onnx-lsuv and its ONNX Runtime sessions."""
    seen: dict[str, float] = {}
    hooks = [m.register_forward_hook(
        lambda _m, _i, out, name=name: seen.__setitem__(
            name, float(torch.var(out.double(), correction=0))))
        for name, m in linears(module).items()]
    with torch.no_grad():
        module(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    return seen



def round_trip_diff(module: nn.Module, model, probe: np.ndarray) -> float:
    """The round trip, checked: the largest difference between the module with the weights
    written back and ONNX Runtime on the initialised ONNX ``model``, on ``probe``, relative to
    the output's largest value. Leaves the module in eval mode."""
    (expected,) = cpu_session(model).run(None, {model.graph.input[0].name: probe})
    module.eval()
    with torch.no_grad():
        got = module(torch.from_numpy(probe)).numpy()
    return float(np.max(np.abs(got - expected)) / max(float(np.max(np.abs(expected))), 1e-30))

def run_modern(cfg: RunConfig) -> RunResult:
    """Initialise (PyTorch's default, or LSUV through the export round trip) and train."""
    from onnx_lsuv.frameworks.torch import lsuv_module

    if cfg.init not in MODERN_INITS:
        raise ValueError(f"the modern net's init is one of {MODERN_INITS}, not {cfg.init!r}")
    res = RunResult(config=asdict(cfg))
    x_tr, y_tr, x_te, y_te = vit_data()
    if cfg.budget.train_subset:
        x_tr, y_tr = x_tr[:cfg.budget.train_subset], y_tr[:cfg.budget.train_subset]
    torch.manual_seed(cfg.seed)
    module = ViT()
    t = time.perf_counter()
    if cfg.init == "lsuv":
        batch = lsuv_batch(x_tr, cfg.lsuv_batch)
        done = lsuv_module(module, torch.from_numpy(batch),
                           exporter="torchscript", seed=cfg.seed, tol=cfg.tol,
                           max_iter=cfg.max_iter, provider="cpu", threads=1)
        res.lsuv_converged = done.report.converged
        res.lsuv_tries = sum(layer.tries for layer in done.report.layers)
        # (exported with the batch's size: as many test images)
        res.conversion_diff = round_trip_diff(module, done.model, x_te[:len(batch)])
    else:
        res.conversion_diff = None  # nothing converted: PyTorch's module as it was built
    res.init_s = time.perf_counter() - t
    layers = {name: m.weight for name, m in linears(module).items()}
    res.weight_std = {name: float(w.detach().double().std(correction=0))
                      for name, w in layers.items()}
    res.test_var_worst = max(abs(v - 1.0) for v in output_variances(module, x_te).values())
    res.grad_ratio = gradient_ratios(module, layers, x_tr, y_tr)
    res.train_s = train(module, cfg.budget, cfg.seed, x_tr, y_tr, x_te, y_te, res, layers)
    return res

