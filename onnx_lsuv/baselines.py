"""Baseline initialisations to compare LSUV with, over the same weight layouts.

* xavier: Glorot & Bengio 2010, uniform U(-a, a) with a = sqrt(6 / (fan_in + fan_out)).
* msra: He et al. 2015, normal N(0, 2 / fan_in).

fan_in is the matrix view's fan-in (input channels per group x kernel size); fan_out is the
output units per group x kernel size, both per group on the layouts table (PyTorch counts a
grouped Conv's fan_out over all groups, and swaps the two for ConvTranspose). Layer ``i`` draws
from the generator seeded with ``(seed, i)``, as the orthonormal init does.
"""

from __future__ import annotations

import numpy as np

from .layouts import WeightLayout

BASELINES = ("xavier", "msra")


def fans(layout: WeightLayout) -> tuple[int, int]:
    """(fan_in, fan_out) of one group of a weight."""
    _, rows, cols = layout.matrix_shape
    receptive = int(np.prod(layout.shape[2:])) if layout.op.startswith("Conv") else 1
    return cols, rows * receptive


def baseline_weight(kind: str, layout: WeightLayout, seed: int, index: int,
                    dtype: np.dtype) -> np.ndarray:
    """A weight tensor of ``layout.shape`` drawn by baseline ``kind``."""
    rng = np.random.default_rng([seed, index])
    fan_in, fan_out = fans(layout)
    if kind == "xavier":
        a = np.sqrt(6.0 / (fan_in + fan_out))
        w = rng.uniform(-a, a, size=layout.shape)
    elif kind == "msra":
        w = rng.standard_normal(layout.shape) * np.sqrt(2.0 / fan_in)
    else:
        raise ValueError(f"unknown baseline {kind!r}; choose one of {BASELINES}")
    return w.astype(dtype)
