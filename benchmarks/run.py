"""Side-by-side benchmark: onnx-lsuv against one plain ONNX Runtime forward, its own naive
strategy, and the author's PyTorch ``lsuv`` 0.3.0, every figure measured in this run.

    python benchmarks/run.py                      # CPU table, markdown on stdout
    python benchmarks/run.py --provider cuda --models resnet50_224
    python benchmarks/run.py --append benchmarks/RESULTS.md

Needs torch (the models are defined in PyTorch and exported with torch.onnx.export, so both
sides run the same architecture); lsuv 0.3.0 adds its column when installed. Without torch only
FitNet-4 (built with onnx.helper, from sample_models/) and the CaffeNet-sized orthonormal init
run. Times are medians over --reps runs; a forward-equivalent is our time divided by the median
plain forward of the same model, batch and provider, in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "sample_models"))

from onnx_lsuv import __version__, lsuv_init  # noqa: E402
from onnx_lsuv.engine import Engine  # noqa: E402
from onnx_lsuv.layers import find_layers  # noqa: E402
from onnx_lsuv.orthonormal import (  # noqa: E402
    default_workers,
    orthonormal_many,
)


@dataclass(frozen=True)
class Case:
    key: str  # row name
    torch_name: str  # name in torch_models.MODELS
    batch: int
    hw: int
    naive: bool = True  # run our naive strategy too
    # the input's shape after the batch, where it is not an image of 3 x hw x hw
    shape: tuple[int, ...] | None = None
    lsuv030: bool = True  # lsuv 0.3.0 runs it (an image classifier)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.batch, *(self.shape or (3, self.hw, self.hw)))


CASES = {
    "fitnet4": Case("fitnet4", "fitnet4", 128, 32),
    "resnet18": Case("resnet18", "resnet18_cifar", 32, 64),
    "resnet50": Case("resnet50", "resnet50_like", 8, 224),
    "resnet50_224": Case("resnet50_224", "resnet50_like", 32, 224),
    # a transformer decoder (2 layers, d 48) whose 18 greedy steps the export unrolls (6,271
    # nodes, each weight read by up to 18 MatMuls); input: 24 frames of 32 features
    "decoder": Case("decoder", "greedy_decoder", 32, 24, shape=(24, 32), lsuv030=False),
}
DEFAULT_CPU = ["fitnet4", "resnet18", "resnet50"]

# CaffeNet (Krizhevsky et al. 2012 as in Caffe): weight matrices as (groups, out, fan-in).
CAFFENET = [(1, 96, 363), (2, 128, 1200), (1, 384, 2304), (2, 192, 1728), (2, 128, 1728),
            (1, 4096, 9216), (1, 4096, 4096), (1, 1000, 4096)]


def _median_time(fn, reps: int) -> tuple[float, list]:
    times, results = [], []
    for _ in range(reps):
        t = time.perf_counter()
        results.append(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times), results


def plain_session(path: str, provider: str) -> ort.InferenceSession:
    """What a user runs: ONNX Runtime's default session options (prepacking, memory arena),
    with the threads ours use."""
    engine = Engine(provider)
    so = ort.SessionOptions()
    so.intra_op_num_threads = default_workers()
    return ort.InferenceSession(path, so, providers=engine.providers)


def plain_forward(path: str, x: np.ndarray, provider: str, reps: int) -> float:
    sess = plain_session(path, provider)
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})  # warm-up: the figure is a steady-state forward
    return _median_time(lambda: sess.run(None, {name: x}), reps)[0]


def peak_rss_mb(mode: str, path: str, data: str, provider: str) -> float:
    """Peak resident memory of a fresh process doing ``mode`` (forward, or lsuv_init with the
    new model saved beside the input, as the CLI does), in MiB."""
    code = (
        "import sys, os, numpy as np\n"
        f"sys.path.insert(0, {HERE!r})\n"
        "mode, path, data, provider = sys.argv[1:]\n"
        "x = np.load(data)\n"
        "if mode == 'baseline':\n"
        "    import onnx_lsuv, onnx_lsuv.engine, onnxruntime\n"
        "elif mode == 'forward':\n"
        "    from run import plain_session\n"
        "    s = plain_session(path, provider)\n"
        "    s.run(None, {s.get_inputs()[0].name: x})\n"
        "else:\n"
        "    from onnx_lsuv import lsuv_init\n"
        "    lsuv_init(path, x, provider=provider).save(path + '.out.onnx')\n"
        "    os.unlink(path + '.out.onnx')\n"
        # VmHWM: this process's own high-water mark (ru_maxrss keeps the parent's across exec)
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, mode, path, data, provider],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024.0


def _torch_call(code: str) -> str:
    """Run ``code`` in a fresh Python with benchmarks/ importable; its stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env=env).stdout


