"""A model whose weights exceed half the machine's memory, run from its external data.

    python benchmarks/bench_big.py --dir /big/disk            # 12 GiB of float32 weights
    python benchmarks/bench_big.py --pairs 3 --wide 98304     # 2.3 GiB: quick

The model is pairs of MatMuls, x [batch, narrow] @ [narrow, wide] -> Tanh -> @ [wide, narrow]
-> Tanh, with every weight in one external data file. It is generated straight into that file,
64 MiB at a time, never held in memory, and deleted afterwards (``--keep`` keeps it). Each of
a plain ONNX Runtime forward and the ``onnx-lsuv`` command runs in a fresh process, whose
resident high-water mark (VmHWM, which counts the pages of memory-mapped files it touched)
is reported beside the weights' size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper

PAGE = 4096
STEP = 16 << 20  # float32 elements per generated piece (64 MiB)


def write_big_model(directory: str, pairs: int = 6, wide: int = 262144, narrow: int = 1024,
                    batch: int = 16) -> tuple[str, str, int]:
    """Write the model (``big.onnx`` + ``big.onnx.data``) and a batch (``big.npy``) into
    ``directory``; (model path, batch path, weight bytes)."""
    shapes = []
    for i in range(pairs):
        shapes += [(f"W{2 * i}", (narrow, wide)), (f"W{2 * i + 1}", (wide, narrow))]
    path = os.path.join(directory, "big.onnx")
    inits, offset = [], 0
    rng = np.random.default_rng(0)
    with open(path + ".data", "wb") as f:
        for name, shape in shapes:
            n = int(np.prod(shape))
            scale = np.float32(1.0 / np.sqrt(shape[0]))
            for k in range(0, n, STEP):
                piece = rng.random(min(STEP, n - k), dtype=np.float32)
                piece -= 0.5
                piece *= scale
                f.write(piece.tobytes())
            t = TensorProto()
            t.name, t.data_type = name, TensorProto.FLOAT
            t.dims.extend(shape)
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", "big.onnx.data"), ("offset", str(offset)),
                               ("length", str(n * 4))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            inits.append(t)
            offset += n * 4
            pad = (-offset) % PAGE
            f.write(b"\0" * pad)
            offset += pad
    nodes, x = [], "x"
    for i, (name, _) in enumerate(shapes):
        nodes += [helper.make_node("MatMul", [x, name], [f"m{i}"]),
                  helper.make_node("Tanh", [f"m{i}"], [f"t{i}"])]
        x = f"t{i}"
    graph = helper.make_graph(
        nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, narrow])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [batch, narrow])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    data = os.path.join(directory, "big.npy")
    np.save(data, np.random.default_rng(1).standard_normal((batch, narrow)).astype(np.float32))
    return path, data, sum(int(np.prod(s)) * 4 for _, s in shapes)


PROBE = """
import sys, time, runpy, numpy as np
mode, path, data, out = sys.argv[1:5]
t = time.perf_counter()
if mode == "forward":
    import onnxruntime as ort
    from onnx_lsuv.engine import _session_options
    so = ort.SessionOptions()
    so.intra_op_num_threads = _session_options(None).intra_op_num_threads
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    s.run(None, {"x": np.load(data)})
elif mode == "baseline":
    import onnx_lsuv, onnxruntime, numpy
    np.load(data)
else:
    sys.argv = ["onnx-lsuv", path, "--data", data, "-o", out, "-q", "--provider", "cpu"]
    try:
        runpy.run_module("onnx_lsuv", run_name="__main__")
    except SystemExit as e:
        if e.code:
            raise
print(time.perf_counter() - t)
print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))
"""


def probe(mode: str, path: str, data: str, out: str) -> tuple[float, float]:
    """(seconds, peak resident GiB) of a fresh process."""
    res = subprocess.run([sys.executable, "-c", PROBE, mode, path, data, out],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{mode} failed: {res.stderr[-2000:]}")
    secs, kib = res.stdout.split()[-2:]
    return float(secs), int(kib) / 2**20


def bench(directory: str, pairs: int, wide: int, narrow: int, batch: int, forward: bool,
          keep: bool) -> dict:
    t = time.perf_counter()
    path, data, weight_bytes = write_big_model(directory, pairs, wide, narrow, batch)
    gen_s = time.perf_counter() - t
    out = os.path.join(directory, "out.onnx")
    row = dict(model=f"{2 * pairs} MatMul {narrow}x{wide}", weights_gib=weight_bytes / 2**30,
               batch=batch, generate_s=gen_s)
    row["baseline_s"], row["baseline_gib"] = probe("baseline", path, data, out)
    if forward:
        row["forward_s"], row["forward_gib"] = probe("forward", path, data, out)
    row["ours_s"], row["ours_gib"] = probe("lsuv", path, data, out)
    written = onnx.load(out, load_external_data=False)
    row["written_gib"] = os.path.getsize(out + ".data") / 2**30
    row["written_tensors"] = len(written.graph.initializer)
    if not keep:
        for name in ("big.onnx", "big.onnx.data", "big.npy", "out.onnx", "out.onnx.data"):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass
    return row


def table(row: dict, total_gib: float) -> str:
    fwd = (f"{row['forward_s']:.1f} s, {row['forward_gib'] - row['baseline_gib']:.2f} GiB"
           if "forward_s" in row else "-")
    ours = row["ours_gib"] - row["baseline_gib"]
    return ("| model | weights GiB | machine GiB | plain ORT forward: s, peak GiB | onnx-lsuv "
            "(CLI, end to end): s, peak GiB | peak / weights |\n|---|---|---|---|---|---|\n"
            f"| {row['model']}, batch {row['batch']} | {row['weights_gib']:.2f} | "
            f"{total_gib:.1f} | {fwd} | {row['ours_s']:.1f} s, {ours:.2f} GiB | "
            f"{ours / row['weights_gib']:.2f} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", help="where to write the model (default: a temporary directory)")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--wide", type=int, default=262144)
    ap.add_argument("--narrow", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--no-forward", action="store_true", help="skip the plain ORT forward")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--json", help="also write the row as JSON here")
    args = ap.parse_args(argv)
    need = 2 * args.pairs * args.wide * args.narrow * 4 * 2.1
    directory = args.dir or tempfile.mkdtemp(prefix="onnx-lsuv-big-")
    free = shutil.disk_usage(directory).free
    if free < need:
        sys.exit(f"{directory} has {free / 2**30:.1f} GiB free; the model and its output need "
                 f"{need / 2**30:.1f} GiB")
    try:
        row = bench(directory, args.pairs, args.wide, args.narrow, args.batch,
                    not args.no_forward, args.keep)
    finally:
        if not args.dir and not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(json.dumps(row), file=sys.stderr)
    print(table(row, total))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)


if __name__ == "__main__":
    main()
