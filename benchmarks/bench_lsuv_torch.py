"""Time the reference PyTorch LSUV (``lsuv`` 0.3.0, D. Mishkin) on the CPU or a CUDA GPU.

    .venv/bin/python benchmarks/bench_lsuv_torch.py                # default table
    .venv/bin/python benchmarks/bench_lsuv_torch.py resnet50_like:8:224 caffenet_like:16:227
    python3 benchmarks/bench_lsuv_torch.py --device cuda resnet50_like:32:224

Each positional argument is MODEL:BATCH:HW. The call timed is exactly the
package README's single-batch form,
``lsuv_with_singlebatch(model, batch, device=torch.device('cpu'))``, plus
``verbose=False`` (its default ``True`` prints several lines per layer and
per attempt). Defaults otherwise: needed_std=1.0, std_tol=0.1, max_attempts=10,
do_orthonorm=True. With ``--device cuda`` the model and the batch are on the GPU
before the clock starts (as a user's are), and the clock stops after a
``torch.cuda.synchronize()``.

lsuv 0.3.0 comes from PyPI (``pip install lsuv==0.3.0``). Where there is no
package registry (the lent GPU machine), ``benchmarks/gpu_prepare.sh`` saves its
wheel in the git-ignored ``.whl/`` here, the check's device call carries it, and
``benchmarks/gpu_check.py`` puts the wheel itself on the PYTHONPATH (a pure-Python
wheel imports as it is).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from importlib.metadata import version

import torch
import torch.nn as nn

if __package__ in (None, ""):  # run as a script: make torch_models importable
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from torch_models import MODELS  # type: ignore
else:
    from .torch_models import MODELS

import lsuv

# The layer types lsuv 0.3.0 processes (lsuv.lsuvinit.is_relevant_layer).
_LSUV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
               nn.ConvTranspose3d, nn.Linear, nn.MultiheadAttention)


def _layer_output_stds(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Std of every LSUV-relevant layer's output in one eval forward
    (the quantity lsuv drives to 1: ``output.std()`` over the whole tensor)."""
    stds: list[float] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: stds.append(float(o.std())))
             for m in model.modules() if isinstance(m, _LSUV_TYPES)]
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return stds


def time_lsuv_torch(model_name: str, batch: int, hw: int, seed: int = 0,
                    in_ch: int = 3, verbose: bool = False, device: str = "cpu",
                    forward_reps: int = 1) -> dict:
    """Build ``model_name``, run lsuv 0.3.0 on one N(0,1) batch of shape
    (batch, in_ch, hw, hw) on ``device`` ("cpu" or "cuda") and time it.

    Returns seconds (wall time of the lsuv call), forward_seconds (the median of
    ``forward_reps`` plain eval/no_grad forwards, after one untimed warm-up
    forward), torch_version, lsuv_version, device, plus threads, n_layers,
    n_forwards (model forwards lsuv ran) and max_std_err (max |std - 1| over
    layer outputs after lsuv, measured outside the timing).
    """
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
    x = torch.randn(batch, in_ch, hw, hw).to(dev)  # drawn on the CPU: the same batch anywhere
    model = MODELS[model_name]().to(dev)
    model.eval()

    def sync() -> None:  # CUDA runs asynchronously: a clock reads after the GPU's work
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    with torch.no_grad():
        model(x)  # warm-up (oneDNN primitive creation / CUDA context and cuDNN, allocator)
        sync()
        times = []
        for _ in range(forward_reps):
            t0 = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - t0)
        forward_seconds = statistics.median(times)

    n_forwards = 0

    def _count(_m, _inp):
        nonlocal n_forwards
        n_forwards += 1

    counter = model.register_forward_pre_hook(_count)
    t0 = time.perf_counter()
    model = lsuv.lsuv_with_singlebatch(model, x, device=dev, verbose=verbose)
    sync()
    seconds = time.perf_counter() - t0
    counter.remove()

    stds = _layer_output_stds(model, x)
    return {
        "model": model_name,
        "batch": batch,
        "hw": hw,
        "seconds": seconds,
        "forward_seconds": forward_seconds,
        "torch_version": torch.__version__,
        "lsuv_version": version("lsuv"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": threads,
        "n_layers": len(stds),
        "n_forwards": n_forwards,
        "max_std_err": max(abs(s - 1.0) for s in stds),
    }


DEFAULT_RUNS = [("fitnet4", 128, 32), ("resnet18_like", 32, 64)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", help="MODEL:BATCH:HW (default: "
                    + " ".join(f"{m}:{b}:{h}" for m, b, h in DEFAULT_RUNS) + ")")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    args = ap.parse_args(argv)
    runs = [(r.split(":")[0], int(r.split(":")[1]), int(r.split(":")[2])) for r in args.runs] \
        or DEFAULT_RUNS

    rows = [time_lsuv_torch(m, b, h, seed=args.seed, device=args.device) for m, b, h in runs]
    r0 = rows[0]
    print(f"torch {r0['torch_version']}, lsuv {r0['lsuv_version']}, {r0['device']}, "
          f"{r0['threads']} threads")
    print(f"{'model':14s} {'batch':>5s} {'hw':>4s} {'lsuv s':>8s} {'fwd s':>8s} "
          f"{'lsuv/fwd':>8s} {'layers':>6s} {'fwds':>5s} {'max|std-1|':>10s}")
    for r in rows:
        print(f"{r['model']:14s} {r['batch']:5d} {r['hw']:4d} {r['seconds']:8.3f} "
              f"{r['forward_seconds']:8.4f} {r['seconds'] / r['forward_seconds']:8.1f} "
              f"{r['n_layers']:6d} {r['n_forwards']:5d} {r['max_std_err']:10.3f}")


if __name__ == "__main__":
    main()
