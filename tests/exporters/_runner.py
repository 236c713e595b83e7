"""The loop every export script runs: each model exported in turn, one OK / FAIL line each.

Imported by the export_*.py scripts beside it (run as scripts, from their own framework's
interpreter, so this module uses nothing but the standard library).
"""

from __future__ import annotations

import os
import time
from typing import Callable


def run_models(argv: list[str], default_dir: str, models: dict[str, tuple],
               export: Callable[..., list[str]], known_fail: frozenset[str] = frozenset()) -> int:
    """Export ``models`` (name -> the arguments of ``export`` after the name) into OUTDIR
    (``argv[0]``; only the names in ``argv[1:]`` when given), calling
    ``export(name, *args, outdir, seed)``, which returns the framework's parameter names
    (and writes OUTDIR/params/<name>.npz: the framework's own parameters by its own names).
    A failure is reported and the loop goes on; the exit status is 1 when a model not in
    ``known_fail`` failed."""
    outdir = argv[0] if argv else default_dir
    os.makedirs(os.path.join(outdir, "ref"), exist_ok=True)
    os.makedirs(os.path.join(outdir, "params"), exist_ok=True)
    only = set(argv[1:])
    status = 0
    for seed, (name, args) in enumerate(models.items()):
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            names = export(name, *args, outdir, seed)
            print(f"OK   {name:18s} {time.perf_counter() - t0:6.2f}s  params: {', '.join(names)}")
        except Exception as e:  # noqa: BLE001 - report and go on with the next model
            expected = name in known_fail
            status = status if expected else 1
            msg = str(e).strip().splitlines()
            print(f"{'XFAIL' if expected else 'FAIL '} {name:18s} {type(e).__name__}: "
                  f"{msg[0] if msg else ''}" + (f" ... {msg[-1]}" if len(msg) > 1 else ""))
    return status
