"""Export small Flax NNX models to ONNX with jax2onnx.

Usage: /work/fw/jax/bin/python export_flax.py OUTDIR [NAME ...]

Writes OUTDIR/<name>.onnx and OUTDIR/<name>.npy (float32 input batch) per model, and
OUTDIR/ref/<name>.npy (the Flax model's own output on that batch). Weights come from seeded
nnx.Rngs; every bias is drawn from N(0, 1) (bias_init=normal(1.0)).

Export path: jax2onnx.to_onnx(module, inputs=[("B", ...)], opset=17, return_mode="file").
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax2onnx import to_onnx  # noqa: E402

from _runner import run_models  # noqa: E402

OPSET = 17
BATCH = 16
BIAS = nnx.initializers.normal(1.0)


class CNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), padding="SAME", bias_init=BIAS, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, padding="SAME", bias_init=BIAS,
                              rngs=rngs)
        self.fc = nnx.Linear(16 * 6 * 6, 10, bias_init=BIAS, rngs=rngs)

    def __call__(self, x):  # x: [N, 12, 12, 3] (NHWC)
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        return self.fc(x.reshape(x.shape[0], -1))


class ConvT(nnx.Module):
    def __init__(self, rngs):
        self.deconv = nnx.ConvTranspose(4, 6, (3, 3), strides=(2, 2), padding="SAME",
                                        bias_init=BIAS, rngs=rngs)

    def __call__(self, x):  # [N, 8, 8, 4]
        return self.deconv(x)


class MHA(nnx.Module):
    def __init__(self, rngs):
        self.mha = nnx.MultiHeadAttention(num_heads=2, in_features=16, qkv_features=16,
                                          bias_init=BIAS, decode=False, rngs=rngs)
        self.fc = nnx.Linear(16, 16, bias_init=BIAS, rngs=rngs)

    def __call__(self, x):  # [N, 8, 16]
        return nnx.gelu(self.fc(self.mha(x)), approximate=True)


class HandAttention(nnx.Module):
    """Single-head attention written out with nnx.Linear q/k/v/out."""

    def __init__(self, rngs, d=16):
        self.q = nnx.Linear(d, d, bias_init=BIAS, rngs=rngs)
        self.k = nnx.Linear(d, d, bias_init=BIAS, rngs=rngs)
        self.v = nnx.Linear(d, d, bias_init=BIAS, rngs=rngs)
        self.o = nnx.Linear(d, d, bias_init=BIAS, rngs=rngs)
        self.d = d

    def __call__(self, x):  # [N, 8, 16]
        q, k, v = self.q(x), self.k(x), self.v(x)
        a = jax.nn.softmax(jnp.einsum("ntd,nsd->nts", q, k) / np.sqrt(self.d), axis=-1)
        return self.o(jnp.einsum("nts,nsd->ntd", a, v))


class LSTMUnrolled(nnx.Module):
    def __init__(self, rngs, steps=8):
        self.cell = nnx.LSTMCell(6, 10, bias_init=BIAS, rngs=rngs)
        self.steps = steps

    def __call__(self, x):  # [N, 8, 6]
        zeros = jnp.zeros((x.shape[0], 10), x.dtype)
        carry = (zeros, zeros)  # (c, h); initialize_carry would need rngs at call time
        ys = []
        for t in range(self.steps):
            carry, y = self.cell(carry, x[:, t])
            ys.append(y)
        return jnp.stack(ys, axis=1)


class LSTMRNN(nnx.Module):
    """nnx.RNN (nnx.scan over time) of an LSTMCell; initial carry given, so that no rng
    state is touched inside the trace."""

    def __init__(self, rngs):
        self.rnn = nnx.RNN(nnx.LSTMCell(6, 10, bias_init=BIAS, rngs=rngs), rngs=False)

    def __call__(self, x):  # [N, 8, 6]
        zeros = jnp.zeros((x.shape[0], 10), x.dtype)
        return self.rnn(x, initial_carry=(zeros, zeros))


class LSTMScan(nnx.Module):
    """jax.lax.scan over time of an nnx.LSTMCell (the cell is read from the closure)."""

    def __init__(self, rngs):
        self.cell = nnx.LSTMCell(6, 10, bias_init=BIAS, rngs=rngs)

    def __call__(self, x):  # [N, 8, 6]
        zeros = jnp.zeros((x.shape[0], 10), x.dtype)
        _, ys = jax.lax.scan(lambda c, xt: self.cell(c, xt), (zeros, zeros),
                             jnp.swapaxes(x, 0, 1))
        return jnp.swapaxes(ys, 0, 1)


class GRUScan(nnx.Module):
    """jax.lax.scan over time of an nnx.GRUCell."""

    def __init__(self, rngs):
        self.cell = nnx.GRUCell(6, 10, bias_init=BIAS, rngs=rngs)

    def __call__(self, x):  # [N, 8, 6]
        zeros = jnp.zeros((x.shape[0], 10), x.dtype)
        _, ys = jax.lax.scan(lambda c, xt: self.cell(c, xt), zeros, jnp.swapaxes(x, 0, 1))
        return jnp.swapaxes(ys, 0, 1)


class EinsumHead(nnx.Module):
    """nnx.Einsum, then a Linear, then a head through nnx.Embed.attend (the embedding table
    transposed): jax2onnx writes the Einsum and the head as Einsum nodes with constant
    weights ('btd,dh->bth' and 'abc,cd->abd' on Transpose(table)), dense layers."""

    def __init__(self, rngs):
        self.ein = nnx.Einsum("btd,dh->bth", (6, 12), (12,), bias_init=BIAS, rngs=rngs)
        self.fc = nnx.Linear(12, 16, bias_init=BIAS, rngs=rngs)
        self.emb = nnx.Embed(20, 16, rngs=rngs)

    def __call__(self, x):  # [N, 8, 6]
        return self.emb.attend(self.fc(nnx.relu(self.ein(x))))


class EinsumTiedHead(nnx.Module):
    """Tokens (the argmax of each input step) through nnx.Embed, nnx.Einsum, a Linear, and
    the head tied to the embedding through nnx.Embed.attend: the table is read by a Gather
    and by the head's Einsum, a tie that onnx-lsuv leaves alone by rule."""

    def __init__(self, rngs):
        self.emb = nnx.Embed(20, 16, rngs=rngs)
        self.ein = nnx.Einsum("btd,dh->bth", (16, 12), (12,), bias_init=BIAS, rngs=rngs)
        self.fc = nnx.Linear(12, 16, bias_init=BIAS, rngs=rngs)

    def __call__(self, x):  # [N, 8, 6]: tokens 0..5
        h = self.emb(jnp.argmax(x, axis=-1))
        return self.emb.attend(self.fc(nnx.relu(self.ein(h))))


