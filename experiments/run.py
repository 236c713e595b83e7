"""Does an onnx-lsuv-initialised ONNX net train where standard inits stall? Measure it.

    python experiments/run.py            # the full study (about half an hour on 2 cores)
    python experiments/run.py --quick    # the smoke test CI runs (under a minute)

Builds deep, thin nets in ONNX (FitNet-4- and FitResNet-4-like CNNs and a 25-layer MLP) with
five activations, initialises each with onnx-lsuv (LSUV, and the orthonormal, Xavier and MSRA
baselines), trains it in PyTorch on scikit-learn's handwritten digits, and writes RESULTS.md
(the paper's Tables 3, 4, 5, 7, 8, 9 and 10 with its own figures beside ours), results.json
(every curve) and PNG plots. Also BN-FitNet-4 against LSUV (Table 5, Figure 3), LSUV at
Tol_var 0.02, and a small vision transformer initialised through the PyTorch export round trip.
Needs torch, onnxscript, scikit-learn and matplotlib:
    pip install -e ".[experiments]" torch==2.13.0
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context

import click

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "sample_models")]

from onnx_lsuv.data import MIN_RECOMMENDED_BATCH  # noqa: E402

import paper  # noqa: E402
import result_tables as tables  # noqa: E402
import transformer_study as study  # noqa: E402
from fitnets import ARCHITECTURES, BN_POSITIONS, VLRELU_SLOPE  # noqa: E402
from modern import MODERN_INITS  # noqa: E402
from training import (  # noqa: E402
    GRAD_VAR_BATCHES,
    INITS,
    LSUV_BATCH_SEED,
    Budget,
    RunConfig,
    digits_split,
    fan_ins,
    run,
)

ACTIVATIONS = ("relu", "vlrelu", "tanh", "sigmoid", "maxout")
ARCH_TITLES = {
    "fitnet4_digits": "FitNet-4-like CNN (17 conv + 2 fc, 16x16 digits)",
    "fitresnet4_digits": "FitResNet-4-like CNN (17 conv, 8 of them summed, + 2 fc, 16x16 "
                         "digits)",
    "mlp25_digits": "25-layer MLP (64 units, raw 8x8 digits)",
}
MODERN_TITLES = {"vit_digits": "small ViT (4 pre-LN blocks, dim 64, 2x2 patches of the 8x8 "
                               "digits), trained with AdamW"}
MODERN_ACTIVATION = "gelu"
PAPER_TABLE3 = {"fitnet4_digits": (3, paper.TABLE3), "fitresnet4_digits": (4, paper.TABLE4)}
PAPER_NET = "fitnet4"  # fitnets.py's paper-width FitNet-4: the fan-ins of Tables 8 and 9


@dataclass(frozen=True)
class Plan:
    """What one invocation runs."""

    budgets: dict[str, Budget]  # architecture -> its training budget
    activations: tuple[str, ...]
    inits: tuple[str, ...]
    seeds: tuple[int, ...]
    threshold: float  # the test accuracy "epochs to" counts towards
    lsuv_batch: int  # images LSUV measures on in the main grid
    batch_arch: str  # Table 7: this net and activation, LSUV on these batch sizes
    batch_activation: str
    batch_sizes: tuple[int, ...]
    # LSUV's variants beyond the paper (training.VARIANTS) on this net and activation
    variant_arch: str = ""
    variant_activation: str = ""
    variants: tuple[str, ...] = ()
    # Table 5 and Figure 3: this net with BatchNormalization (before or after every hidden
    # non-linearity) and the standard init bn_init, against the grid's LSUV without BN
    bn_arch: str = ""
    bn_activations: tuple[str, ...] = ()
    bn_positions: tuple[str, ...] = ()
    bn_init: str = "xavier"
    # Tol_var: LSUV at these tolerances too (the grid's is onnx-lsuv's default), on one column
    tol_arch: str = ""
    tol_activation: str = ""
    tols: tuple[float, ...] = ()
    # beyond the paper: a modern net in PyTorch (modern.py), PyTorch's init against LSUV
    modern_arch: str = ""
    modern_budget: Budget | None = None
    modern_seeds: tuple[int, ...] = ()

    def configs(self) -> list[RunConfig]:
        grid = [RunConfig(arch, act, init, seed, budget, lsuv_batch=self.lsuv_batch)
                for (arch, budget), act, init, seed in itertools.product(
                    self.budgets.items(), self.activations, self.inits, self.seeds)]
        study = [RunConfig(self.batch_arch, self.batch_activation, "lsuv", seed,
                           self.budgets[self.batch_arch], lsuv_batch=size)
                 for size in self.batch_sizes if size != self.lsuv_batch
                 for seed in self.seeds] if self.has_batch_study else []
        variants = [RunConfig(self.variant_arch, self.variant_activation, "lsuv", seed,
                              self.budgets[self.variant_arch], lsuv_batch=self.lsuv_batch,
                              variant=v)
                    for v in self.variants for seed in self.seeds] \
            if self.has_variant_study else []
        bn = [RunConfig(self.bn_arch, act, self.bn_init, seed, self.budgets[self.bn_arch],
                        lsuv_batch=self.lsuv_batch, bn=pos)
              for act in self.bn_activations if act in self.activations
              for pos in self.bn_positions for seed in self.seeds] \
            if self.has_bn_study else []
        tol = [RunConfig(self.tol_arch, self.tol_activation, "lsuv", seed,
                         self.budgets[self.tol_arch], lsuv_batch=self.lsuv_batch, tol=t)
               for t in self.tols for seed in self.seeds] if self.has_tol_study else []
        modern = [RunConfig(self.modern_arch, MODERN_ACTIVATION, init, seed, self.modern_budget,
                            lsuv_batch=self.lsuv_batch)
                  for init in MODERN_INITS for seed in self.modern_seeds] \
            if self.has_modern_study else []
        return grid + study + variants + bn + tol + modern

    @property
    def has_bn_study(self) -> bool:
        return bool(self.bn_positions) and self.bn_arch in self.budgets and \
            self.bn_init in self.inits and bool(set(self.bn_activations) & set(self.activations))

    @property
    def has_tol_study(self) -> bool:
        return bool(self.tols) and self.tol_arch in self.budgets and \
            self.tol_activation in self.activations and "lsuv" in self.inits

    @property
    def has_modern_study(self) -> bool:
        return bool(self.modern_arch) and self.modern_budget is not None and \
            bool(self.modern_seeds)

    @property
    def has_variant_study(self) -> bool:
        return bool(self.variants) and self.variant_arch in self.budgets and \
            self.variant_activation in self.activations and "lsuv" in self.inits

    @property
    def has_batch_study(self) -> bool:
        return (self.batch_arch in self.budgets and self.batch_activation in self.activations
                and "lsuv" in self.inits)

    def narrowed(self, archs: tuple[str, ...], activations: tuple[str, ...],
                 inits: tuple[str, ...]) -> Plan:
        """This plan on some nets, activations and inits only (all where one is empty). The
        modern net stays only where none of the three is narrowed or it is named with
        --arch (its activation is its own, and its inits are PyTorch's and LSUV)."""
        def keep(chosen: tuple[str, ...], full) -> tuple[str, ...]:
            return tuple(x for x in full if not chosen or x in chosen)

        modern = self.modern_arch if (self.modern_arch in archs or not (
            archs or activations or inits)) else ""
        return replace(self, budgets={a: self.budgets[a] for a in keep(archs, self.budgets)},
                       activations=keep(activations, self.activations),
                       inits=keep(inits, self.inits), modern_arch=modern)


FULL = Plan(
    budgets={
        "fitnet4_digits": Budget(epochs=10, lr=0.003, lr_drop_epoch=7),
        "mlp25_digits": Budget(epochs=30, lr=0.003, lr_drop_epoch=22),
        "fitresnet4_digits": Budget(epochs=10, lr=0.003, lr_drop_epoch=7),
    },
    activations=ACTIVATIONS,
    inits=INITS,
    seeds=(0, 1),
    threshold=0.9,
    lsuv_batch=128,
    batch_arch="fitnet4_digits",
    batch_activation="tanh",
    batch_sizes=(2, 16, 32, 128, 1024),
    variant_arch="fitnet4_digits",
    variant_activation="relu",
    variants=("mean0", "per_channel"),
    bn_arch="fitnet4_digits",
    bn_activations=("tanh", "relu", "maxout"),  # the paper's Table 5
    bn_positions=BN_POSITIONS,
    bn_init="xavier",  # the paper's BN-FitNet4 init (Section 5.2)
    tol_arch="fitnet4_digits",
    tol_activation="tanh",
    tols=(0.02,),  # the authors' script's margin
    modern_arch="vit_digits",
    modern_budget=Budget(epochs=30, lr=1e-3, weight_decay=0.05, lr_drop_epoch=22,
                         optimizer="adamw"),
    modern_seeds=(0, 1, 2, 3, 4),
)
QUICK = Plan(
    budgets={
        "fitnet4_digits": Budget(epochs=2, lr=0.003, lr_drop_epoch=1, train_subset=192),
        "mlp25_digits": Budget(epochs=3, lr=0.003, lr_drop_epoch=2, train_subset=192),
        "fitresnet4_digits": Budget(epochs=1, lr=0.003, train_subset=192),
    },
    activations=("relu", "maxout"),
    inits=("lsuv", "xavier"),
    seeds=(0,),
    threshold=0.5,
    lsuv_batch=32,
    batch_arch="mlp25_digits",
    batch_activation="relu",
    batch_sizes=(2, 32),
    variant_arch="mlp25_digits",
    variant_activation="relu",
    variants=("mean0", "per_channel"),
    bn_arch="fitnet4_digits",
    bn_activations=("maxout",),
    bn_positions=BN_POSITIONS,
    bn_init="xavier",
    tol_arch="mlp25_digits",
    tol_activation="relu",
    tols=(0.02,),
    modern_arch="vit_digits",
    modern_budget=Budget(epochs=1, lr=1e-3, weight_decay=0.05, optimizer="adamw",
                         train_subset=192),
    modern_seeds=(0,),
)


def _work(cfg: RunConfig) -> dict:
    return run(cfg).to_dict()


# Seconds per training epoch on one core, roughly, as measured on a 2-core x86_64 machine
# (2026-12-02): only the order of the runs depends on it.
_EPOCH_S = {"fitnet4_digits": 3.5, "fitresnet4_digits": 3.5, "mlp25_digits": 0.22,
            "vit_digits": 1.1}


def _cost(cfg: RunConfig) -> float:
    """A run's rough cost: its epochs, maxout's doubled layers, BatchNormalization (the
    language model: its steps, about 0.1 s each)."""
    if cfg.budget.steps:
        return cfg.budget.epochs * cfg.budget.steps * 0.1
    return (cfg.budget.epochs * _EPOCH_S.get(cfg.arch, 1.0)
            * (2.0 if cfg.activation == "maxout" else 1.0) * (1.15 if cfg.bn else 1.0))


def _label(cfg: RunConfig) -> str:
    return (f"{cfg.arch:17s} {cfg.activation:8s} {cfg.init:12s} seed {cfg.seed} "
            f"batch {cfg.lsuv_batch:4d}" + (f" {cfg.variant}" if cfg.variant else "")
            + (f" BN {cfg.bn}" if cfg.bn else "")
            + (f" tol {cfg.tol:g}" if cfg.tol != tables.DEFAULT_TOL else ""))


def _status(res: dict) -> str:
    if res.get("val_loss"):  # the language model: chance is not ln 10
        return "diverged" if res["diverged"] else f"val loss {res['val_loss'][-1]:.3f}"
    return "n/c" if tables.not_converged(res) else f"test {res['test_acc'][-1]:.1%}"


def execute(plan: Plan | study.TransformerPlan, jobs: int, echo=print,
            reused: list[dict] = ()) -> tuple[list[dict], list[str], float]:
    """Every run of ``plan``, ``jobs`` at a time in worker processes, but those whose config
    a run in ``reused`` has: that run is taken as it is.

    Returns (results, failures, seconds). A run that raises is reported and the others go on,
    so one failure does not throw away the rest of a long study.
    """
    have = {json.dumps(r["config"], sort_keys=True): r for r in reused}
    taken = [have[k] for k in {json.dumps(asdict(c), sort_keys=True) for c in plan.configs()}
             if k in have]
    configs = [c for c in plan.configs() if json.dumps(asdict(c), sort_keys=True) not in have]
    # The slowest first, so that the pool drains evenly and the short MLP runs fill the end.
    configs.sort(key=lambda c: -_cost(c))
    t = time.perf_counter()
    results, failures = list(taken), []
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_work, cfg): cfg for cfg in configs}
        for done, fut in enumerate(as_completed(futures), 1):
            cfg = futures[fut]
            try:
                res = fut.result()
            except Exception as err:  # noqa: BLE001 -- reported, and the study goes on
                failures.append(f"{_label(cfg)}: {err!r}")
                echo(f"[{done:3d}/{len(configs)}] {_label(cfg)}: FAILED: {err!r}")
                continue
            results.append(res)
            echo(f"[{done:3d}/{len(configs)}] {_label(cfg)}: {_status(res)}, "
                 f"{res['init_s'] + res['train_s']:.0f} s")
    results.sort(key=lambda r: json.dumps(r["config"], sort_keys=True))
    return results, failures, time.perf_counter() - t


