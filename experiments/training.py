"""One experiment run: build a net in ONNX, initialise it, train it in PyTorch, measure.

The data is scikit-learn's bundled handwritten digits (1797 8x8 images, nothing downloaded),
split once into 1347 training and 450 test images (stratified, ``random_state=0``). Every run
of one architecture gets the same budget: the same epochs, batch size and learning rate
schedule; runs with the same seed also see the training batches in the same order.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import cache

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "sample_models"))
sys.path.insert(0, HERE)

from onnx_lsuv import lsuv_init  # noqa: E402

from fitnets import ARCHITECTURES, build, resize_digits  # noqa: E402
from onnx_torch import OnnxModule, cpu_session, max_rel_diff_vs_ort  # noqa: E402

MODERN_ARCHITECTURES = ("vit_digits",)  # built in PyTorch (modern.py), not in ONNX
INITS = ("lsuv", "orthonormal", "xavier", "msra")
GRAD_VAR_BATCHES = 10  # the paper's Table 10: the gradient's variance over 10 mini-batches
# LSUV beyond the paper (onnx-lsuv's options, issue 18): a variant's name -> its lsuv_init
# keywords. "" is the paper's LSUV.
VARIANTS = {"": {}, "mean0": {"target_mean": 0.0}, "per_channel": {"per_channel": True}}
LSUV_BATCH_SEED = 1234  # the draw of LSUV's batch from the training set: one for every run


@dataclass(frozen=True)
class Budget:
    """How one architecture is trained: the same for every init, activation and seed."""

    epochs: int
    lr: float
    batch: int = 64
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_drop_epoch: int | None = None  # lr x 0.1 from this epoch on (0-based)
    train_subset: int | None = None  # first n training images only (the quick smoke mode)
    optimizer: str = "sgd"  # "sgd" (with momentum) or "adamw" (the modern net)
    # the language model (transformer_study.py): an "epoch" is this many random mini-batches
    # (then one validation pass), and the lr rises linearly over the first warmup_steps
    steps: int | None = None
    warmup_steps: int = 0


@dataclass(frozen=True)
class RunConfig:
    arch: str
    activation: str
    init: str
    seed: int
    budget: Budget
    lsuv_batch: int = 128  # images LSUV measures on (the paper's Table 7 varies it)
    tol: float = 0.1  # onnx-lsuv's defaults: Tol_var 0.1, T_max 10
    max_iter: int = 10
    variant: str = ""  # LSUV only: a key of VARIANTS
    bn: str = ""  # "before" or "after": BatchNormalization by every hidden non-linearity
    study: str = ""  # "transformers": issue 28's study (transformer_study.py); "": the paper's


@dataclass
class RunResult:
    config: dict
    train_loss: list[float] = field(default_factory=list)  # mean over each epoch
    test_acc: list[float] = field(default_factory=list)  # after each epoch
    weight_std: dict[str, float] = field(default_factory=dict)  # per layer label, at init
    grad_ratio: dict[str, float] = field(default_factory=dict)  # |dL/dW| / |W|, at init
    # the variance of dL/dW's entries per layer, averaged over the first GRAD_VAR_BATCHES
    # training mini-batches (the paper's Table 10)
    grad_var: dict[str, float] = field(default_factory=dict)
    epoch_s: list[float] = field(default_factory=list)  # training seconds at each epoch's end
    lsuv_converged: bool | None = None  # onnx-lsuv's own verdict (LSUV runs only)
    lsuv_tries: int | None = None  # rescaling tries onnx-lsuv's report counts, all layers
    test_var_worst: float | None = None  # worst |var - 1| of a layer output on the test set
    conversion_diff: float = 0.0  # max |torch - ORT| / max |ORT| on the output, at init
    diverged: bool = False
    init_s: float = 0.0
    train_s: float = 0.0
    # transformer_study.py: the validation loss after each epoch (the language model), the
    # health statistics at init, and onnx-lsuv's report per layer (name, status, role, ...)
    val_loss: list[float] = field(default_factory=list)
    health: dict = field(default_factory=dict)
    lsuv_layers: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@cache
def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels): 8x8 images in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.images / 16.0, digits.target, test_size=0.25, random_state=0,
        stratify=digits.target)
    return x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64)


@cache
def arch_data(arch: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The split shaped for ``arch``'s input: (64,) raw pixels, or (1, s, s) resized images,
    both standardised with the training set's mean and std, as a real pipeline would."""
    shape = ARCHITECTURES[arch]["input"]
    x_tr, y_tr, x_te, y_te = digits_split()
    if len(shape) == 1:
        x_tr, x_te = x_tr.reshape(len(x_tr), -1), x_te.reshape(len(x_te), -1)
    else:
        x_tr, x_te = (resize_digits(x, shape[-1])[:, None] for x in (x_tr, x_te))
    mean, std = x_tr.mean(), x_tr.std()
    return ((x_tr - mean) / std).astype(np.float32), y_tr, ((x_te - mean) / std).astype(
        np.float32), y_te


