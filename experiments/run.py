"""Does an onnx-lsuv-initialised ONNX net train where standard inits stall? Measure it.

    python experiments/run.py            # the full study (10 to 16 minutes on 2 cores)
    python experiments/run.py --quick    # the smoke test CI runs (seconds)

Builds deep, thin nets in ONNX (a FitNet-4-like CNN and a 25-layer MLP) with five activations,
initialises each with onnx-lsuv (LSUV, and the orthonormal, Xavier and MSRA baselines), trains
it in PyTorch on scikit-learn's handwritten digits, and writes RESULTS.md (tables in the style
of the paper's Tables 3, 7 and 8), results.json (every curve) and training-curve PNGs.
Needs torch, scikit-learn and matplotlib: pip install -e ".[experiments]" torch==2.13.0
"""

from __future__ import annotations

import datetime
import itertools
import json
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

import result_tables as tables  # noqa: E402
from fitnets import VLRELU_SLOPE  # noqa: E402
from training import INITS, LSUV_BATCH_SEED, Budget, RunConfig, digits_split, fan_ins, run  # noqa: E402

ACTIVATIONS = ("relu", "vlrelu", "tanh", "sigmoid", "maxout")
ARCH_TITLES = {
    "fitnet4_digits": "FitNet-4-like CNN (17 conv + 2 fc, 16x16 digits)",
    "mlp25_digits": "25-layer MLP (64 units, raw 8x8 digits)",
}


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
        return grid + study + variants

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
        """This plan on some nets, activations and inits only (all where one is empty)."""
        def keep(chosen: tuple[str, ...], full) -> tuple[str, ...]:
            return tuple(x for x in full if not chosen or x in chosen)

        return replace(self, budgets={a: self.budgets[a] for a in keep(archs, self.budgets)},
                       activations=keep(activations, self.activations),
                       inits=keep(inits, self.inits))