def _versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime
    import sklearn
    import torch

    import onnx_lsuv

    return {"onnx_lsuv": onnx_lsuv.__version__, "onnx_lsuv_commit": _commit(onnx_lsuv.__file__),
            "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": numpy.__version__, "scikit-learn": sklearn.__version__,
            "python": platform.python_version()}


def _commit(path: str) -> str:
    """The git commit of the checkout ``path`` is in ("+ changes" when its tracked files
    differ from it), or "unknown" outside a git checkout: which onnx-lsuv made the results."""
    import subprocess

    where = os.path.dirname(os.path.abspath(path))
    try:
        head = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + changes" if dirty else "")


def write_outputs(plan: Plan | study.TransformerPlan, results: list[dict], seconds: float,
                  jobs: int, out: str, command: str, extra: dict | None = None) -> None:
    """results.json, then RESULTS.md and the PNG curves, under ``out``."""
    os.makedirs(out, exist_ok=True)
    meta = {"command": command, "date": datetime.date.today().isoformat(),
            "wall_s": round(seconds, 1), "jobs": jobs, "machine": _machine(),
            "versions": _versions(), "experiments_commit": _commit(__file__),
            "plan": _plan_dict(plan), **(extra or {})}  # extra's versions and commit: the start's
    if isinstance(plan, study.TransformerPlan) and study.LM_ARCH in plan.budgets:
        meta["lm_data"] = {k: v for k, v in study.stdlib_text().items()
                           if k not in ("train", "val")}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "runs": results}, f, indent=1)
    write_tables(plan, results, meta, out)