def lsuv_batch(x_train: np.ndarray, n: int) -> np.ndarray:
    """The n training images LSUV measures on: a fixed draw, the same for every run."""
    order = np.random.default_rng(LSUV_BATCH_SEED).permutation(len(x_train))
    return x_train[order[:n]]


def target_weights(model: onnx.ModelProto) -> dict[str, str]:
    """Layer label ("conv1", ..., "fc1", ...: the same for every activation) -> the weight
    initializer of that Conv or Gemm node, in graph order."""
    labels, counts = {}, {"Conv": 0, "Gemm": 0}
    for node in model.graph.node:
        if node.op_type in counts:
            counts[node.op_type] += 1
            labels[f"{'conv' if node.op_type == 'Conv' else 'fc'}{counts[node.op_type]}"] = (
                node.input[1])
    return labels


def fan_ins(arch: str, activation: str) -> dict[str, int]:
    """Layer label -> its weight's fan-in (input channels x kernel size)."""
    model = build(arch, activation)
    dims = {t.name: t.dims for t in model.graph.initializer}
    return {label: math.prod(dims[name][1:]) for label, name in target_weights(model).items()}


def worst_variance_error(model: onnx.ModelProto, x: np.ndarray,
                         per_channel: bool = False) -> float:
    """Largest |var - 1| of a Conv/Gemm output on ``x`` (of any of its channels, axis 1, with
    ``per_channel``: what LSUV per channel sets).

    Deliberately apart from onnx-lsuv (not its check_variances): a plain ONNX Runtime session
    with the layer outputs exposed, and numpy's float64 variance over each whole output.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = [n.output[0] for n in m.graph.node if n.op_type in ("Conv", "Gemm")]
    del m.graph.output[:]
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    outs = cpu_session(m).run(names, {m.graph.input[0].name: x})
    if per_channel:
        return max(float(np.abs(np.var(np.moveaxis(y, 1, 0).reshape(y.shape[1], -1), axis=1,
                                        dtype=np.float64) - 1.0).max()) for y in outs)
    return max(abs(float(np.var(y, dtype=np.float64)) - 1.0) for y in outs)


def initialise(cfg: RunConfig, x_train: np.ndarray) -> tuple[onnx.ModelProto, object]:
    """The net with ``cfg.init`` applied by onnx-lsuv, and onnx-lsuv's report (LSUV only)."""
    model = build(cfg.arch, cfg.activation, seed=cfg.seed, bn=cfg.bn or None)
    if cfg.init == "lsuv":
        result = lsuv_init(model, lsuv_batch(x_train, cfg.lsuv_batch), seed=cfg.seed,
                           tol=cfg.tol, max_iter=cfg.max_iter, provider="cpu", threads=1,
                           **VARIANTS[cfg.variant])
        return result.model, result.report
    return lsuv_init(model, None, init=cfg.init, seed=cfg.seed, threads=1).model, None


def accuracy(module: torch.nn.Module, x: torch.Tensor, y: np.ndarray) -> float:
    """Fraction of ``x`` classified as ``y``, in eval mode (BatchNormalization on its
    running statistics); the module is put back in its mode."""
    mode = module.training
    module.eval()
    with torch.no_grad():
        acc = float((module(x).argmax(1).numpy() == y).mean())
    module.train(mode)
    return acc