FULL = Plan(
    budgets={
        "fitnet4_digits": Budget(epochs=10, lr=0.003, lr_drop_epoch=7),
        "mlp25_digits": Budget(epochs=30, lr=0.003, lr_drop_epoch=22),
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
)
QUICK = Plan(
    budgets={
        "fitnet4_digits": Budget(epochs=2, lr=0.003, lr_drop_epoch=1, train_subset=192),
        "mlp25_digits": Budget(epochs=3, lr=0.003, lr_drop_epoch=2, train_subset=192),
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
)


def _work(cfg: RunConfig) -> dict:
    return run(cfg).to_dict()


def _label(cfg: RunConfig) -> str:
    return (f"{cfg.arch:15s} {cfg.activation:8s} {cfg.init:12s} seed {cfg.seed} "
            f"batch {cfg.lsuv_batch:4d}" + (f" {cfg.variant}" if cfg.variant else ""))


def execute(plan: Plan, jobs: int, echo=print) -> tuple[list[dict], list[str], float]:
    """Every run of ``plan``, ``jobs`` at a time in worker processes.

    Returns (results, failures, seconds). A run that raises is reported and the others go on,
    so one failure does not throw away the rest of a long study.
    """
    configs = plan.configs()
    # The slowest first (the nets in the plan's order, maxout's doubled layers first within a
    # net), so the pool drains evenly.
    order = list(plan.budgets)
    configs.sort(key=lambda c: (order.index(c.arch), c.activation != "maxout"))
    t = time.perf_counter()
    results, failures = [], []
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
            status = "n/c" if tables.not_converged(res) else f"{res['test_acc'][-1]:.1%}"
            echo(f"[{done:3d}/{len(configs)}] {_label(cfg)}: test {status}, "
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

    return {"onnx_lsuv": onnx_lsuv.__version__, "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": numpy.__version__, "scikit-learn": sklearn.__version__,
            "python": platform.python_version()}


def write_outputs(plan: Plan, results: list[dict], seconds: float, jobs: int, out: str,
                  command: str) -> None:
    """results.json, then RESULTS.md and the PNG curves, under ``out``."""
    os.makedirs(out, exist_ok=True)
    meta = {"command": command, "date": datetime.date.today().isoformat(),
            "wall_s": round(seconds, 1), "jobs": jobs, "machine": _machine(),
            "versions": _versions(), "plan": _plan_dict(plan)}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "runs": results}, f, indent=1)
    write_tables(plan, results, meta, out)


def write_tables(plan: Plan, results: list[dict], meta: dict, out: str) -> None:
    """RESULTS.md and the PNG curves under ``out``, from the runs' results."""
    for arch in plan.budgets:
        tables.plot_curves(results, arch, plan.activations, plan.inits, plan.lsuv_batch,
                           os.path.join(out, f"curves_{arch}.png"), ARCH_TITLES[arch])
    if plan.has_batch_study:
        tables.plot_batch_sizes(results, plan.batch_arch, plan.batch_activation,
                                plan.batch_sizes, os.path.join(out, "curves_lsuv_batch.png"),
                                f"LSUV batch size: {ARCH_TITLES[plan.batch_arch]}")
    with open(os.path.join(out, "RESULTS.md"), "w") as f:
        f.write(results_markdown(plan, results, meta))


def _plan_dict(plan: Plan) -> dict:
    return asdict(plan)


def _plan_from_dict(d: dict) -> Plan:
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    d["budgets"] = {k: Budget(**v) for k, v in d["budgets"].items()}
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
    some = results[0]["config"] if results else {}
    b0 = next(iter(plan.budgets.values()))
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
        f"- LSUV: Tol_var {some.get('tol')}, T_max {some.get('max_iter')} (onnx-lsuv's "
        f"defaults), on {plan.lsuv_batch} training images: one fixed draw (seed "
        f"{LSUV_BATCH_SEED}) for every run. OrthoNorm, Xavier (Glorot's uniform, variance "
        "2 / (fan_in + fan_out)) and MSRA (normal, variance 2 / fan_in) are onnx-lsuv's "
        "`--init` baselines. Biases start at zero in every run.",
        f"- Training: SGD, momentum {b0.momentum}, weight decay {b0.weight_decay}, "
        "cross-entropy; the same budget for every init and activation of a net:",
    ]
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
        out += [f"## Table 3 style: {ARCH_TITLES[arch]}", "",
                tables.table3(results, arch, plan.activations, plan.inits, plan.threshold,
                              plan.lsuv_batch),
                "", f"![training curves](curves_{arch}.png)", ""]
    for arch in plan.budgets:
        columns = [(plan.activations[0], init) for init in plan.inits] + [
            (act, "lsuv") for act in plan.activations[1:] if "lsuv" in plan.inits]
        out += [f"## Table 8 style: weight std per layer at init, {ARCH_TITLES[arch]}", "",
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
        out += [f"## Table 7 style: LSUV batch size, {ARCH_TITLES[plan.batch_arch]}, "
                f"{plan.batch_activation}", "",
                tables.table7(results, plan.batch_arch, plan.batch_activation,
                              plan.batch_sizes, plan.threshold),
                "", "![LSUV batch size curves](curves_lsuv_batch.png)", ""]
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
    out += ["## Checks", ""] + checks(results, len(x_te))
    return "\n".join(out) + "\n"


def analytic_gains() -> dict[str, float]:
    """``torch.nn.init.calculate_gain`` per activation, and 1 for maxout (it has none)."""
    from torch.nn.init import calculate_gain

    return {"relu": calculate_gain("relu"),
            "vlrelu": calculate_gain("leaky_relu", VLRELU_SLOPE),
            "tanh": calculate_gain("tanh"), "sigmoid": calculate_gain("sigmoid"),
            "maxout": 1.0}


def checks(results: list[dict], n_test: int) -> list[str]:
    """Lines that say whether the runs measured what they claim to."""
    if not results:
        return ["- No run finished."]
    lsuv = [r for r in results if r["config"]["init"] == "lsuv"
            and not r["config"].get("variant")]
    enough = [r for r in lsuv if r["config"]["lsuv_batch"] >= MIN_RECOMMENDED_BATCH]
    worst_port = max(r["conversion_diff"] for r in results)
    converged = sum(bool(r["lsuv_converged"]) for r in lsuv)
    lines = [
        "- ONNX to PyTorch conversion: largest max |torch - ONNX Runtime| / max |ONNX Runtime| "
        f"on the output of any net before training: {worst_port:.2g}.",
        f"- onnx-lsuv reported every layer converged in {converged} of {len(lsuv)} LSUV runs.",
    ]
    if enough:
        lines.append(
            f"- Worst |var - 1| of any Conv/Gemm output on the {n_test} held-out test images "
            f"(which LSUV never saw), for LSUV on batches of {MIN_RECOMMENDED_BATCH} or more "
            "images; measured apart from onnx-lsuv, with its own ONNX Runtime session and "
            f"numpy: {max(r['test_var_worst'] for r in enough):.3f}.")
    return lines


@click.command(help=__doc__.split("\n\n")[0])
@click.option("--quick", is_flag=True,
              help="Smoke mode: 2 activations, 2 inits, 2-3 epochs on 192 images (CI runs it).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Where to write. Defaults to experiments/results, or out/experiments-quick "
                   "with --quick.")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Runs at a time, each in its own process on one thread. Defaults to the "
                   "CPUs available.")