def write_tables(plan: Plan | study.TransformerPlan, results: list[dict], meta: dict,
                 out: str) -> None:
    """RESULTS.md and the PNG curves under ``out``, from the runs' results."""
    if isinstance(plan, study.TransformerPlan):
        for arch in plan.budgets:
            tables.plot_transformer(results, arch, plan.inits,
                                    os.path.join(out, f"curves_{arch}.png"), study.TITLES[arch],
                                    lm=arch == study.LM_ARCH)
        with open(os.path.join(out, "RESULTS.md"), "w") as f:
            f.write(transformers_markdown(plan, results, meta))
        return
    for arch in plan.budgets:
        tables.plot_curves(results, arch, plan.activations, plan.inits, plan.lsuv_batch,
                           os.path.join(out, f"curves_{arch}.png"), ARCH_TITLES[arch])
    if plan.has_batch_study:
        tables.plot_batch_sizes(results, plan.batch_arch, plan.batch_activation,
                                plan.batch_sizes, os.path.join(out, "curves_lsuv_batch.png"),
                                f"LSUV batch size: {ARCH_TITLES[plan.batch_arch]}")
    if plan.has_bn_study:
        tables.plot_wallclock(results, plan.bn_arch, _bn_activations(plan), plan.bn_positions,
                              plan.bn_init, plan.lsuv_batch,
                              os.path.join(out, "wallclock_bn.png"),
                              f"LSUV against BatchNormalization: {ARCH_TITLES[plan.bn_arch]}")
    if plan.has_modern_study:
        tables.plot_modern(results, plan.modern_arch, MODERN_INITS,
                           os.path.join(out, f"curves_{plan.modern_arch}.png"),
                           MODERN_TITLES[plan.modern_arch])
    with open(os.path.join(out, "RESULTS.md"), "w") as f:
        f.write(results_markdown(plan, results, meta))


def _bn_activations(plan: Plan) -> tuple[str, ...]:
    return tuple(a for a in plan.bn_activations if a in plan.activations)


def convs_after_pools(arch: str) -> list[int]:
    """The positions, among a net's convs, of the convs right after each pool."""
    out, convs, pooled = [], 0, False
    for layer in ARCHITECTURES[arch]["layers"]:
        if layer[0] in ("conv", "sum"):
            if pooled:
                out.append(convs)
            convs, pooled = convs + 1, False
        elif layer[0] == "pool":
            pooled = True
    return out


def _plan_dict(plan: Plan | study.TransformerPlan) -> dict:
    return asdict(plan)


def _plan_from_dict(d: dict) -> Plan | study.TransformerPlan:
    """The plan a results.json records (one written before a study existed lacks its
    fields: the study is then off)."""
    if d.get("study") == study.STUDY:
        return study.plan_from_dict(d)
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    d["budgets"] = {k: Budget(**v) for k, v in d["budgets"].items()}
    if d.get("modern_budget") is not None:
        d["modern_budget"] = Budget(**d["modern_budget"])
    return Plan(**d)


