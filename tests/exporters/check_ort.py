"""Load every OUTDIR/*.onnx in ONNX Runtime (CPU), run it on OUTDIR/<name>.npy and compare
with the framework's output in OUTDIR/ref/<name>.npy when there is one.

Usage: /work/main/.venv/bin/python check_ort.py OUTDIR [OUTDIR ...]
"""

from __future__ import annotations

import glob
import os
import sys

import numpy as np
import onnxruntime as ort


def check(path):
    base = path[:-5]
    x = np.load(base + ".npy")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feeds = {sess.get_inputs()[0].name: x}
    outs = sess.run(None, feeds)
    y = outs[0]
    ref_path = os.path.join(os.path.dirname(path), "ref", os.path.basename(base) + ".npy")
    msg = f"out{list(y.shape)} std={float(np.std(y)):.3g}"
    ok = True
    if os.path.exists(ref_path):
        ref = np.load(ref_path)
        if ref.shape != y.shape:
            ok = False
            msg += f" ref shape {list(ref.shape)} differs"
        else:
            err = float(np.max(np.abs(ref - y)) / (np.max(np.abs(ref)) + 1e-12))
            ok = err < 1e-3
            msg += f" max rel err vs framework={err:.2e}"
    return ok, msg


def main(argv):
    bad = 0
    for d in argv:
        for p in sorted(glob.glob(os.path.join(d, "*.onnx"))):
            try:
                ok, msg = check(p)
            except Exception as e:  # noqa: BLE001
                ok, msg = False, f"{type(e).__name__}: {e}"
            bad += not ok
            print(f"{'OK ' if ok else 'BAD'} {p}: {msg}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
