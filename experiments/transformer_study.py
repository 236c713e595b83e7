"""Issue 28's proof: three inits side by side on three small transformers, the way a user calls
onnx-lsuv from PyTorch.

    python experiments/run.py --study transformers           # the whole study
    python experiments/run.py --study transformers --quick   # the smoke test

The inits: PyTorch's own defaults ("default"), and ``onnx_lsuv.frameworks.torch.lsuv_module``
(a TorchScript export, LSUV on the export, the weights written back by name) with
``policy="paper"`` (Algorithm 1 on every layer: onnx-lsuv's behaviour before issue 28) or
``policy="transformer"`` (targets per role: attention logits, residual branches, the stream's
writer, the head). The nets:

- ``vit_digits``: the digits ViT of ``modern.py`` (pre-LN, 4 blocks, dim 64), AdamW.
- ``postln_digits``: the same patches and sizes as a BERT-style post-LN encoder (a LayerNorm
  on the embedding and after every residual Add, no final LayerNorm): the Admin rule's case.
- ``chargpt_stdlib``: a GPT-style character language model (causal attention, pre-LN,
  4 blocks, dim 64, ``nn.Embedding`` for the tokens, learned positions, an untied head) on the
  Python standard library's own source files, split into training and validation by file.

Before training, every run measures the health statistics of issue 28's table with PyTorch
forward hooks on data LSUV never saw (apart from onnx-lsuv): the attention logits' std at each
Softmax input, Var(attention branch) / Var(stream in) and Var(MLP branch) / Var(stream in) at
each residual Add, the stream's variance where the first block reads it, the head's logit std
and the initial loss.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import sysconfig
import time
import zlib
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modern import Block, ViT, linears, round_trip_diff, vit_data
from training import LSUV_BATCH_SEED, Budget, RunConfig, RunResult, lsuv_batch, optimizer, train

STUDY = "transformers"
INITS = ("default", "paper", "transformer")  # PyTorch's own; lsuv_module(policy=...)
ACTIVATION = "gelu"  # every net's MLP; the configs' activation field
DIGITS_ARCHS = ("vit_digits", "postln_digits")
LM_ARCH = "chargpt_stdlib"
ARCHS = DIGITS_ARCHS + (LM_ARCH,)
TITLES = {
    "vit_digits": "digits ViT (modern.py: pre-LN, 4 blocks, dim 64, 4 heads, MLP 128, final "
                  "LayerNorm, mean over the 16 patch tokens)",
    "postln_digits": "BERT-style post-LN encoder on the digits (the ViT's patches and sizes, "
                     "a LayerNorm on the embedding and after each residual Add, no final "
                     "LayerNorm)",
    "chargpt_stdlib": "GPT-style character LM on the Python standard library (causal, pre-LN, "
                      "4 blocks, dim 64, 4 heads, MLP 256, context 64, nn.Embedding tokens, "
                      "learned positions, untied head)",
}
# The calibration sweep (``run.py --calibration``): a name -> lsuv_module keywords for the
# transformer policy, one of its defaults changed at a time (stream_var 1/3, head_std 0.1,
# branch_ratio 1 / (2 N_blocks) = 1/8 on these 4-block nets, attn_logit_std 0.4). "": the
# defaults.
CALIBRATION: dict[str, dict] = {
    "": {},
    "stream_var=1": {"stream_var": 1.0},
    "head_std=0": {"head_std": 0.0},
    "branch_ratio=1/N": {"branch_ratio": 0.25},
}

# ---- the character language model's data: the standard library's .py files ----

VOCAB = "\n" + "".join(map(chr, range(32, 127)))  # newline and printable ASCII: 96 characters
UNK = len(VOCAB)  # every other character (tab, non-ASCII) is this one token
VOCAB_SIZE = len(VOCAB) + 1
CONTEXT = 64
TRAIN_CHARS, VAL_CHARS = 1_000_000, 50_000
VAL_EVERY = 10  # a file is held out for validation when crc32(its path) % VAL_EVERY == 0
HEALTH_WINDOWS = 256  # validation windows the health statistics are measured on


def stdlib_files(root: str | None = None) -> list[str]:
    """Every .py file under the standard library (``sysconfig.get_paths()["stdlib"]``) as a
    path relative to it, with '/' separators, sorted; installed packages (site-packages,
    dist-packages) left out: they are not the standard library."""
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages"))
        rel = os.path.relpath(folder, root)
        out += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/")
                for f in files if f.endswith(".py")]
    return sorted(out)


def file_order(rel: str) -> tuple[int, str]:
    """Files are read in the order of crc32 of their relative path (then the path): a fixed
    order from the names alone that mixes the library's packages."""
    return zlib.crc32(rel.encode()), rel