def _cpus() -> int:
    """The CPUs this process may run on (a container may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


def _machine() -> str:
    return f"{platform.machine()}, {_cpus()} CPUs available, {platform.system()}"


def results_markdown(plan: Plan, results: list[dict], meta: dict) -> str:
    """RESULTS.md: settings, the three tables, the checks, the plots."""
    x_tr, _, x_te, _ = digits_split()
    b0 = next(iter(plan.budgets.values()), None)
    thr = f"{plan.threshold:.0%}"
    out = [
        "# Results",
        "",
        f"Written by `{meta['command']}` on {meta['date']}: {len(results)} runs in "
        f"{meta['wall_s'] / 60:.1f} minutes, {meta['jobs']} at a time ({meta['machine']}).",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "Every number below is computed from `results.json` by "
        "`experiments/result_tables.py`; `experiments/README.md` discusses them.",
        "",
        "## Settings",
        "",
        f"- Data: scikit-learn's digits, {len(x_tr)} training and {len(x_te)} test images "
        "(stratified split, random_state=0), standardised with the training set's mean and "
        "std.",
        f"- Seeds per cell: {len(plan.seeds)} ({', '.join(map(str, plan.seeds))}). A seed "
        "sets the initial weights and the order of the training batches.",
        f"- LSUV: Tol_var {tables.DEFAULT_TOL:g}, T_max {RunConfig.max_iter} (onnx-lsuv's "
        f"defaults), on {plan.lsuv_batch} training images: one fixed draw (seed "
        f"{LSUV_BATCH_SEED}) for every run. OrthoNorm, Xavier (Glorot's uniform, variance "
        "2 / (fan_in + fan_out)) and MSRA (normal, variance 2 / fan_in) are onnx-lsuv's "
        "`--init` baselines. Biases start at zero in every ONNX net.",
    ]
    if b0 is not None and plan.budgets:
        out.append(f"- Training: SGD, momentum {b0.momentum}, weight decay {b0.weight_decay}, "
                   "cross-entropy; the same budget for every init and activation of a net:")
    for arch, b in plan.budgets.items():
        subset = f", first {b.train_subset} training images" if b.train_subset else ""
        drop = f", x0.1 from epoch {b.lr_drop_epoch + 1}" if b.lr_drop_epoch is not None else ""
        out.append(f"  - {ARCH_TITLES[arch]}: {b.epochs} epochs, batch {b.batch}, "
                   f"lr {b.lr}{drop}{subset}.")
    out += [
        "- A cell reads `accuracy (e0, e1, ...)`: the final test accuracy in %, averaged over "
        "the seeds that converged, then for each seed the epoch at which its test accuracy "
        f"first reached {thr} (`-`: never). `n/c` (not converged): the final training loss "
        f"stayed above {tables.NC_LOSS:.2f} (chance is ln 10 = 2.30) or went non-finite; a "
        "cell is `n/c` alone when no seed converged.",
        "",
    ]
    for arch in plan.budgets:
        if arch in PAPER_TABLE3:
            number, quoted = PAPER_TABLE3[arch]
            out += [f"## Table {number}: {ARCH_TITLES[arch]}", "",
                    f"Under each of our rows, the paper's Table {number} (CIFAR-10, its "
                    "full-width net, 230 epochs): compare which cells converge and the order "
                    "of the inits, not the accuracies.", "",
                    tables.table3_with_paper(results, arch, plan.activations, plan.inits,
                                             plan.threshold, plan.lsuv_batch, quoted, number),
                    "", tables.convergence_agreement(results, arch, plan.activations,
                                                     plan.inits, plan.lsuv_batch, quoted,
                                                     number)]
        else:
            out += [f"## Table 3 style: {ARCH_TITLES[arch]}", "",
                    "The paper has no such net.", "",
                    tables.table3(results, arch, plan.activations, plan.inits, plan.threshold,
                                  plan.lsuv_batch)]
        out += ["", f"![training curves](curves_{arch}.png)", ""]
    out += _paper_layer_sections(plan, results)
    for arch in plan.budgets:
        columns = [(plan.activations[0], init) for init in plan.inits] + [
            (act, "lsuv") for act in plan.activations[1:] if "lsuv" in plan.inits]
        out += [f"## Per-layer figures at init, {ARCH_TITLES[arch]}", "",
                "### Weight std per layer (Tables 8 and 9 style)", "",
                f"Seed 0. The baselines' stds depend only on the layer's shape (shown for the "
                f"{plan.activations[0]} net; maxout doubles every layer's outputs, which "
                "changes Xavier's); LSUV's also depend on the activation and the data.", "",
                tables.table8(results, arch, columns, plan.lsuv_batch), "",
                f"### Gain at init, {ARCH_TITLES[arch]}", "",
                "std(W) x sqrt(fan_in), the median over the hidden layers (all but the first "
                "and the last), seed 0: the gain an init gives a layer. The last row is what "
                "`torch.nn.init.calculate_gain` recommends for the activation; for maxout, "
                "which it does not cover, 1, since max(a, b)^2 and min(a, b)^2 share a "
                "distribution for i.i.d. symmetric a, b, so E[max(a, b)^2] = E[a^2]. "
                "OrthoNorm's gain is 1 where a layer has no more outputs than fan-in (every "
                "conv), and sqrt(fan_in / outputs) where it has more (the maxout MLP's 128 "
                "outputs on 64 inputs).", "",
                tables.gain_table(results, arch, plan.activations, plan.inits,
                                  plan.lsuv_batch,
                                  {act: fan_ins(arch, act) for act in plan.activations},
                                  analytic_gains()), "",
                f"### Gradient at init, {ARCH_TITLES[arch]}", "",
                "`|dL/dW| / |W|` per layer, for the mean loss over all the training images, "
                "before the first step: a layer's first SGD step relative to its weights is "
                "about this times the lr (its effective learning rate). Seed 0.", "",
                tables.table8(results, arch, columns, plan.lsuv_batch, "grad_ratio"), ""]
    if plan.has_batch_study:
        sizes_table = (tables.table7_with_paper(results, plan.batch_arch, plan.batch_activation,
                                                plan.batch_sizes, plan.threshold, paper.TABLE7)
                       if (plan.batch_arch, plan.batch_activation) == ("fitnet4_digits", "tanh")
                       else tables.table7(results, plan.batch_arch, plan.batch_activation,
                                          plan.batch_sizes, plan.threshold))
        out += [f"## Table 7: LSUV batch size, {ARCH_TITLES[plan.batch_arch]}, "
                f"{plan.batch_activation}", "", sizes_table,
                "", "![LSUV batch size curves](curves_lsuv_batch.png)", ""]
    if plan.has_bn_study:
        out += [f"## Table 5 and Figure 3: batch normalisation against LSUV, "
                f"{ARCH_TITLES[plan.bn_arch]}", "",
                f"BN-FitNet: a BatchNormalization before or after every hidden non-linearity "
                f"(each conv's and the hidden fc's), {tables.INIT_LABELS[plan.bn_init]} init "
                "(the paper's choice for BN-FitNet4), trained in training mode (batch "
                "statistics) and tested on the running statistics. LSUV: the grid's runs, "
                "no BN. Same budget and seeds. The paper's figures: Table 5 for BN, Table 3 "
                "for LSUV. Seconds per epoch: the training loop's wall clock on one core "
                "(two runs at a time on the machine).", "",
                tables.table5(results, plan.bn_arch, _bn_activations(plan), plan.bn_positions,
                              plan.bn_init, plan.threshold, plan.lsuv_batch, paper.TABLE5,
                              paper.TABLE3["lsuv"]),
                "", "![accuracy against wall-clock time](wallclock_bn.png)", ""]
    if plan.has_tol_study:
        out += [f"## Tol_var: {ARCH_TITLES[plan.tol_arch]}, {plan.tol_activation}", "",
                f"LSUV at Tol_var {', '.join(f'{t:g}' for t in plan.tols)} beside the grid's "
                f"{tables.DEFAULT_TOL:g}, T_max {RunConfig.max_iter} each; the same batch, "
                f"budget and seeds. The paper: {paper.TOL_VAR_CLAIM}. Tries: rescalings "
                "counted by onnx-lsuv's report over all layers (0 for a layer already within "
                "Tol_var).", "",
                tables.table_tol(results, plan.tol_arch, plan.tol_activation,
                                 sorted({tables.DEFAULT_TOL, *plan.tols}, reverse=True),
                                 plan.threshold, plan.lsuv_batch), ""]
    if plan.has_variant_study:
        out += [f"## LSUV beyond the paper: a target mean, per channel, "
                f"{ARCH_TITLES[plan.variant_arch]}, {plan.variant_activation}", "",
                "onnx-lsuv's `target_mean=0` (each layer's output centred through its bias, "
                "then scaled) and `per_channel=True` (every output channel at unit variance "
                "on its own), against the paper's LSUV, on the same batch, seeds and budget. "
                "The held-out variance is each layer output's pooled over its channels, and "
                "per channel (the worst channel) for LSUV per channel.", "",
                tables.table_variants(results, plan.variant_arch, plan.variant_activation,
                                      plan.variants, plan.threshold, plan.lsuv_batch), ""]
    if plan.has_modern_study:
        b = plan.modern_budget
        drop = f", x0.1 from epoch {b.lr_drop_epoch + 1}" if b.lr_drop_epoch is not None else ""
        subset = f", first {b.train_subset} training images" if b.train_subset else ""
        out += [f"## Beyond the paper: a modern net, {MODERN_TITLES[plan.modern_arch]}", "",
                "Built in PyTorch (`experiments/modern.py`). PyTorch's default init, or LSUV "
                "the way a user would apply it: `onnx_lsuv.frameworks.torch.lsuv_module` "
                f"exports the module (TorchScript), initialises the export on the same "
                f"{plan.lsuv_batch} training images and writes the weights back into the "
                f"module by name. Seeds {', '.join(map(str, plan.modern_seeds))}: a seed "
                "sets PyTorch's initial weights (which LSUV then replaces) and the batch "
                f"order. AdamW, lr {b.lr}, weight decay {b.weight_decay}, {b.epochs} epochs, "
                f"batch {b.batch}{drop}{subset}.", "",
                tables.table_modern(results, plan.modern_arch, MODERN_INITS, plan.threshold),
                "", f"![training curves](curves_{plan.modern_arch}.png)", ""]
    out += ["## Checks", ""] + checks(results, len(x_te))
    return "\n".join(out) + "\n"


def _paper_layer_sections(plan: Plan, results: list[dict]) -> list[str]:
    """Tables 8, 9 and 10 with the paper's figures: FitNet-4, per layer, seed 0."""
    arch = "fitnet4_digits"
    if arch not in plan.budgets:
        return []
    acts = [a for a in plan.activations if a != "sigmoid"]  # Table 9 has no sigmoid
    ours_fans = {a: fan_ins(arch, a) for a in acts}
    paper_fans = {a: fan_ins(PAPER_NET, a) for a in acts}
    out = []
    intro = ("Our layers are matched to the paper's in graph order (our fc2, the classifier, "
             "has no row there). Our net has half the paper's conv widths and a quarter of "
             "its fc, so absolute stds differ with the fan-in; the pattern table below "
             "compares what does not: each layer's gain std x sqrt(fan_in), with the paper's "
             f"fan-ins from its own net (`fitnets.build(\"{PAPER_NET}\")`).")
    if "relu" in plan.activations:
        cols8 = [("relu", i) for i in ("lsuv", "orthonormal", "msra", "xavier")
                 if i in plan.inits]
        quoted8 = {("relu", i): paper.TABLE8[i] for i in paper.TABLE8}
        out += ["## Table 8: weight std per layer by init, FitNet-4, relu", "", intro, "",
                tables.table_layers_with_paper(results, arch, cols8, plan.lsuv_batch, quoted8,
                                               paper.LAYERS), "",
                tables.gain_pattern_with_paper(results, arch, cols8, plan.lsuv_batch,
                                               ours_fans, quoted8, paper_fans, paper.LAYERS,
                                               convs_after_pools(arch)), ""]
    if "lsuv" in plan.inits:
        cols9 = [(a, "lsuv") for a in ("tanh", "relu", "vlrelu", "maxout") if a in acts]
        quoted9 = {(a, "lsuv"): paper.TABLE9[a] for a in paper.TABLE9}
        out += ["## Table 9: weight std per layer found by LSUV, by activation, FitNet-4", "",
                intro, "",
                tables.table_layers_with_paper(results, arch, cols9, plan.lsuv_batch, quoted9,
                                               paper.LAYERS), "",
                tables.gain_pattern_with_paper(results, arch, cols9, plan.lsuv_batch,
                                               ours_fans, quoted9, paper_fans, paper.LAYERS,
                                               convs_after_pools(arch)), ""]
    if "relu" in plan.activations and any(r.get("grad_var") for r in results):
        inits10 = [i for i in ("lsuv", "msra", "orthonormal", "xavier") if i in plan.inits]
        out += ["## Table 10: the gradient's variance per layer over the first 10 "
                "mini-batches, FitNet-4, relu", "",
                "The variance of dL/dW's entries, per layer, averaged over the first "
                f"{GRAD_VAR_BATCHES} training mini-batches (of {plan.budgets[arch].batch} images; "
                "the "
                "paper: \"the average variance of the gradient at all layers after 10 "
                "mini-batches\"), seed 0. Our loss, data and widths differ, so compare the "
                "patterns: how flat the convs are (largest / smallest) and how the gradient "
                "changes from the first conv to the last.", "",
                tables.table10_with_paper(results, arch, "relu", inits10, plan.lsuv_batch,
                                          paper.TABLE10, paper.LAYERS), ""]
    return out