MODELS = {
    "cnn": (CNN, (12, 12, 3)),
    "conv_transpose": (ConvT, (8, 8, 4)),
    "attention": (MHA, (8, 16)),
    "attention_hand": (HandAttention, (8, 16)),
    "lstm_unrolled": (LSTMUnrolled, (8, 6)),
    "lstm_rnn": (LSTMRNN, (8, 6)),
    "lstm_scan": (LSTMScan, (8, 6)),
    "gru_scan": (GRUScan, (8, 6)),
    "einsum": (EinsumHead, (8, 6)),
    "einsum_tied": (EinsumTiedHead, (8, 6)),
}


# Known not to export with this jax2onnx/flax: nnx.RNN runs nnx.scan, which refuses the
# module's Params seen from jax2onnx's trace ("Cannot extract graph node from different trace
# level"), also with nnx.split/merge inside the traced function. lstm_scan (jax.lax.scan over
# the same cell) is the working equivalent.
KNOWN_FAIL = {"lstm_rnn"}


def param_names(model):
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return [".".join(str(p) for p in path) for path, _ in flat]


def export(name, cls, shape, outdir, seed):
    model = cls(nnx.Rngs(seed))
    model.eval() if hasattr(model, "eval") else None
    x = np.random.default_rng(1000 + seed).standard_normal((BATCH,) + shape).astype(np.float32)
    ref = np.asarray(model(jnp.asarray(x)))
    path = os.path.join(outdir, name + ".onnx")
    to_onnx(model, inputs=[("B",) + shape], opset=OPSET, model_name=name,
            return_mode="file", output_path=path)
    np.save(os.path.join(outdir, name + ".npy"), x)
    np.save(os.path.join(outdir, "ref", name + ".npy"), ref.astype(np.float32))
    state = {".".join(str(p) for p in path): getattr(v, "value", v)
             for path, v in nnx.to_flat_state(nnx.state(model))}
    np.savez(os.path.join(outdir, "params", name + ".npz"),
             **{k: np.asarray(v) for k, v in state.items()
                if not jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)})
    return param_names(model)


def main(argv):
    return run_models(argv, "out_flax", MODELS, export, frozenset(KNOWN_FAIL))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
