"""How the cost of onnx-lsuv grows: forward-equivalents and peak memory against depth, width,
batch and sequence length, every figure measured side by side in one process (CPU provider).

    python benchmarks/sweep.py --out DIR           # the full sweep: about 10 minutes on 2 cores
    python benchmarks/sweep.py --quick --out DIR   # tiny sizes, seconds: what the tests run

Writes DIR/SWEEP.md (one markdown table per axis), DIR/sweep.png (four panels) and
DIR/sweep.json. benchmarks/sweep/ holds one full run, with a paragraph written by hand on
what it shows (a new run into that folder replaces the file: keep the paragraph). The four
axes (sizes chosen so that the full sweep fits 10 minutes on 2 cores):

- depth: ResNet-18, 34, 50 and 101 (torchvision layout, ImageNet stem), batch 8, 224x224;
- width: MLPs of 256 to 8192 units (256 input features -> Gemm to w -> ReLU -> Gemm w x w ->
  ReLU -> Gemm to 10), batch 256;
- batch: FitNet-4 (run.py's row, the LSUV paper's CIFAR-10 net) at 32x32, batch 8 to 256;
- sequence length: a 4-layer pre-norm transformer encoder (d 256, 4 heads, MLP 1024, 64 input
  features), batch 8, 32 to 512 tokens.

A forward-equivalent (fwd-eq) is our end-to-end time (``lsuv_init`` from the path, orthonormal
init included; median of up to --reps in-process runs, one where a run takes over 3 s) divided
by the median plain ONNX Runtime forward of the same model and batch in the same process
(benchmarks/run.py's ``plain_session``: default session options, our thread count, warm). The
forwards are timed in turn with our runs (a few before each), so that both see the same load
on a shared machine.
Peak memory is run.py's: the resident high-water mark of a fresh process doing the forward (or
``lsuv_init`` with the model saved, as the CLI does) minus that of a process that only imported
the libraries and loaded the batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import onnx_lsuv  # noqa: E402
from onnx_lsuv import lsuv_init  # noqa: E402
from onnx_lsuv.layers import find_layers  # noqa: E402

from run import _torch_call, machine, peak_rss_mb, plain_session  # noqa: E402

AXES = ("depth", "width", "batch", "seq")
AXIS_TITLES = {"depth": "depth (ResNet-n)", "width": "width (MLP units)",
               "batch": "batch (FitNet-4)", "seq": "sequence length (encoder)"}
SLOW_S = 3.0  # a timed run of ours longer than this is not repeated
FORWARD_ROUND_S = 0.05  # forwards timed before each run of ours: at least 3, and this long
MLP_FEATURES = 256


@dataclass(frozen=True)
class Point:
    """One model and batch of the sweep."""

    axis: str  # one of AXES
    value: int  # the axis coordinate: ResNet depth, MLP width, batch or tokens
    label: str  # the row's model name
    spec: dict  # sweep_models' spec (kind resnet / encoder) or {"kind": "mlp", "width": w}
    input_shape: tuple[int, ...]
    memory: bool = True  # measure peak memory (three fresh processes)

    @property
    def key(self) -> str:
        return f"{self.axis}_{self.value}"


@dataclass(frozen=True)
class Plan:
    """The sizes of one sweep."""

    depths: tuple[int, ...] = (18, 34, 50, 101)
    depth_batch: int = 8
    depth_hw: int = 224
    widths: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)
    width_batch: int = 256
    batches: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
    batch_hw: int = 32
    seqs: tuple[int, ...] = (32, 64, 128, 256, 512)
    encoder: dict = field(default_factory=lambda: dict(d=256, layers=4, heads=4, features=64))
    seq_batch: int = 8
    reps: int = 3
    memory_on: str = "all"  # "all" points, or only the "last" one (three processes a point)


FULL = Plan()
QUICK = Plan(depths=(18, 34), depth_batch=2, depth_hw=32, widths=(64, 128), width_batch=16,
             batches=(2, 4), batch_hw=8, seqs=(8, 16),
             encoder=dict(d=32, layers=2, heads=2, features=8), seq_batch=2, reps=1,
             memory_on="last")


def points(plan: Plan) -> list[Point]:
    """Every point of ``plan``, axis by axis, smallest first."""
    out: list[Point] = []
    for d in plan.depths:
        out.append(Point("depth", d, f"ResNet-{d}", dict(kind="resnet", depth=d, hw=plan.depth_hw),
                         (plan.depth_batch, 3, plan.depth_hw, plan.depth_hw)))
    for w in plan.widths:
        out.append(Point("width", w, f"MLP {w}", dict(kind="mlp", width=w),
                         (plan.width_batch, MLP_FEATURES)))
    for b in plan.batches:
        out.append(Point("batch", b, "FitNet-4", dict(kind="fitnet4", hw=plan.batch_hw),
                         (b, 3, plan.batch_hw, plan.batch_hw)))
    for t in plan.seqs:
        out.append(Point("seq", t, f"encoder {plan.encoder['layers']} x d {plan.encoder['d']}",
                         dict(kind="encoder", seq=t, **plan.encoder),
                         (plan.seq_batch, t, plan.encoder["features"])))
    if plan.memory_on == "last":
        out = [Point(**{**asdict(p), "memory": False}) for p in out[:-1]] + out[-1:]
    return out


def mlp(width: int, features: int = MLP_FEATURES, seed: int = 0) -> onnx.ModelProto:
    """``features`` inputs -> Gemm to ``width`` -> Relu -> Gemm ``width`` x ``width`` -> Relu ->
    Gemm to 10, as torch exports nn.Linear (Gemm, transB=1), with non-zero biases; opset 17,
    IR 8."""
    rng = np.random.default_rng(seed)
    shapes = [(width, features), (width, width), (10, width)]
    nodes, inits, x = [], [], "x"
    for i, (out_f, in_f) in enumerate(shapes):
        w = (rng.standard_normal((out_f, in_f)) / np.sqrt(in_f)).astype(np.float32)
        b = rng.uniform(-0.1, 0.1, out_f).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"fc{i}.weight"),
                  numpy_helper.from_array(b, f"fc{i}.bias")]
        nodes.append(helper.make_node("Gemm", [x, f"fc{i}.weight", f"fc{i}.bias"], [f"g{i}"],
                                      transB=1))
        x = f"g{i}"
        if i < len(shapes) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    graph = helper.make_graph(
        nodes, f"mlp{width}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def export_models(pts: list[Point], tmp: str) -> dict[str, str]:
    """Write every point's model; its path by point key. The torch models are exported in one
    fresh process (one torch import), the batch axis's single model once (its batch is
    dynamic)."""
    paths: dict[str, str] = {}
    specs: dict[str, dict] = {}
    for p in pts:
        if p.spec["kind"] == "mlp":
            paths[p.key] = os.path.join(tmp, f"{p.key}.onnx")
            onnx.save(mlp(p.spec["width"]), paths[p.key])
            continue
        name = "_".join(f"{k}{v}" for k, v in sorted(p.spec.items()))
        path = os.path.join(tmp, f"{name}.onnx")
        specs.setdefault(name, dict(p.spec, path=path, batch=p.input_shape[0]))
        paths[p.key] = path
    if specs:
        listing = os.path.join(tmp, "specs.json")
        with open(listing, "w") as f:
            json.dump(list(specs.values()), f)
        _torch_call(f"import sweep_models; sweep_models.export_all({listing!r})")
    return paths


def _interleaved(path: str, x: np.ndarray, reps: int) -> tuple[list[float], list[float], list]:
    """Plain forwards and runs of ours in turn (a few warm forwards, then one run of ours, up to
    ``reps`` times; once only where a run of ours takes longer than SLOW_S), so that both see
    the same load on a shared machine. The forward times, ours, and our results."""
    sess = plain_session(path, "cpu")
    feeds = {sess.get_inputs()[0].name: x}
    sess.run(None, feeds)  # warm-up: the figure is a steady-state forward
    fwd, ours, results = [], [], []
    for _ in range(reps):
        spent, n = 0.0, 0
        while n < 3 or (spent < FORWARD_ROUND_S and n < 100):
            t = time.perf_counter()
            sess.run(None, feeds)
            fwd.append(time.perf_counter() - t)
            spent, n = spent + fwd[-1], n + 1
        t = time.perf_counter()
        results.append(lsuv_init(path, x, provider="cpu"))
        ours.append(time.perf_counter() - t)
        if ours[-1] > SLOW_S:
            break
    return fwd, ours, results


def measure(p: Point, path: str, tmp: str, reps: int) -> dict:
    """One row: the plain forward, ours end to end with its phases, peak memory."""
    x = np.random.default_rng(0).standard_normal(p.input_shape).astype(np.float32)
    model = onnx.load(path)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    layers, nodes = len(find_layers(model).layers), len(model.graph.node)
    del model
    fwd_times, ours_times, results = _interleaved(path, x, reps)
    fwd, ours = statistics.median(fwd_times), statistics.median(ours_times)
    timings = {k: statistics.median(r.report.timings.get(k, 0.0) for r in results)
               for k in ("init_s", "one_pass_s", "verify_s", "retry_s")}
    rep, runs = results[-1].report, len(results)
    del results
    row = dict(axis=p.axis, value=p.value, model=p.label, input_shape=list(p.input_shape),
               params=params, layers=layers, nodes=nodes,
               forward_s=fwd, ours_s=ours, runs=runs, **timings,
               fwd_eq=ours / fwd, init_fwd_eq=timings["init_s"] / fwd,
               rest_fwd_eq=(ours - timings["init_s"]) / fwd, converged=rep.converged,
               worst=max((abs(r.var_after - 1.0) for r in rep.layers
                          if r.var_after is not None), default=float("nan")),
               measured_in=rep.measured_in)
    if p.memory:
        data = os.path.join(tmp, f"{p.key}.npy")
        np.save(data, x)
        base = peak_rss_mb("baseline", path, data, "cpu")
        row["peak_forward_mb"] = peak_rss_mb("forward", path, data, "cpu") - base
        row["peak_ours_mb"] = peak_rss_mb("lsuv", path, data, "cpu") - base
        os.unlink(data)
    return row


def provenance() -> dict:
    """Where the onnx_lsuv that ran comes from: its checkout, commit, and whether its files
    differ from that commit. A copy outside git (``git archive`` of a commit) names its commit
    in the environment variable ONNX_LSUV_COMMIT."""
    src = os.path.dirname(os.path.dirname(os.path.abspath(onnx_lsuv.__file__)))

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", src, *args], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or None
    dirty = bool(commit and git("status", "--porcelain", "--", "onnx_lsuv"))
    if commit is None and os.environ.get("ONNX_LSUV_COMMIT"):
        commit = os.environ["ONNX_LSUV_COMMIT"] + " (a git archive of it)"
    return dict(onnx_lsuv_path=src, onnx_lsuv_commit=commit, onnx_lsuv_dirty=dirty,
                onnx_lsuv=onnx_lsuv.__version__, onnxruntime=ort.__version__,
                onnx=onnx.__version__, numpy=np.__version__, machine=machine())


def _range(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


def summary(rows: list[dict]) -> str:
    """One line per axis: the spread of each ratio over the axis."""
    lines = ["| axis | ours end to end, fwd-eq | ours without the orthonormal draws, fwd-eq "
             "| orthonormal draws, fwd-eq | peak memory, ours / forward |",
             "|---|---|---|---|---|"]
    for axis in AXES:
        rs = [r for r in rows if r["axis"] == axis]
        if not rs:
            continue
        mem = [r["peak_ours_mb"] / r["peak_forward_mb"] for r in rs
               if "peak_ours_mb" in r and r["peak_forward_mb"] > 0]
        lines.append(f"| {AXIS_TITLES[axis]} | {_range([r['fwd_eq'] for r in rs])} | "
                     f"{_range([r['rest_fwd_eq'] for r in rs])} | "
                     f"{_range([r['init_fwd_eq'] for r in rs])} | {_range(mem)} |")
    return "\n".join(lines)


def axis_table(rows: list[dict]) -> str:
    """The rows of one axis as a markdown table."""
    head = ("| model | input | params | layers | ORT forward s | ours s (runs) | ours fwd-eq "
            "| orthonormal draws s (fwd-eq) | ours without the draws, fwd-eq "
            "| peak MiB: forward / ours (ratio) | worst abs(var-1) | converged |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        mem = (f"{r['peak_forward_mb']:.0f} / {r['peak_ours_mb']:.0f} "
               f"({r['peak_ours_mb'] / r['peak_forward_mb']:.2f})"
               if "peak_ours_mb" in r and r["peak_forward_mb"] > 0 else "-")
        lines.append(
            f"| {r['model']} | {' x '.join(map(str, r['input_shape']))} | "
            f"{r['params'] / 1e6:.2f} M | {r['layers']} | {r['forward_s']:.4f} | "
            f"{r['ours_s']:.2f} ({r['runs']}) | {r['fwd_eq']:.2f} | "
            f"{r['init_s']:.2f} ({r['init_fwd_eq']:.2f}) | {r['rest_fwd_eq']:.2f} | {mem} | "
            f"{r['worst']:.3g} | {'yes' if r['converged'] else 'no'} |")
    return "\n".join(lines)


def markdown(rows: list[dict], meta: dict) -> str:
    """SWEEP.md: provenance, the spread per axis, one table per axis."""
    dirty = " (with uncommitted changes to onnx_lsuv/)" if meta["onnx_lsuv_dirty"] else ""
    text = [f"## {meta['date']}: {meta['machine']}, provider cpu", "",
            f"Command: `{meta['command']}` ({meta['wall_s'] / 60:.1f} minutes). onnx_lsuv "
            f"{meta['onnx_lsuv']} at commit {meta['onnx_lsuv_commit']}{dirty} "
            f"(`{meta['onnx_lsuv_path']}`), onnxruntime {meta['onnxruntime']}, onnx "
            f"{meta['onnx']}, numpy {meta['numpy']}. Load average (1 min) at the start and "
            f"the end: {meta['load_average'][0]:.1f}, {meta['load_average'][1]:.1f}.", "",
            "fwd-eq: seconds divided by the median warm plain ONNX Runtime forward of the same "
            "model and batch in the same process. Peak MiB: resident high-water mark of a fresh "
            "process above one that only imported the libraries and loaded the batch.", "",
            "### Spread over each axis", "", summary(rows)]
    for axis in AXES:
        rs = [r for r in rows if r["axis"] == axis]
        if rs:
            text += ["", f"### {AXIS_TITLES[axis]}", "", axis_table(rs)]
    return "\n".join(text) + "\n"


def plot(rows: list[dict], path: str) -> None:
    """Four panels, one per axis: ours end to end and without the orthonormal draws, in
    forward-equivalents, and the peak memory ratio ours / forward, all multiples of one
    forward, on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, axis in zip(axes.flat, AXES):
        rs = sorted((r for r in rows if r["axis"] == axis), key=lambda r: r["value"])
        ax.set_title(AXIS_TITLES[axis])
        if not rs:
            ax.set_axis_off()
            continue
        x = [r["value"] for r in rs]
        ax.plot(x, [r["fwd_eq"] for r in rs], "o-", label="time, end to end")
        ax.plot(x, [r["rest_fwd_eq"] for r in rs], "s--",
                label="time without the orthonormal draws")
        mem = [(r["value"], r["peak_ours_mb"] / r["peak_forward_mb"]) for r in rs
               if "peak_ours_mb" in r and r["peak_forward_mb"] > 0]
        if mem:
            ax.plot(*zip(*mem), "^:", label="peak memory, ours / forward")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        if axis != "depth":
            ax.set_xscale("log", base=2)
        ax.set_xticks(x)
        ax.set_xticklabels([str(v) for v in x])
        ax.minorticks_off()
        ax.set_ylabel("multiples of one plain forward")
        ax.grid(True, which="major", alpha=0.3)
    handles = {}  # every line's label once (the memory line is missing where not measured)
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    axes.flat[0].legend(handles.values(), handles.keys(), fontsize=8)
    fig.suptitle("onnx-lsuv cost in plain ONNX Runtime forwards (CPU provider)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True,
                    help="directory for SWEEP.md, sweep.png and sweep.json (created)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes, one run each, peak memory of the last point only: "
                         "seconds, for the tests")
    ap.add_argument("--axes", default=",".join(AXES),
                    help="comma-separated, from %(default)s (default: all)")
    ap.add_argument("--reps", type=int, help="timed runs per figure (default: 3; 1 with --quick)")
    args = ap.parse_args(argv)
    axes = args.axes.split(",")
    unknown = sorted(set(axes) - set(AXES))
    if unknown:
        ap.error(f"--axes: unknown axis {', '.join(unknown)}; expected some of {', '.join(AXES)}")
    plan = QUICK if args.quick else FULL
    reps = args.reps or plan.reps
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    pts = [p for p in points(plan) if p.axis in axes]
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnx-lsuv-sweep-") as tmp:
        paths = export_models(pts, tmp)
        print(f"exported {len(set(paths.values()))} models in "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
        for p in pts:
            rows.append(measure(p, paths[p.key], tmp, reps))
            print(f"[{time.perf_counter() - start:4.0f} s] {json.dumps(rows[-1])}",
                  file=sys.stderr)
    command = "python benchmarks/sweep.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    meta = dict(provenance(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                command=command, wall_s=time.perf_counter() - start, reps=reps,
                load_average=[load_start, os.getloadavg()[0]],
                plan=asdict(plan))
    os.makedirs(args.out, exist_ok=True)
    text = markdown(rows, meta)
    with open(os.path.join(args.out, "SWEEP.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)
    plot(rows, os.path.join(args.out, "sweep.png"))
    print(text)


if __name__ == "__main__":
    main()