def analytic_gains() -> dict[str, float]:
    """``torch.nn.init.calculate_gain`` per activation, and 1 for maxout (it has none)."""
    from torch.nn.init import calculate_gain

    return {"relu": calculate_gain("relu"),
            "vlrelu": calculate_gain("leaky_relu", VLRELU_SLOPE),
            "tanh": calculate_gain("tanh"), "sigmoid": calculate_gain("sigmoid"),
            "maxout": 1.0}


def transformers_markdown(plan: study.TransformerPlan, results: list[dict], meta: dict) -> str:
    """RESULTS.md of ``--study transformers``: settings, issue 28's goals checked, per net the
    accuracy or loss table, the curves, the health statistics at init and the roles found,
    the calibration sweep if it ran, the checks."""
    v = meta["versions"]
    out = [
        "# Results: three inits on three transformers (issue 28)",
        "",
        f"Written by `{meta['command']}` on {meta['date']}: {len(results)} runs in "
        f"{meta['wall_s'] / 60:.1f} minutes, {meta['jobs']} at a time ({meta['machine']}).",
        f"onnx-lsuv: commit {v.get('onnx_lsuv_commit', 'unknown')}; experiments/: commit "
        f"{meta.get('experiments_commit', 'unknown')}.",
        "Versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if k != "onnx_lsuv_commit")
        + ".",
        "Every number below is computed from `results.json` by "
        "`experiments/result_tables.py`; `experiments/README.md` discusses them.",
    ]
    if meta.get("reused"):
        r = meta["reused"]
        out.append(f"The {r['runs']} runs of PyTorch's default init (which never calls "
                   f"onnx-lsuv) were taken from `{r['from']}/results.json`, written by "
                   f"`{r['command']}` on {r['date']} (experiments/ commit "
                   f"{r['experiments_commit']}); the wall time above leaves them out.")
    out += [
        "",
        "## Settings",
        "",
        "- Inits: PyTorch's defaults as the modules are built (Linear: Kaiming-uniform with "
        "a = sqrt(5); nn.Embedding: N(0, 1); LayerNorm 1 and 0; position embeddings "
        "truncated normal, std 0.02), or `onnx_lsuv.frameworks.torch.lsuv_module(module, "
        "batch, exporter=\"torchscript\", policy=...)` from those weights: a TorchScript "
        "export, LSUV on it (Tol_var 0.1, T_max 10, seed = the run's seed) and the new "
        "weights written back by name. `policy=\"paper\"`: Algorithm 1 on every layer; "
        "`policy=\"transformer\"`: the per-role targets, at the policy's defaults unless a "
        "row says otherwise.",
        f"- LSUV measures on {plan.lsuv_batch} training images (the digits nets) or "
        f"{plan.lsuv_batch} windows of {study.CONTEXT} training characters (the language "
        f"model): one fixed draw (seed {LSUV_BATCH_SEED}) for every run.",
        "- A seed sets PyTorch's initial weights (which LSUV starts from) and the order of the "
        "training batches; the same for every init.",
        "- Health statistics: measured on each net before training with PyTorch forward hooks "
        "in float64, apart from onnx-lsuv, on data LSUV never saw: the 450 test images, or "
        f"the first {study.HEALTH_WINDOWS} validation windows. Means over the seeds; per "
        "block, block 1 first. A causal block's logit std is over its unmasked entries.",
    ]
    for arch, b in plan.budgets.items():
        seeds = plan.seeds[arch]
        drop = f", x0.1 from epoch {b.lr_drop_epoch + 1}" if b.lr_drop_epoch is not None else ""
        subset = f", first {b.train_subset} training items" if b.train_subset else ""
        if b.steps:
            out.append(f"- {study.TITLES[arch]}: AdamW, lr {b.lr} (linear warm-up over "
                       f"{b.warmup_steps} steps{drop}), weight decay {b.weight_decay}, batch "
                       f"{b.batch} random windows, {b.epochs} x {b.steps} = "
                       f"{b.epochs * b.steps} steps, the validation loss after every "
                       f"{b.steps}{subset}; seeds {', '.join(map(str, seeds))}.")
        else:
            out.append(f"- {study.TITLES[arch]}: AdamW, lr {b.lr}{drop}, weight decay "
                       f"{b.weight_decay}, batch {b.batch}, {b.epochs} epochs{subset}; seeds "
                       f"{', '.join(map(str, seeds))}.")
    lm = meta.get("lm_data")
    if lm:
        out.append(
            f"- The language model's text: Python {lm['python']}'s standard library "
            f"(`{lm['stdlib']}`, {lm['files']} .py files outside site-packages), split by "
            f"file: held out when crc32(path) % {study.VAL_EVERY} == 0; each side's files in "
            "crc32 order, concatenated and cut at "
            f"{lm['chars']['train']:,} training and {lm['chars']['val']:,} validation "
            f"characters ({len(lm['train_files'])} and {len(lm['val_files'])} files, listed "
            "in `results.json`). "
            f"Vocabulary: newline and the 95 printable ASCII characters, and one token for "
            f"any other ({lm['unk']['train']} and {lm['unk']['val']} such characters); "
            f"{study.VOCAB_SIZE} tokens, chance = ln {study.VOCAB_SIZE} = "
            f"{math.log(study.VOCAB_SIZE):.2f} nats.")
    goals = tables.transformer_goals(results, [a for a in study.DIGITS_ARCHS
                                               if a in plan.budgets], study.LM_ARCH)
    if goals:
        out += ["", "## Issue 28's goals, checked on these runs", ""] + goals
    for arch in plan.budgets:
        is_lm = arch == study.LM_ARCH
        out += ["", f"## {study.TITLES[arch]}", "",
                tables.table_transformer_lm(results, arch, plan.inits, plan.lm_threshold)
                if is_lm else tables.table_transformer_digits(results, arch, plan.inits,
                                                              plan.threshold),
                "", f"![training curves](curves_{arch}.png)", "",
                "### Health at init", "", tables.table_health(results, arch, plan.inits)]
        roles = tables.table_roles(results, arch)
        if roles:
            out += ["", "### The layers' roles in onnx-lsuv's report (transformer policy, "
                    "seed 0)", "", roles]
    if plan.calibration_arch in plan.budgets and len(plan.calibration) > 1:
        variants = {k: study.CALIBRATION[k] for k in plan.calibration}
        out += ["", f"## Calibration sweep: the transformer policy's options, "
                f"{plan.calibration_arch}", "",
                f"Seeds {', '.join(map(str, plan.calibration_seeds))} (the first row: the "
                "main runs of those seeds at the defaults). Every row that ran is kept.", "",
                tables.table_calibration(
                    [r for r in results if r["config"]["variant"]
                     or r["config"]["seed"] in plan.calibration_seeds],
                    plan.calibration_arch, variants, plan.threshold)]
    out += ["", "## Checks", ""] + transformer_checks(results)
    return "\n".join(out) + "\n"


