"""Export a small scikit-learn MLPClassifier to ONNX with skl2onnx.

Usage: /work/main/.venv/bin/python export_sklearn.py OUTDIR

Fits MLPClassifier(hidden_layer_sizes=(32, 16)) briefly (max_iter=20, seeded) on sklearn's
bundled digits (load_digits: no download), sets every bias (intercepts_) to N(0, 1), and
writes OUTDIR/mlp.onnx (opset 17, float32 input [None, 64]), OUTDIR/mlp.npy (the first 32
digits, float32, pixel values 0..16 as sklearn gives them) and OUTDIR/ref/mlp.npy (sklearn's
predict_proba, to compare with the ONNX probabilities output).

skl2onnx emits a ZipMap on the probabilities by default (a sequence of maps, which ONNX Runtime
gives back as a list of dicts); options={"zipmap": False} keeps them a plain [N, 10] tensor.
Outputs: label (int64 [N]) first, probabilities second.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import numpy as np
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

OPSET = 17


def main(argv):
    outdir = argv[0] if argv else "out_sklearn"
    os.makedirs(os.path.join(outdir, "ref"), exist_ok=True)
    os.makedirs(os.path.join(outdir, "params"), exist_ok=True)
    t0 = time.perf_counter()
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    clf = MLPClassifier(hidden_layer_sizes=(32, 16), max_iter=20, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X, y)
    rng = np.random.default_rng(0)
    clf.intercepts_ = [rng.normal(0.0, 1.0, b.shape).astype(b.dtype) for b in clf.intercepts_]
    batch = X[:32]
    onx = to_onnx(clf, batch[:1], target_opset={"": OPSET, "ai.onnx.ml": 3},
                  options={id(clf): {"zipmap": False}})
    with open(os.path.join(outdir, "mlp.onnx"), "wb") as f:
        f.write(onx.SerializeToString())
    np.save(os.path.join(outdir, "mlp.npy"), batch)
    np.save(os.path.join(outdir, "ref", "mlp.npy"),
            clf.predict(batch).astype(np.float32))  # label output (first output)
    np.save(os.path.join(outdir, "ref", "mlp_proba.npy"),
            clf.predict_proba(batch).astype(np.float32))
    np.savez(os.path.join(outdir, "params", "mlp.npz"),
             **{f"coefs_{i}": c for i, c in enumerate(clf.coefs_)},
             **{f"intercepts_{i}": b for i, b in enumerate(clf.intercepts_)})
    names = [f"coefs_[{i}]{list(c.shape)}" for i, c in enumerate(clf.coefs_)] + \
            [f"intercepts_[{i}]{list(b.shape)}" for i, b in enumerate(clf.intercepts_)]
    print(f"OK   mlp {time.perf_counter() - t0:6.2f}s  params: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