def bench_case(case: Case, provider: str, reps: int, tmp: str, torch_ok: bool,
               lsuv_ok: bool, naive: bool) -> dict:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(case.input_shape).astype(np.float32)
    path = os.path.join(tmp, f"{case.key}.onnx")
    if torch_ok:  # torch works in subprocesses: its threads never share this process's cores
        _torch_call(f"import torch, torch_models; torch.manual_seed(0); "
                    f"torch_models.export_onnx(torch_models.MODELS[{case.torch_name!r}](), "
                    f"{tuple(x.shape)!r}, {path!r})")
    elif case.key == "fitnet4":
        from fitnets import build

        onnx.save(build("fitnet4", "relu"), path)
    else:
        return {}
    data = os.path.join(tmp, f"{case.key}.npy")
    np.save(data, x)
    model = onnx.load(path)
    layers = find_layers(model).layers
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)

    fwd = plain_forward(path, x, provider, reps)
    ours_s, results = _median_time(lambda: lsuv_init(path, x, provider=provider), reps)
    timings = {k: statistics.median(r.report.timings.get(k, 0.0) for r in results)
               for k in ("init_s", "one_pass_s", "verify_s", "retry_s")}
    rep = results[-1].report
    hw = "x".join(map(str, case.shape)) if case.shape else case.hw
    row = dict(model=case.key, batch=case.batch, hw=hw, nodes=len(model.graph.node),
               layers=len(layers),
               params=params, provider=rep.provider, forward_s=fwd, ours_s=ours_s, **timings,
               converged=rep.converged,
               worst=max(abs(r.var_after - 1.0) for r in rep.layers if r.var_after is not None))
    if naive and case.naive:
        t = time.perf_counter()
        lsuv_init(path, x, provider=provider, strategy="naive")
        row["naive_s"] = time.perf_counter() - t
    if lsuv_ok and provider == "cpu" and case.lsuv030:
        r = json.loads(_torch_call(
            f"import json; from bench_lsuv_torch import time_lsuv_torch; "
            f"print(json.dumps(time_lsuv_torch({case.torch_name!r}, {case.batch}, {case.hw})))"
        ).splitlines()[-1])
        row["lsuv030_s"] = r["seconds"]
        row["torch_forward_s"] = r["forward_seconds"]
    if provider == "cpu":  # above the imports and the batch: what the model run itself holds
        base = peak_rss_mb("baseline", path, data, provider)
        row["peak_forward_mb"] = peak_rss_mb("forward", path, data, provider) - base
        row["peak_ours_mb"] = peak_rss_mb("lsuv", path, data, provider) - base
    return row


def _orthonormality(mats: list[np.ndarray]) -> float:
    worst = 0.0
    for layer in mats:
        for w in layer.astype(np.float64):
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            worst = max(worst, float(np.abs(gram - np.eye(len(gram))).max()))
    return worst