def transformer_checks(results: list[dict]) -> list[str]:
    """Whether the runs measured what they claim to: onnx-lsuv's verdict per policy, the
    export round trip."""
    lines = []
    for init in study.INITS[1:]:
        runs = [r for r in results if r["config"]["init"] == init]
        if runs:
            ok = sum(bool(r["lsuv_converged"]) for r in runs)
            lines.append(f"- `policy=\"{init}\"`: onnx-lsuv reported every layer converged "
                         f"in {ok} of {len(runs)} runs.")
    trips = [r["conversion_diff"] for r in results if r["conversion_diff"] is not None]
    if trips:
        lines.append("- The export round trip: largest max |PyTorch module with the "
                     "written-back weights - ONNX Runtime on onnx-lsuv's model| / max |ONNX "
                     f"Runtime| over the LSUV runs: {max(trips):.2g}.")
    return lines or ["- No LSUV run finished."]


def checks(results: list[dict], n_test: int) -> list[str]:
    """Lines that say whether the runs measured what they claim to."""
    if not results:
        return ["- No run finished."]
    lsuv = [r for r in results if r["config"]["init"] == "lsuv"
            and not r["config"].get("variant")]
    enough = [r for r in lsuv if r["config"]["lsuv_batch"] >= MIN_RECOMMENDED_BATCH]
    onnx_nets = [r for r in results if r["config"]["arch"] in ARCH_TITLES]
    modern = [r for r in lsuv if r["config"]["arch"] in MODERN_TITLES]
    converged = sum(bool(r["lsuv_converged"]) for r in lsuv)
    lines = [f"- onnx-lsuv reported every layer converged in {converged} of {len(lsuv)} LSUV "
             "runs."]
    if onnx_nets:
        lines.insert(0, "- ONNX to PyTorch conversion: largest max |torch - ONNX Runtime| / max "
                     "|ONNX Runtime| on the output of any net before training: "
                     f"{max(r['conversion_diff'] for r in onnx_nets):.2g}.")
    if modern:
        lines.append("- The modern net's export round trip: largest max |PyTorch module with "
                     "the written-back weights - ONNX Runtime on onnx-lsuv's model| / max |ONNX "
                     f"Runtime|: {max(r['conversion_diff'] for r in modern):.2g}.")
    if enough:
        lines.append(
            f"- Worst |var - 1| of any initialised layer's output on the {n_test} held-out "
            f"test images (which LSUV never saw), for LSUV on batches of "
            f"{MIN_RECOMMENDED_BATCH} or more images; measured apart from onnx-lsuv, with its "
            "own ONNX Runtime session and numpy (the modern net: PyTorch forward hooks): "
            f"{max(r['test_var_worst'] for r in enough):.3f}.")
    return lines


