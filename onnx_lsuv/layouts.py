"""How each target op's weight tensor is viewed as (output units x fan-in) matrices, per group.

This is the one table that the orthonormal init, the scaling and the tests all use: a weight of
any supported op becomes an array of shape (groups, out_per_group, fan_in) and back, bit for bit.

| op            | weight layout           | output units          | groups |
|---------------|-------------------------|-----------------------|--------|
| Conv          | (M, C/g, k1, k2, ...)   | axis 0 (M/g per group)| group  |
| ConvTranspose | (C, M/g, k1, k2, ...)   | axis 1                | group  |
| Gemm          | (K, N), transB=1: (N, K)| N                     | 1      |
| MatMul        | (K, N) (second operand) | N                     | 1      |
| Einsum        | any (second operand)    | its labels in the output | 1   |
| LSTM/GRU/RNN  | W (D, G*H, I), R (D, G*H, H) | H per gate      | D * G  |

Gemm and MatMul also take ``groups`` > 1 for a fused projection (QKV): the output units split
into equal contiguous parts, one matrix each, sharing the fan-in. A recurrent op's W and R hold
one (H x input) matrix per direction and gate (G = 4 for LSTM, 3 for GRU, 1 for RNN).

An Einsum's weight (Flax's nnx.Einsum: 'btd,dh->bth') is viewed through ``perm``: its axes
whose labels the output keeps (the output units, in the output's order) first, then the axes
summed with the data (the fan-in), each set flattened: one (units x fan-in) matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TARGET_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
RNN_OPS = ("LSTM", "GRU", "RNN")
GATES = {"LSTM": "iofc", "GRU": "zrh", "RNN": "h"}  # ONNX's order of the gates in W, R, B


@dataclass(frozen=True)
class WeightLayout:
    """The matrix view of one layer's weight.

    Attributes:
        op: The ONNX op type.
        shape: The weight tensor's shape as stored in the model.
        groups: Number of independent groups (Conv/ConvTranspose ``group``; 1 otherwise).
        trans: The weight is stored (N, K): Gemm's ``transB``, or a MatMul that reads its
            weight through a Transpose (PyTorch's Linear exported without constant folding).
        perm: Einsum only: the weight's axes, output units' first, then the fan-in's.
        unit_axes: Einsum only: how many of ``perm`` are output units.
    """

    op: str
    shape: tuple[int, ...]
    groups: int = 1
    trans: bool = False
    perm: tuple[int, ...] = ()
    unit_axes: int = 0

    def __post_init__(self) -> None:
        if self.op not in TARGET_OPS + RNN_OPS + ("Einsum",):
            raise ValueError(f"no weight layout for op {self.op!r}")
        if self.op == "Einsum":
            if sorted(self.perm) != list(range(len(self.shape))) or self.groups != 1 or \
                    not 0 < self.unit_axes < len(self.shape):
                raise ValueError(f"Einsum weight shape {self.shape} with axes {self.perm} "
                                 f"({self.unit_axes} of units) is no matrix view")
        elif self.op in RNN_OPS:
            if len(self.shape) != 3 or self.groups < 1 or (self.shape[0] * self.shape[1]) % \
                    self.groups:
                raise ValueError(f"{self.op} weight shape {self.shape} does not split into "
                                 f"{self.groups} gate matrices")
        elif self.op in ("Conv", "ConvTranspose"):
            if len(self.shape) < 3:
                raise ValueError(f"{self.op} weight must have rank >= 3, got shape {self.shape}")
            if self.groups < 1 or self.shape[0] % self.groups:
                raise ValueError(
                    f"{self.op} weight shape {self.shape} does not split into {self.groups} groups"
                )
        elif len(self.shape) != 2:
            raise ValueError(f"{self.op} weight must be 2-D, got shape {self.shape}")
        else:
            n = self.shape[0] if self.trans else self.shape[1]
            if self.groups < 1 or n % self.groups:
                raise ValueError(f"{self.op} weight shape {self.shape} does not split into "
                                 f"{self.groups} projections")

    @property
    def matrix_shape(self) -> tuple[int, int, int]:
        """(groups, output units per group, fan-in) of the matrix view."""
        s = self.shape
        if self.op == "Einsum":
            dims = [s[a] for a in self.perm]
            return 1, int(np.prod(dims[:self.unit_axes])), int(np.prod(dims[self.unit_axes:]))
        if self.op == "Conv":
            return self.groups, s[0] // self.groups, int(np.prod(s[1:]))
        if self.op == "ConvTranspose":
            return self.groups, s[1], (s[0] // self.groups) * int(np.prod(s[2:]))
        if self.op in RNN_OPS:
            return self.groups, s[0] * s[1] // self.groups, s[2]
        if self.trans:  # Gemm transB=1, or MatMul reading the weight through a Transpose
            return self.groups, s[0] // self.groups, s[1]
        return self.groups, s[1] // self.groups, s[0]  # Gemm (K, N) and MatMul (K, N)

    @property
    def output_units(self) -> int:
        g, out, _ = self.matrix_shape
        return g * out

    def to_matrices(self, weight: np.ndarray) -> np.ndarray:
        """View ``weight`` as (groups, out, fan_in) matrices (copied if transposed)."""
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"weight shape {weight.shape} does not match layout {self.shape}")
        g, out, fan_in = self.matrix_shape
        if self.op == "Einsum":
            return weight.transpose(self.perm).reshape(g, out, fan_in)
        if self.op == "Conv":
            return weight.reshape(g, out, fan_in)
        if self.op == "ConvTranspose":
            c = self.shape[0] // g
            k = int(np.prod(self.shape[2:]))
            return weight.reshape(g, c, out, k).transpose(0, 2, 1, 3).reshape(g, out, fan_in)
        if self.op in RNN_OPS or self.trans:
            return weight.reshape(g, out, fan_in)
        return weight.T.reshape(g, out, fan_in)

    def from_matrices(self, matrices: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_matrices`: a C-contiguous tensor of the stored shape."""
        g, out, fan_in = self.matrix_shape
        if tuple(matrices.shape) != (g, out, fan_in):
            raise ValueError(f"matrices shape {matrices.shape} != {(g, out, fan_in)}")
        if self.op == "Einsum":
            w = matrices.reshape([self.shape[a] for a in self.perm]).transpose(
                np.argsort(self.perm))
        elif self.op == "Conv":
            w = matrices.reshape(self.shape)
        elif self.op == "ConvTranspose":
            c = self.shape[0] // g
            k = int(np.prod(self.shape[2:]))
            w = matrices.reshape(g, out, c, k).transpose(0, 2, 1, 3).reshape(self.shape)
        elif self.op in RNN_OPS or self.trans:
            w = matrices.reshape(self.shape)
        else:
            w = matrices.reshape(g * out, fan_in).T
        return np.ascontiguousarray(w)