@click.option("--seeds", type=click.IntRange(min=1), default=None,
              help="Seeds per cell. Defaults to 2 (1 with --quick).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Learning rate for every net, instead of the study's 0.003.")
@click.option("--tables-only", is_flag=True,
              help="Rewrite RESULTS.md and the plots from the results.json in --out; no runs.")
@click.option("--arch", "archs", multiple=True, type=click.Choice(list(ARCH_TITLES)),
              help="Only this net (repeat for more). Defaults to both.")
@click.option("--activation", "activations", multiple=True, type=click.Choice(ACTIVATIONS),
              help="Only this activation (repeat for more). Defaults to all five.")
@click.option("--init", "inits", multiple=True, type=click.Choice(INITS),
              help="Only this init (repeat for more). Defaults to all four.")
def main(quick: bool, out: str | None, jobs: int | None, seeds: int | None,
         lr: float | None, tables_only: bool, archs: tuple[str, ...],
         activations: tuple[str, ...], inits: tuple[str, ...]) -> None:
    root = os.path.dirname(HERE)
    out = out or (os.path.join(root, "out", "experiments-quick") if quick
                  else os.path.join(HERE, "results"))
    if tables_only:
        with open(os.path.join(out, "results.json")) as f:
            saved = json.load(f)
        write_tables(_plan_from_dict(saved["meta"]["plan"]), saved["runs"], saved["meta"], out)
        click.echo(f"rewrote {os.path.join(out, 'RESULTS.md')}", err=True)
        return
    plan = (QUICK if quick else FULL).narrowed(archs, activations, inits)
    if not plan.configs():
        raise click.UsageError("nothing to run: the --arch, --activation and --init choices "
                               "leave no run in this plan")
    if seeds is not None:
        plan = replace(plan, seeds=tuple(range(seeds)))
    if lr is not None:
        plan = replace(plan, budgets={k: replace(b, lr=lr) for k, b in plan.budgets.items()})
    jobs = jobs or _cpus()
    command = " ".join(["python experiments/run.py", *sys.argv[1:]])
    click.echo(f"{len(plan.configs())} runs, {jobs} at a time; writing to {out}", err=True)
    results, failures, seconds = execute(plan, jobs, echo=lambda s: click.echo(s, err=True))
    write_outputs(plan, results, seconds, jobs, out, command)
    click.echo(f"done in {seconds / 60:.1f} min: {os.path.join(out, 'RESULTS.md')}", err=True)
    if failures:
        raise click.ClickException(f"{len(failures)} run(s) failed (the tables leave them "
                                   "out):\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