@click.command(help=__doc__.split("\n\n")[0])
@click.option("--quick", is_flag=True,
              help="Smoke mode: 2 activations, 2 inits, 1-3 epochs on 192 images, every study "
                   "once (CI runs it).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Where to write. Defaults to experiments/results, or out/experiments-quick "
                   "with --quick.")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Runs at a time, each in its own process on one thread. Defaults to the "
                   "CPUs available.")
@click.option("--seeds", type=click.IntRange(min=1), default=None,
              help="Seeds per cell. Defaults to 2 (1 with --quick); the modern net's are 5 "
                   "(1) unless this is given.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Learning rate for every net, instead of the study's 0.003 (SGD) and the "
                   "modern net's 0.001 (AdamW).")
@click.option("--tables-only", is_flag=True,
              help="Rewrite RESULTS.md and the plots from the results.json in --out; no runs.")
@click.option("--study", "which", type=click.Choice(["paper", "transformers"]),
              default="paper", show_default=True,
              help="paper: the paper's claims (and the modern ViT). transformers: issue 28's "
                   "three inits (PyTorch's default, policy=\"paper\" and "
                   "policy=\"transformer\") on the digits ViT, a post-LN encoder and a "
                   "character LM on the standard library; writes experiments/"
                   "results-transformers by default.")
@click.option("--calibration", is_flag=True,
              help="With --study transformers: also the transformer policy with other "
                   "options (transformer_study.CALIBRATION) on the ViT, 3 seeds.")
@click.option("--reuse-default", "reuse", type=click.Path(exists=True, file_okay=False),
              default=None,
              help="With --study transformers: take the PyTorch-default runs (which never call "
                   "onnx-lsuv) from this folder's results.json where their config is one of "
                   "this plan's, instead of running them again; RESULTS.md says how many and "
                   "from where.")