def _blas_threaded(shapes, seed: int) -> list[np.ndarray]:
    """The same algorithm without its fixed blocks: each draw on BLAS's own threads, one GEMM
    per block (bits may then depend on the thread count): the cost of determinism."""
    from threadpoolctl import threadpool_limits

    from onnx_lsuv import orthonormal as o

    out = []
    with threadpool_limits(limits=default_workers(), user_api="blas"):
        for i, (g, r, c) in enumerate(shapes):
            rng = np.random.default_rng([seed, i])
            tall, short = max(r, c), min(r, c)
            if tall * short < o.SMALL:
                out.append(o.orthonormal_matrices(g, r, c, rng))
                continue
            seeds = rng.integers(0, 2**63 - 1, size=(g, -(-short // o.NB)), dtype=np.int64)
            mats = []
            for k in range(g):
                q = o.stewart_q(tall, short, seeds[k], np.float32, None,
                                chunk=-(-short // o.NB) * o.NB)
                mats.append(q.T if r <= c else q)
            out.append(np.stack(mats))
    return out


def bench_caffenet_orthonormal(reps: int, torch_ok: bool) -> dict:
    """Our orthonormal init of CaffeNet's weights against torch.nn.init.orthogonal_ on the
    same shapes (a fresh process with the same thread count), and against the same algorithm
    on BLAS's own threads."""
    dts = [np.dtype(np.float32)] * len(CAFFENET)
    secs, results = _median_time(lambda: orthonormal_many(CAFFENET, 0, dts), reps)
    threaded, _ = _median_time(lambda: _blas_threaded(CAFFENET, 0), reps)
    params = sum(int(np.prod(s)) for s in CAFFENET)
    row = dict(model="caffenet (orthonormal init only)", params=params, init_s=secs,
               blas_threaded_s=threaded, orthonormality=_orthonormality(results[-1]))
    if torch_ok:
        row["torch_orthogonal_s"] = float(_torch_call(
            "import time, statistics, torch\n"
            f"torch.set_num_threads({default_workers()})\n"
            "times = []\n"
            f"for _ in range({reps}):\n"
            "    t = time.perf_counter()\n"
            f"    for g, r, c in {CAFFENET!r}:\n"
            "        for _ in range(g):\n"
            "            torch.nn.init.orthogonal_(torch.empty(r, c))\n"
            "    times.append(time.perf_counter() - t)\n"
            "print(statistics.median(times))\n").split()[-1])
    return row


def bench_heavy(reps: int, tmp: str, provider: str) -> dict:
    """Memory on a weight-heavy model: six Gemm 4096 x 4096 with Tanh between (403 MB of
    weights), batch 64."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    d, n = 4096, 6
    nodes, inits, x = [], [], "x"
    for i in range(n):
        inits += [numpy_helper.from_array(rng.standard_normal((d, d), dtype=np.float32) * 0.02,
                                          f"W{i}"),
                  numpy_helper.from_array(rng.standard_normal(d).astype(np.float32), f"B{i}")]
        nodes += [helper.make_node("Gemm", [x, f"W{i}", f"B{i}"], [f"g{i}"], transB=1),
                  helper.make_node("Tanh", [f"g{i}"], [f"t{i}"])]
        x = f"t{i}"
    graph = helper.make_graph(nodes, "heavy", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [64, d])], [helper.make_tensor_value_info(
            x, TensorProto.FLOAT, [64, d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path, data = os.path.join(tmp, "heavy.onnx"), os.path.join(tmp, "heavy.npy")
    onnx.save(model, path)
    xb = rng.standard_normal((64, d)).astype(np.float32)
    np.save(data, xb)
    weight_mb = sum(t.ByteSize() for t in model.graph.initializer) / 2**20
    del model, inits
    fwd = plain_forward(path, xb, provider, reps)
    ours_s, results = _median_time(lambda: lsuv_init(path, xb, provider=provider), reps)
    rep = results[-1].report
    del results
    base = peak_rss_mb("baseline", path, data, provider)
    return dict(model="6 x Gemm 4096 + Tanh", batch=64, hw=d, layers=n,
                params=n * (d * d + d), provider=rep.provider, forward_s=fwd, ours_s=ours_s,
                init_s=rep.timings.get("init_s", 0.0),
                one_pass_s=rep.timings.get("one_pass_s", 0.0),
                verify_s=rep.timings.get("verify_s", 0.0), converged=rep.converged,
                worst=max(abs(r.var_after - 1.0) for r in rep.layers), weight_mb=weight_mb,
                peak_forward_mb=peak_rss_mb("forward", path, data, provider) - base,
                peak_ours_mb=peak_rss_mb("lsuv", path, data, provider) - base)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} CPUs available"


def table(rows: list[dict]) -> str:
    head = ("| model | batch x hw | layers | params | provider | ORT forward s | ortho init s "
            "| one-pass scaling s (fwd-eq) | re-measure s (fwd-eq) | ours end-to-end s (fwd-eq) "
            "| naive s (fwd-eq) | lsuv 0.3.0 s | lsuv 0.3.0 / ours "
            "| peak MiB: forward / ours (ratio) | worst abs(var-1) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "forward_s" not in r:
            lines.append(f"| {r['model']} | | | {r['params'] / 1e6:.1f} M | cpu | | "
                         f"{r['init_s']:.2f} | | | | | | | | |")
            continue
        if "weight_mb" in r:
            r = dict(r, model=f"{r['model']} ({r['weight_mb']:.0f} MiB of weights; peak / "
                              f"weights {r['peak_ours_mb'] / r['weight_mb']:.2f})")
        f = r["forward_s"]

        def fe(s, f=f):
            return f"{s:.2f} ({s / f:.2f})"

        naive = fe(r["naive_s"]) if "naive_s" in r else "-"
        lsuv = f"{r['lsuv030_s']:.2f}" if "lsuv030_s" in r else "-"
        ratio = f"{r['lsuv030_s'] / r['ours_s']:.1f}x" if "lsuv030_s" in r else "-"
        mem = (f"{r['peak_forward_mb']:.0f} / {r['peak_ours_mb']:.0f} "
               f"({r['peak_ours_mb'] / r['peak_forward_mb']:.2f})" if "peak_ours_mb" in r else "-")
        lines.append(
            f"| {r['model']} | {r['batch']} x {r['hw']} | {r['layers']} | "
            f"{r['params'] / 1e6:.1f} M | {r['provider']} | {f:.3f} | {r['init_s']:.2f} | "
            f"{fe(r['one_pass_s'])} | {fe(r['verify_s']) if r['verify_s'] else 'none'} | "
            f"{fe(r['ours_s'])} | {naive} | "
            f"{lsuv} | {ratio} | {mem} | {r['worst']:.3g} |")
    return "\n".join(lines)


def ortho_table(r: dict) -> str:
    torch = (f"{r['torch_orthogonal_s']:.2f} | {r['init_s'] / r['torch_orthogonal_s']:.2f}"
             if "torch_orthogonal_s" in r else "- | -")
    return ("| weights | ours s | torch.nn.init.orthogonal_ s | ours / torch | same algorithm "
            "on BLAS's threads s | cost of thread-independent bytes | max abs(Q^T Q - I) |\n"
            "|---|---|---|---|---|---|---|\n"
            f"| CaffeNet, {r['params'] / 1e6:.1f} M | {r['init_s']:.2f} | {torch} | "
            f"{r['blas_threaded_s']:.2f} | {r['init_s'] / r['blas_threaded_s'] - 1:+.0%} | "
            f"{r['orthonormality']:.1e} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(DEFAULT_CPU),
                    help=f"comma-separated, from {sorted(CASES)} (default: %(default)s)")
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--reps", type=int, default=3, help="timed runs per figure (median)")
    ap.add_argument("--no-naive", action="store_true", help="skip our naive strategy")
    ap.add_argument("--no-caffenet", action="store_true", help="skip the orthonormal-init row")
    ap.add_argument("--no-heavy", action="store_true", help="skip the weight-heavy memory row")
    ap.add_argument("--big", action="store_true",
                    help="also run benchmarks/bench_big.py's 12 GiB external-data model (several "
                         "minutes; needs 27 GiB of disk in --big-dir)")
    ap.add_argument("--big-dir", help="where the big model goes (default: a temporary directory)")
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    ap.add_argument("--append", help="append the table, with date and versions, to this file")
    args = ap.parse_args(argv)

    from importlib.util import find_spec

    torch_ok = find_spec("torch") is not None
    lsuv_ok = torch_ok and find_spec("lsuv") is not None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models.split(","):
            row = bench_case(CASES[key], args.provider, args.reps, tmp, torch_ok, lsuv_ok,
                             not args.no_naive)
            if row:
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
            else:
                print(f"skipped {key}: needs torch", file=sys.stderr)
        if not args.no_heavy:
            rows.append(bench_heavy(args.reps, tmp, args.provider))
            print(json.dumps(rows[-1]), file=sys.stderr)
    ortho = None
    if not args.no_caffenet:
        ortho = bench_caffenet_orthonormal(args.reps, torch_ok)
        print(json.dumps(ortho), file=sys.stderr)
    big = None
    if args.big:
        import bench_big

        big_dir = args.big_dir or tempfile.mkdtemp(prefix="onnx-lsuv-big-")
        try:
            big = bench_big.bench(big_dir, 6, 262144, 1024, 16, True, False)
        finally:
            if not args.big_dir:
                import shutil

                shutil.rmtree(big_dir, ignore_errors=True)
        print(json.dumps(big), file=sys.stderr)

    versions = (f"onnx-lsuv {__version__}, onnxruntime {ort.__version__}, onnx {onnx.__version__}"
                f", numpy {np.__version__}")
    from importlib.metadata import version

    if torch_ok:
        versions += f", torch {version('torch')}"
    if lsuv_ok:
        versions += f", lsuv {version('lsuv')}"
    header = (f"### {time.strftime('%Y-%m-%d')}: {machine()}, provider {args.provider}\n\n"
              f"{versions}. Command: `python benchmarks/run.py "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    text = header + "\n" + table(rows) + "\n"
    if ortho is not None:
        text += "\n" + ortho_table(ortho) + "\n"
    if big is not None:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        text += "\n" + bench_big.table(big, total) + "\n"
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, orthonormal=ortho, big=big), f, indent=2)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