def run(cfg: RunConfig) -> RunResult:
    """Initialise and train one net; everything the tables and plots need."""
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    if cfg.study == "transformers":
        from transformer_study import run_transformer

        return run_transformer(cfg)
    if cfg.arch in MODERN_ARCHITECTURES:
        from modern import run_modern

        return run_modern(cfg)
    res = RunResult(config=asdict(cfg))
    x_tr, y_tr, x_te, y_te = arch_data(cfg.arch)
    if cfg.budget.train_subset:
        x_tr, y_tr = x_tr[:cfg.budget.train_subset], y_tr[:cfg.budget.train_subset]

    t = time.perf_counter()
    model, report = initialise(cfg, x_tr)
    res.init_s = time.perf_counter() - t
    if report is not None:
        res.lsuv_converged = report.converged
        res.lsuv_tries = sum(layer.tries for layer in report.layers)
    # The stds straight from the written initializers, not from onnx-lsuv's report.
    inits = {t.name: t for t in model.graph.initializer}
    res.weight_std = {label: float(np.std(numpy_helper.to_array(inits[name]), dtype=np.float64))
                      for label, name in target_weights(model).items()}
    res.test_var_worst = worst_variance_error(model, x_te, cfg.variant == "per_channel")

    module = OnnxModule(model)
    res.conversion_diff = max_rel_diff_vs_ort(model, module, x_te[:64])
    layers = {label: module.parameter(name) for label, name in target_weights(model).items()}
    res.grad_ratio = gradient_ratios(module, layers, x_tr, y_tr)
    res.train_s = train(module, cfg.budget, cfg.seed, x_tr, y_tr, x_te, y_te, res, layers)
    return res


def gradient_ratios(module: torch.nn.Module, weights: dict[str, torch.Tensor], x: np.ndarray,
                    y: np.ndarray) -> dict[str, float]:
    """|dL/dW| / |W| per layer (label -> weight parameter) on the whole training set, before
    any step, in training mode: how far one SGD step moves each layer relative to its size
    (its effective learning rate)."""
    statistics = {k: v.clone() for k, v in module.named_buffers()}  # BN's: left as they were
    module.train()
    module.zero_grad()
    F.cross_entropy(module(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    with torch.no_grad():
        ratios = {label: float(w.grad.norm() / w.norm()) for label, w in weights.items()}
        for k, v in module.named_buffers():
            v.copy_(statistics[k])
    module.zero_grad()
    return ratios


def optimizer(module: torch.nn.Module, budget: Budget) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay, or AdamW (the modern net's)."""
    if budget.optimizer == "adamw":
        return torch.optim.AdamW(module.parameters(), lr=budget.lr,
                                 weight_decay=budget.weight_decay)
    return torch.optim.SGD(module.parameters(), lr=budget.lr, momentum=budget.momentum,
                           weight_decay=budget.weight_decay)


def train(module: torch.nn.Module, budget: Budget, seed: int, x_tr: np.ndarray,
          y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, res: RunResult,
          layers: dict[str, torch.Tensor]) -> float:
    """Train with ``budget``; appends per-epoch loss, test accuracy and elapsed seconds to
    ``res``, and the first GRAD_VAR_BATCHES mini-batches' mean gradient variance of each of
    ``layers`` (label -> weight parameter). Seconds taken."""
    t = time.perf_counter()
    module.train()
    opt = optimizer(module, budget)
    xt, yt, xv = torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te)
    order = torch.Generator().manual_seed(seed)  # the batch order: one per seed, any init
    grad_var = {label: [] for label in layers}
    for epoch in range(budget.epochs):
        if epoch == budget.lr_drop_epoch:
            for group in opt.param_groups:
                group["lr"] = budget.lr * 0.1
        perm = torch.randperm(len(xt), generator=order)
        total = 0.0
        for start in range(0, len(xt), budget.batch):
            idx = perm[start:start + budget.batch]
            loss = F.cross_entropy(module(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            for label, w in layers.items():
                if len(grad_var[label]) < GRAD_VAR_BATCHES:
                    grad_var[label].append(float(torch.var(w.grad.double(), correction=0)))
            opt.step()
            total += float(loss.detach()) * len(idx)
        res.train_loss.append(total / len(xt))
        res.test_acc.append(accuracy(module, xv, y_te))
        res.epoch_s.append(time.perf_counter() - t)
        res.grad_var = {label: float(np.mean(v)) for label, v in grad_var.items() if v}
        if not math.isfinite(res.train_loss[-1]):
            res.diverged = True
            break
    return time.perf_counter() - t