@click.option("--arch", "archs", multiple=True,
              type=click.Choice(list(ARCH_TITLES) + list(MODERN_TITLES) + list(
                  a for a in study.ARCHS if a not in MODERN_TITLES)),
              help="Only this net (repeat for more). Defaults to all. The modern net "
                   "(vit_digits) runs only when named, or when no --arch, --activation or "
                   "--init narrows the plan. postln_digits and chargpt_stdlib: --study "
                   "transformers only.")
@click.option("--activation", "activations", multiple=True, type=click.Choice(ACTIVATIONS),
              help="Only this activation (repeat for more). Defaults to all five.")
@click.option("--init", "inits", multiple=True,
              type=click.Choice(list(INITS) + list(study.INITS)),
              help="Only this init (repeat for more). Defaults to all four (--study "
                   "transformers: default, paper, transformer).")
def main(quick: bool, out: str | None, jobs: int | None, seeds: int | None,
         lr: float | None, tables_only: bool, which: str, calibration: bool,
         reuse: str | None, archs: tuple[str, ...], activations: tuple[str, ...],
         inits: tuple[str, ...]) -> None:
    root = os.path.dirname(HERE)
    suffix = "-transformers" if which == "transformers" else ""
    out = out or (os.path.join(root, "out", f"experiments{suffix}-quick") if quick
                  else os.path.join(HERE, f"results{suffix}"))
    if tables_only:
        with open(os.path.join(out, "results.json")) as f:
            saved = json.load(f)
        write_tables(_plan_from_dict(saved["meta"]["plan"]), saved["runs"], saved["meta"], out)
        click.echo(f"rewrote {os.path.join(out, 'RESULTS.md')}", err=True)
        return
    if which == "transformers":
        plan = _transformer_plan(quick, calibration, seeds, lr, archs, activations, inits)
    else:
        plan = _paper_plan(quick, seeds, lr, archs, activations, inits)
    reused, extra = _reused(reuse, which == "transformers")
    # which code ran: taken before the runs (an edit while they run does not change them)
    extra.update(versions=_versions(), experiments_commit=_commit(__file__))
    jobs = jobs or _cpus()
    command = " ".join(["python experiments/run.py", *sys.argv[1:]])
    click.echo(f"{len(plan.configs())} runs, {jobs} at a time; writing to {out}", err=True)
    results, failures, seconds = execute(plan, jobs, echo=lambda s: click.echo(s, err=True),
                                         reused=reused)
    if reused:
        extra["reused"]["runs"] = sum(r in reused for r in results)
    write_outputs(plan, results, seconds, jobs, out, command, extra)
    click.echo(f"done in {seconds / 60:.1f} min: {os.path.join(out, 'RESULTS.md')}", err=True)
    if failures:
        raise click.ClickException(f"{len(failures)} run(s) failed (the tables leave them "
                                   "out):\n" + "\n".join(failures))


def _reused(folder: str | None, transformers: bool) -> tuple[list[dict], dict]:
    """--reuse-default: the PyTorch-default runs of ``folder``'s results.json, and what the
    new results.json records about them (from where, written by what, when)."""
    if folder is None:
        return [], {}
    if not transformers:
        raise click.UsageError("--reuse-default goes with --study transformers")
    with open(os.path.join(folder, "results.json")) as f:
        saved = json.load(f)
    runs = [r for r in saved["runs"] if r["config"]["init"] == "default"
            and r["config"].get("study") == study.STUDY]
    meta = saved["meta"]
    return runs, {"reused": {"from": os.path.relpath(folder, os.path.dirname(HERE)),
                             "command": meta["command"], "date": meta["date"],
                             "experiments_commit": meta.get("experiments_commit", "unknown"),
                             "runs": 0}}


def _transformer_plan(quick: bool, calibration: bool, seeds: int | None, lr: float | None,
                      archs: tuple[str, ...], activations: tuple[str, ...],
                      inits: tuple[str, ...]) -> study.TransformerPlan:
    """--study transformers' plan, from the options (refused where they do not apply)."""
    wrong = [a for a in archs if a not in study.ARCHS] + [i for i in inits
                                                          if i not in study.INITS]
    if wrong or activations:
        raise click.UsageError(f"--study transformers runs the nets {', '.join(study.ARCHS)} "
                               f"with the inits {', '.join(study.INITS)} (each net its own "
                               f"activation); not {', '.join(wrong or activations)}")
    plan = (study.QUICK if quick else study.FULL).narrowed(archs, inits)
    if seeds is not None:
        plan = plan.with_seeds(seeds)
    if lr is not None:
        plan = replace(plan, budgets={k: replace(b, lr=lr) for k, b in plan.budgets.items()})
    if calibration:
        plan = replace(plan, calibration_arch="vit_digits", calibration=tuple(study.CALIBRATION),
                       calibration_seeds=(0,) if quick else (0, 1, 2))
    if not plan.configs():
        raise click.UsageError("nothing to run: the --arch and --init choices leave no run")
    return plan


def _paper_plan(quick: bool, seeds: int | None, lr: float | None, archs: tuple[str, ...],
                activations: tuple[str, ...], inits: tuple[str, ...]) -> Plan:
    """The paper study's plan, from the options (refused where they do not apply)."""
    wrong = [a for a in archs if a not in ARCH_TITLES and a not in MODERN_TITLES] + [
        i for i in inits if i not in INITS]
    if wrong:
        raise click.UsageError(f"{', '.join(wrong)}: --study transformers only")
    plan = (QUICK if quick else FULL).narrowed(archs, activations, inits)
    if not plan.configs():
        raise click.UsageError("nothing to run: the --arch, --activation and --init choices "
                               "leave no run in this plan")
    if seeds is not None:
        plan = replace(plan, seeds=tuple(range(seeds)), modern_seeds=tuple(range(seeds)))
    if lr is not None:
        plan = replace(plan, budgets={k: replace(b, lr=lr) for k, b in plan.budgets.items()},
                       modern_budget=plan.modern_budget and replace(plan.modern_budget, lr=lr))
    return plan


if __name__ == "__main__":
    main()