def is_validation(rel: str) -> bool:
    """The split, by file, from the name alone: about 1 file in VAL_EVERY is held out."""
    return zlib.crc32(rel.encode()) % VAL_EVERY == 0


def encode(text: str) -> np.ndarray:
    """Characters to token ids: VOCAB's index, UNK for any other character."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.full(128, UNK, dtype=np.int64)
    table[[ord(c) for c in VOCAB]] = np.arange(len(VOCAB))
    return np.where(codes < 128, table[np.minimum(codes, 127)], UNK)


@functools.cache
def stdlib_text(train_chars: int = TRAIN_CHARS, val_chars: int = VAL_CHARS) -> dict:
    """The training and validation token ids: each side's files in ``file_order``,
    concatenated (read as UTF-8, undecodable bytes replaced) up to its number of characters,
    the last file cut. Also what a reader needs to reproduce it: the Python version, the
    files used and the characters mapped to UNK."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(stdlib_files(root), key=file_order)
    parts: dict[str, list[str]] = {"train": [], "val": []}
    want = {"train": train_chars, "val": val_chars}
    have = {"train": 0, "val": 0}
    used: dict[str, list[str]] = {"train": [], "val": []}
    for rel in files:
        side = "val" if is_validation(rel) else "train"
        if have[side] >= want[side]:
            if all(have[s] >= want[s] for s in have):
                break
            continue
        with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
            text = f.read()[:want[side] - have[side]]
        parts[side].append(text)
        have[side] += len(text)
        used[side].append(rel)
    ids = {side: encode("".join(p)) for side, p in parts.items()}
    return {"train": ids["train"], "val": ids["val"], "python": sys.version.split()[0],
            "stdlib": root, "files": len(files), "train_files": used["train"],
            "val_files": used["val"], "chars": {s: int(len(v)) for s, v in ids.items()},
            "unk": {s: int((v == UNK).sum()) for s, v in ids.items()}}


def val_windows(ids: np.ndarray, context: int = CONTEXT) -> np.ndarray:
    """The validation text as consecutive windows of context + 1 tokens (input, then the
    next token as the target), the remainder dropped."""
    n = len(ids) // (context + 1)
    return ids[:n * (context + 1)].reshape(n, context + 1)


def random_windows(ids: np.ndarray, n: int, gen: np.random.Generator,
                   context: int = CONTEXT) -> np.ndarray:
    """n windows of context + 1 tokens at random places of the training text."""
    starts = gen.integers(0, len(ids) - context - 1, size=n)
    return ids[starts[:, None] + np.arange(context + 1)]


# ---- the nets ----

