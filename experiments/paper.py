"""The paper's own figures, quoted: Mishkin & Matas, "All you need is a good init" (ICLR 2016,
arXiv 1511.06422), from its text in ../shared/paper/all-you-need-is-a-good-init.txt.

These are the only figures in experiments/ typed in by hand; each is keyed by its table
number. CIFAR-10 test accuracies are in %, "n/c" is the paper's "failed to converge". The
paper's nets are wider than ours and trained on CIFAR-10 for 230 epochs, so the tables set
them beside our figures for their patterns (which init converges, ratios between layers and
between inits), never as targets for our absolute values.
"""

from __future__ import annotations

SOURCE = "Mishkin & Matas 2016"

# Table 3: FitNet4 on CIFAR-10, init x activation, final accuracy. (The paper's extra row
# "OrthoNorm-MSRA scaled" has no counterpart here; MSRA's maxout is "n/c†": trained only
# after extensive trials with a very small lr and gradient clipping.)
TABLE3 = {
    "lsuv": {"maxout": "93.94", "relu": "92.11", "vlrelu": "92.97", "tanh": "89.28",
             "sigmoid": "n/c"},
    "orthonormal": {"maxout": "93.78", "relu": "91.74", "vlrelu": "92.40", "tanh": "89.48",
                    "sigmoid": "n/c"},
    "xavier": {"maxout": "91.75", "relu": "90.63", "vlrelu": "92.27", "tanh": "89.82",
               "sigmoid": "n/c"},
    "msra": {"maxout": "n/c†", "relu": "90.91", "vlrelu": "92.43", "tanh": "89.54",
             "sigmoid": "n/c"},
}

# Table 4: FitResNet-4 on CIFAR-10, the same layout as Table 3.
TABLE4 = {
    "lsuv": {"maxout": "94.16", "relu": "92.82", "vlrelu": "93.36", "tanh": "89.17",
             "sigmoid": "n/c"},
    "orthonormal": {"maxout": "n/c", "relu": "91.42", "vlrelu": "n/c", "tanh": "89.31",
                    "sigmoid": "n/c"},
    "xavier": {"maxout": "n/c", "relu": "92.48", "vlrelu": "93.34", "tanh": "89.62",
               "sigmoid": "n/c"},
    "msra": {"maxout": "n/c", "relu": "n/c", "vlrelu": "n/c", "tanh": "88.59",
             "sigmoid": "n/c"},
}

# Table 5: batch-normalised FitNet4 on CIFAR-10, BN before or after the non-linearity.
TABLE5 = {
    "tanh": {"before": "88.10", "after": "89.22"},
    "relu": {"before": "92.60", "after": "92.58"},
    "maxout": {"before": "92.30", "after": "92.98"},
}

# Table 7: FitNet4 tanh on CIFAR-10, final accuracy by the number of images LSUV measures on.
TABLE7 = {2: "89.27", 16: "89.30", 32: "89.30", 128: "89.28", 1024: "89.31"}

# The paper's FitNet4 layer names (Tables 8 to 10), in graph order: 17 convs, then ip1 (fc 500).
LAYERS = ("conv11", "conv12", "conv13", "conv14", "conv15",
          "conv21", "conv22", "conv23", "conv24", "conv25", "conv26",
          "conv31", "conv32", "conv33", "conv34", "conv35", "conv36", "ip1")


