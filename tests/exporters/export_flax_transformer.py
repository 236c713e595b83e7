"""Export a small pre-LN transformer block written in Flax NNX with jax2onnx (issue 28: roles
in a jax2onnx graph). Run from the Flax interpreter, like export_flax.py, whose ``export`` it
uses (seeded nnx.Rngs; every bias drawn from N(0, 1)).

Usage: python export_flax_transformer.py OUTDIR

The model (``prenorm``): nnx.Linear on the input features writes the residual stream, plus a
learnt position table (an nnx.Param); a pre-LN block (nnx.LayerNorm with non-default scale
and bias -> nnx.MultiHeadAttention (2 heads) -> add; nnx.LayerNorm -> Linear(32) -> gelu ->
Linear(16) -> add); a final nnx.LayerNorm, the first token and a Linear(5) head.
"""

from __future__ import annotations

import sys

from export_flax import BIAS, export  # noqa: F401 - sets JAX_PLATFORMS first
from flax import nnx

from _runner import run_models

TOKENS, WIDTH, CLASSES = 8, 16, 5
SCALE = nnx.initializers.uniform(1.0)  # LayerNorm gammas in [0, 1): not the default ones


class PreNorm(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Linear(12, WIDTH, bias_init=BIAS, rngs=rngs)
        self.pos = nnx.Param(nnx.initializers.normal(0.3)(rngs.params(), (1, TOKENS, WIDTH)))
        norm = dict(scale_init=SCALE, bias_init=BIAS, rngs=rngs)
        self.ln1 = nnx.LayerNorm(WIDTH, **norm)
        self.mha = nnx.MultiHeadAttention(num_heads=2, in_features=WIDTH, qkv_features=WIDTH,
                                          bias_init=BIAS, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(WIDTH, **norm)
        self.fc1 = nnx.Linear(WIDTH, 32, bias_init=BIAS, rngs=rngs)
        self.fc2 = nnx.Linear(32, WIDTH, bias_init=BIAS, rngs=rngs)
        self.ln_f = nnx.LayerNorm(WIDTH, **norm)
        self.head = nnx.Linear(WIDTH, CLASSES, bias_init=BIAS, rngs=rngs)

    def __call__(self, x):  # [N, 8, 12]
        s = self.embed(x) + self.pos[...]
        s = s + self.mha(self.ln1(s))
        s = s + self.fc2(nnx.gelu(self.fc1(self.ln2(s)), approximate=True))
        return self.head(self.ln_f(s)[:, 0])  # (jnp.mean: jax2onnx writes ReduceMean with
        # an axes input at opset 17, which ONNX Runtime refuses)


MODELS = {"prenorm": (PreNorm, (TOKENS, 12))}


def main(argv):
    return run_models(argv, "out_flax_transformer", MODELS, export)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