class PostLNEncoder(nn.Module):
    """BERT-style: the ViT's 2x2 patches and learned positions, a LayerNorm on the embedding
    (as BERT's), 4 post-LN blocks, the mean over the tokens and a linear head (BERT's final
    hidden state is already normalised: no final LayerNorm)."""

    def __init__(self, classes: int = 10, image: int = 8, patch: int = 2, dim: int = 64,
                 depth: int = 4, heads: int = 4, mlp: int = 128) -> None:
        super().__init__()
        self.patch, self.tokens = patch, (image // patch) ** 2
        self.embed = nn.Linear(patch * patch, dim)
        self.pos = nn.Parameter(torch.zeros(1, self.tokens, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp, pre_ln=False) for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, side, p = x.shape[0], x.shape[-1] // self.patch, self.patch
        x = x.reshape(n, side, p, side, p).transpose(2, 3).reshape(n, side * side, p * p)
        x = self.norm(self.embed(x) + self.pos)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


class CharGPT(nn.Module):
    """GPT-style: token embedding (nn.Embedding, PyTorch's N(0, 1) by default) plus a learned
    position embedding (std 0.02, as GPT-2's), causal pre-LN blocks, a final LayerNorm and an
    untied linear head (its own weight, not the embedding's transpose). Input (n, t) ids."""

    def __init__(self, vocab: int = VOCAB_SIZE, context: int = CONTEXT, dim: int = 64,
                 depth: int = 4, heads: int = 4, mlp: int = 256) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(1, context, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp, pre_ln=True, causal=True,
                                          context=context) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[:, :idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build(arch: str) -> nn.Module:
    return {"vit_digits": ViT, "postln_digits": PostLNEncoder, "chargpt_stdlib": CharGPT}[arch]()


# ---- the health statistics, measured with forward hooks ----

def _var(t: torch.Tensor) -> float:
    return float(torch.var(t.double(), correction=0))


def _stream_points(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The modules whose input is the residual stream at the attention's Add and at the MLP's:
    pre-LN, the LayerNorms that read it; post-LN, q (reads the block's input) and fc1 (reads
    the stream after the first Add and its LayerNorm)."""
    return (block.norm1, block.norm2) if block.pre_ln else (block.q, block.fc1)


def health(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Issue 28's table, per block, on (x, y), in float64 from PyTorch forward hooks (apart
    from onnx-lsuv): "logit_std" (the Softmax input's std over every head and query, for a
    causal block over the unmasked entries only), "attn_ratio" and "mlp_ratio" (Var(branch) /
    Var(stream in) at each residual Add: the out-projection's and fc2's outputs against the
    stream they are added to), "stream_var" (the stream where the first block reads it), and
    "head_std" and "initial_loss" (cross-entropy) of the output."""
    seen: dict[str, list] = {k: [] for k in ("logit_std", "attn_in", "attn", "mlp_in", "mlp")}
    hooks = []

    def record(key, use_input, block=None):
        def hook(_m, inputs, out):
            t = inputs[0] if use_input else out
            if key == "logit_std":
                if block.causal:
                    n = t.shape[-1]
                    t = t[..., block.mask[:n, :n]]
                seen[key].append(float(torch.std(t.double(), correction=0)))
            else:
                seen[key].append(_var(t))
        return hook

    for block in module.blocks:
        attn_in, mlp_in = _stream_points(block)
        hooks += [block.logits.register_forward_hook(record("logit_std", False, block)),
                  attn_in.register_forward_hook(record("attn_in", True)),
                  block.proj.register_forward_hook(record("attn", False)),
                  mlp_in.register_forward_hook(record("mlp_in", True)),
                  block.fc2.register_forward_hook(record("mlp", False))]
    mode = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(x)
    finally:
        for h in hooks:
            h.remove()
        module.train(mode)
    logits = out.reshape(-1, out.shape[-1]).double()
    return {"logit_std": seen["logit_std"],
            "attn_ratio": [b / s for b, s in zip(seen["attn"], seen["attn_in"])],
            "mlp_ratio": [b / s for b, s in zip(seen["mlp"], seen["mlp_in"])],
            "stream_var": seen["attn_in"][0],
            "head_std": float(torch.std(logits, correction=0)),
            "initial_loss": float(F.cross_entropy(logits, y.reshape(-1)))}


# ---- one run ----

def lsuv_layers(report) -> list[dict]:
    """onnx-lsuv's report, per layer, in short: name, weight, status, variance after, and,
    where the report has them, the layer's transformer role and block and what the policy
    set (the measure, its target, the value achieved)."""
    keep = ("name", "op", "weight", "block", "status", "var_after", "scale", "tries", "point",
            "role", "role_block", "measure", "target", "achieved")
    return [{k: v for k, v in asdict(layer).items() if k in keep} for layer in report.layers]


def initialise(module: nn.Module, batch: np.ndarray, cfg: RunConfig, res: RunResult,
               probe: np.ndarray) -> None:
    """``cfg.init`` on ``module`` in place: nothing for "default", or lsuv_module with the
    policy of that name (and the calibration's keywords), checked by the round trip: the
    module with its written-back weights against ONNX Runtime on onnx-lsuv's model, on
    ``probe`` (as many held-out inputs as ``batch`` has: the export's fixed batch size)."""
    from onnx_lsuv.frameworks.torch import lsuv_module

    if cfg.init not in INITS:
        raise ValueError(f"the transformers study's init is one of {INITS}, not {cfg.init!r}")
    if cfg.init == "default":
        res.conversion_diff = None  # nothing converted: PyTorch's module as it was built
        return
    done = lsuv_module(module, torch.from_numpy(batch), exporter="torchscript",
                       policy=cfg.init, seed=cfg.seed, tol=cfg.tol, max_iter=cfg.max_iter,
                       provider="cpu", threads=1, **CALIBRATION[cfg.variant])
    res.lsuv_converged = done.report.converged
    res.lsuv_tries = sum(layer.tries for layer in done.report.layers)
    res.lsuv_layers = lsuv_layers(done.report)
    res.conversion_diff = round_trip_diff(module, done.model, probe)


def run_transformer(cfg: RunConfig) -> RunResult:
    """Build ``cfg.arch`` (seeded), initialise it, measure its health, train it."""
    res = RunResult(config=asdict(cfg))
    torch.manual_seed(cfg.seed)
    module = build(cfg.arch)
    if cfg.arch == LM_ARCH:
        return _run_lm(cfg, module, res)
    x_tr, y_tr, x_te, y_te = vit_data()
    if cfg.budget.train_subset:
        x_tr, y_tr = x_tr[:cfg.budget.train_subset], y_tr[:cfg.budget.train_subset]
    batch = lsuv_batch(x_tr, cfg.lsuv_batch)
    t = time.perf_counter()
    initialise(module, batch, cfg, res, x_te[:len(batch)])
    res.init_s = time.perf_counter() - t
    layers = {name: m.weight for name, m in linears(module).items()}
    res.weight_std = {name: float(w.detach().double().std(correction=0))
                      for name, w in layers.items()}
    res.health = health(module, torch.from_numpy(x_te), torch.from_numpy(y_te))
    res.train_s = train(module, cfg.budget, cfg.seed, x_tr, y_tr, x_te, y_te, res, {})
    return res


def _run_lm(cfg: RunConfig, module: nn.Module, res: RunResult) -> RunResult:
    data = stdlib_text()
    train_ids = data["train"][:cfg.budget.train_subset] if cfg.budget.train_subset \
        else data["train"]
    val = torch.from_numpy(val_windows(data["val"]))
    batch = random_windows(train_ids, cfg.lsuv_batch,
                           np.random.default_rng(LSUV_BATCH_SEED))[:, :-1]
    t = time.perf_counter()
    initialise(module, np.ascontiguousarray(batch), cfg, res,
               np.ascontiguousarray(val[:len(batch), :-1].numpy()))
    res.init_s = time.perf_counter() - t
    res.weight_std = {name: float(m.weight.detach().double().std(correction=0))
                      for name, m in linears(module).items()}
    res.weight_std["tok"] = float(module.tok.weight.detach().double().std(correction=0))
    res.health = health(module, val[:HEALTH_WINDOWS, :-1], val[:HEALTH_WINDOWS, 1:])
    res.train_s = train_lm(module, cfg.budget, cfg.seed, train_ids, val, res)
    return res


def lm_loss(module: nn.Module, windows: torch.Tensor, chunk: int = 256) -> float:
    """Mean cross-entropy (nats per character) of predicting each window's next tokens."""
    mode = module.training
    module.eval()
    total = 0.0
    with torch.no_grad():
        for s in range(0, len(windows), chunk):
            w = windows[s:s + chunk]
            out = module(w[:, :-1])
            total += float(F.cross_entropy(out.reshape(-1, out.shape[-1]), w[:, 1:].reshape(-1),
                                           reduction="sum"))
    module.train(mode)
    return total / (len(windows) * (windows.shape[1] - 1))


def train_lm(module: nn.Module, budget: Budget, seed: int, train_ids: np.ndarray,
             val: torch.Tensor, res: RunResult) -> float:
    """``budget.epochs`` x ``budget.steps`` mini-batches of random training windows (their
    draw set by the seed alone, the same for every init), the lr warmed up linearly over
    ``budget.warmup_steps`` and x0.1 from ``budget.lr_drop_epoch``; after each epoch the mean
    training loss, the validation loss and the seconds so far. Seconds taken."""
    t = time.perf_counter()
    module.train()
    opt = optimizer(module, budget)
    gen = np.random.default_rng(seed)
    step = 0
    for epoch in range(budget.epochs):
        total = 0.0
        for _ in range(budget.steps):
            scale = 0.1 if budget.lr_drop_epoch is not None and epoch >= budget.lr_drop_epoch \
                else 1.0
            if step < budget.warmup_steps:
                scale *= (step + 1) / budget.warmup_steps
            for group in opt.param_groups:
                group["lr"] = budget.lr * scale
            w = torch.from_numpy(random_windows(train_ids, budget.batch, gen))
            out = module(w[:, :-1])
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), w[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
            step += 1
        res.train_loss.append(total / budget.steps)
        res.val_loss.append(lm_loss(module, val))
        res.epoch_s.append(time.perf_counter() - t)
        if not math.isfinite(res.train_loss[-1]):
            res.diverged = True
            break
    return time.perf_counter() - t


# ---- the plan ----

@dataclass(frozen=True)
class TransformerPlan:
    """What ``run.py --study transformers`` runs: every net x init x its seeds, and
    optionally the calibration sweep (the transformer policy with other options) on one
    net."""

    budgets: dict[str, Budget]
    seeds: dict[str, tuple[int, ...]]
    inits: tuple[str, ...] = INITS
    threshold: float = 0.9  # the test accuracy "epochs to" counts towards (the digits nets)
    lm_threshold: float = 2.0  # the validation loss "steps to" counts towards (the LM)
    lsuv_batch: int = 128
    calibration_arch: str = ""
    calibration: tuple[str, ...] = ()
    calibration_seeds: tuple[int, ...] = ()
    study: str = STUDY
    extra: dict = field(default_factory=dict)

    def configs(self) -> list[RunConfig]:
        main = [RunConfig(arch, ACTIVATION, init, seed, budget, lsuv_batch=self.lsuv_batch,
                          study=STUDY)
                for arch, budget in self.budgets.items() for init in self.inits
                for seed in self.seeds[arch]]
        sweep = [RunConfig(self.calibration_arch, ACTIVATION, "transformer", seed,
                           self.budgets[self.calibration_arch], lsuv_batch=self.lsuv_batch,
                           variant=v, study=STUDY)
                 for v in self.calibration if v for seed in self.calibration_seeds] \
            if self.calibration_arch in self.budgets else []
        return main + sweep

    def narrowed(self, archs: tuple[str, ...], inits: tuple[str, ...]) -> TransformerPlan:
        return replace(self, budgets={a: b for a, b in self.budgets.items()
                                      if not archs or a in archs},
                       inits=tuple(i for i in self.inits if not inits or i in inits))

    def with_seeds(self, n: int) -> TransformerPlan:
        return replace(self, seeds={a: tuple(range(n)) for a in self.seeds})


_DIGITS = Budget(epochs=30, lr=1e-3, weight_decay=0.05, lr_drop_epoch=22, optimizer="adamw")
FULL = TransformerPlan(
    budgets={"vit_digits": _DIGITS, "postln_digits": _DIGITS,
             "chargpt_stdlib": Budget(epochs=8, steps=75, lr=2e-3, batch=32,
                                      weight_decay=0.1, lr_drop_epoch=6, optimizer="adamw",
                                      warmup_steps=50)},
    seeds={"vit_digits": tuple(range(5)), "postln_digits": tuple(range(3)),
           "chargpt_stdlib": tuple(range(3))},
)
QUICK = TransformerPlan(
    budgets={"vit_digits": replace(_DIGITS, epochs=1, lr_drop_epoch=None, train_subset=192),
             "postln_digits": replace(_DIGITS, epochs=1, lr_drop_epoch=None, train_subset=192),
             "chargpt_stdlib": Budget(epochs=2, steps=3, lr=2e-3, batch=8, weight_decay=0.1,
                                      optimizer="adamw", warmup_steps=2,
                                      train_subset=20_000)},
    seeds={a: (0,) for a in ARCHS},
    threshold=0.5,
    lm_threshold=3.5,
    lsuv_batch=32,
)


def plan_dict(plan: TransformerPlan) -> dict:
    return asdict(plan)


def plan_from_dict(d: dict) -> TransformerPlan:
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    d["budgets"] = {k: Budget(**v) for k, v in d["budgets"].items()}
    d["seeds"] = {k: tuple(v) for k, v in d["seeds"].items()}
    return TransformerPlan(**d)