def _columns(rows: str, names: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """A table pasted as one line per layer ("value value ...", in ``names``' order) ->
    {column: {layer: value}}."""
    lines = [line.split() for line in rows.strip().splitlines()]
    assert len(lines) == len(LAYERS) and all(len(v) == len(names) for v in lines)
    return {name: {layer: float(v[i]) for layer, v in zip(LAYERS, lines)}
            for i, name in enumerate(names)}


# Table 8: weight std per layer by init, FitNet4, ReLU. Columns: LSUV OrthoNorm MSRA Xavier.
TABLE8 = _columns("""
0.383 0.175 0.265 0.191
0.091 0.058 0.082 0.059
0.083 0.058 0.083 0.059
0.076 0.058 0.083 0.059
0.068 0.048 0.060 0.048
0.036 0.048 0.052 0.037
0.048 0.037 0.052 0.037
0.061 0.037 0.052 0.037
0.052 0.037 0.052 0.037
0.067 0.037 0.052 0.037
0.055 0.037 0.052 0.037
0.034 0.037 0.052 0.037
0.044 0.029 0.041 0.029
0.042 0.029 0.041 0.029
0.041 0.029 0.041 0.029
0.040 0.029 0.041 0.029
0.043 0.029 0.041 0.029
0.048 0.044 0.124 0.088
""", ("lsuv", "orthonormal", "msra", "xavier"))

# Table 9: weight std per layer found by LSUV, by activation, FitNet4 (the paper's VReLU is
# our vlrelu). Columns: TanH ReLU VReLU Maxout.
TABLE9 = _columns("""
0.386 0.388 0.384 0.383
0.118 0.083 0.084 0.058
0.102 0.096 0.075 0.063
0.101 0.082 0.080 0.065
0.081 0.064 0.065 0.044
0.065 0.044 0.037 0.034
0.064 0.055 0.047 0.040
0.060 0.055 0.049 0.032
0.058 0.064 0.049 0.041
0.061 0.061 0.043 0.040
0.063 0.049 0.052 0.037
0.054 0.032 0.037 0.027
0.052 0.049 0.037 0.031
0.051 0.048 0.042 0.033
0.050 0.047 0.038 0.028
0.051 0.047 0.039 0.030
0.051 0.040 0.037 0.033
0.084 0.044 0.044 0.038
""", ("tanh", "relu", "vlrelu", "maxout"))

# Table 10: "variance of the initial gradients per layer", "the average variance of the
# gradient at all layers after 10 mini-batches", FitNet4, ReLU. Columns: LSUV MSRA OrthoInit
# Xavier.
TABLE10 = _columns("""
4.87E-10 9.42E-09 5.67E-15 2.30E-14
5.07E-10 9.62E-09 1.17E-14 4.85E-14
4.36E-10 1.07E-08 2.30E-14 9.94E-14
3.21E-10 7.03E-09 2.95E-14 1.35E-13
3.85E-10 6.57E-09 6.71E-14 3.10E-13
1.25E-09 9.11E-09 1.95E-13 8.00E-13
1.15E-09 9.73E-09 3.79E-13 1.56E-12
1.19E-09 1.07E-08 8.18E-13 3.28E-12
9.12E-10 1.07E-08 1.79E-12 6.69E-12
7.45E-10 1.09E-08 4.04E-12 1.36E-11
8.21E-10 1.15E-08 8.36E-12 2.99E-11
3.06E-09 1.92E-08 2.65E-11 1.05E-10
2.57E-09 2.01E-08 5.95E-11 2.28E-10
2.40E-09 1.99E-08 1.21E-10 4.69E-10
2.19E-09 2.25E-08 2.64E-10 1.01E-09
1.94E-09 2.57E-08 5.89E-10 2.27E-09
2.31E-09 2.97E-08 1.32E-09 5.57E-09
1.24E-07 1.95E-07 6.91E-08 7.31E-08
""", ("lsuv", "msra", "orthonormal", "xavier"))

# Section 3: "Its value does not noticeably influence the performance in a broad range of 0.01
# to 0.1"; "The desired variance was achieved in 1-5 iterations."
TOL_VAR_CLAIM = ("Tol_var does not noticeably influence the performance between 0.01 and 0.1 "
                 "(Section 3); the desired variance was reached in 1 to 5 iterations")


def converged(cell: str) -> bool:
    """Whether a quoted cell is a result (not "n/c" or "n/c†")."""
    return not cell.startswith("n/c")
