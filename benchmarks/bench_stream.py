"""A stream of batches against the same data concatenated: peak memory and time.

    python benchmarks/bench_stream.py                 # markdown table on stdout
    python benchmarks/bench_stream.py --batches 8 --batch 32 --hw 96

Builds a plain conv net (onnx.helper: 4 Conv + Relu at 32 channels, global pooling, Gemm),
writes ``--batches`` batches of random images as .npy files in a temporary directory, and
runs each case in a fresh process, reading its own high-water mark (VmHWM):

* baseline: the imports and one batch loaded;
* one plain ONNX Runtime forward of one batch, and of all the batches concatenated;
* ``lsuv_init`` on the concatenated array, with the default one-pass strategy and with the
  layer-by-layer ``sequential`` one;
* ``lsuv_init`` on the directory (a stream: one batch in memory), and on a generator of the
  same batches (spooled to a temporary directory).

Memory is the peak above the baseline; times are the process's own ``lsuv_init`` or forward
call, one run each (the machine's noise is in them: compare within one run).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
from onnx import helper, numpy_helper

CODE = r"""
import sys, os, time, glob, numpy as np
mode, model, folder = sys.argv[1:]
files = sorted(glob.glob(os.path.join(folder, "*.npy")))
x = np.load(files[0])
t = time.perf_counter()
if mode == "baseline":
    import onnx_lsuv, onnx_lsuv.engine
elif mode.startswith("forward"):
    from onnx_lsuv.engine import Engine
    if mode == "forward_all":
        x = np.concatenate([np.load(f) for f in files])
    s = Engine("cpu").session(open(model, "rb").read()).ort_session
    t = time.perf_counter()
    s.run(None, {s.get_inputs()[0].name: x})
else:
    from onnx_lsuv import lsuv_init
    if mode in ("fast", "sequential"):
        x = np.concatenate([np.load(f) for f in files])
        t = time.perf_counter()
        r = lsuv_init(model, x, provider="cpu", strategy=mode)
    elif mode == "directory":
        r = lsuv_init(model, folder, provider="cpu")
    else:
        r = lsuv_init(model, (np.load(f) for f in files), provider="cpu")
    assert r.report.converged
seconds = time.perf_counter() - t
hwm = next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(int(hwm) / 1024.0, seconds)
"""

MODES = [("baseline", "imports, one batch loaded"),
         ("forward_one", "one plain forward, one batch"),
         ("forward_all", "one plain forward, all batches concatenated"),
         ("fast", "lsuv_init, concatenated, strategy fast"),
         ("sequential", "lsuv_init, concatenated, strategy sequential"),
         ("directory", "lsuv_init, a directory of the batches (stream)"),
         ("generator", "lsuv_init, a generator of the batches (stream, spooled)")]


def build(channels: int = 32) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, x, c = [], [], "x", 3
    for i in range(4):
        w = rng.standard_normal((channels, c, 3, 3)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(np.zeros(channels, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}",
                                   kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x, c = f"r{i}", channels
    inits.append(numpy_helper.from_array(rng.standard_normal((10, c)).astype(np.float32), "wf"))
    nodes += [helper.make_node("GlobalAveragePool", [x], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "wf"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(
        nodes, "stream_bench",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--hw", type=int, default=96)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "net.onnx")
        onnx.save(build(), model)
        folder = os.path.join(tmp, "batches")
        os.mkdir(folder)
        rng = np.random.default_rng(1)
        for k in range(args.batches):
            x = rng.standard_normal((args.batch, 3, args.hw, args.hw)).astype(np.float32)
            np.save(os.path.join(folder, f"{k:03d}.npy"), x)
        rows = {}
        for mode, _ in MODES:
            out = subprocess.run([sys.executable, "-c", CODE, mode, model, folder],
                                 capture_output=True, text=True, check=True)
            peak, seconds = map(float, out.stdout.split())
            rows[mode] = (peak, seconds)
    base = rows["baseline"][0]
    one = rows["forward_one"][0] - base
    print(f"{args.batches} batches of {args.batch} x 3 x {args.hw} x {args.hw} float32 "
          f"({args.batch * 3 * args.hw * args.hw * 4 / 2**20:.1f} MiB each), 4 Conv + Relu at "
          f"32 channels; {os.cpu_count()} CPUs\n")
    print("| case | peak above baseline, MiB | / one batch's forward | time, s |")
    print("|---|---:|---:|---:|")
    for mode, label in MODES[1:]:
        peak, seconds = rows[mode]
        print(f"| {label} | {peak - base:.0f} | {(peak - base) / one:.2f} | {seconds:.2f} |")
    print(f"\nbaseline (imports, one batch): {base:.0f} MiB")


if __name__ == "__main__":
    main()
