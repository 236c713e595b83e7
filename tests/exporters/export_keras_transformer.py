"""Export a small pre-LN transformer block written in Keras 3 with tf2onnx (issue 28: roles
in a tf2onnx graph). Run from the Keras interpreter, like export_keras.py, whose
``randomise`` (every bias and LayerNorm gamma/beta non-default) and ``export`` it uses.

Usage: python export_keras_transformer.py OUTDIR

The model (``prenorm``): Dense(16) without bias on the input features writes the residual
stream, plus a learnt position table; a pre-LN block (LayerNormalization ->
MultiHeadAttention (2 heads, Einsum projections) -> Add; LayerNormalization -> Dense(32, relu)
-> Dense(16) -> Add); a final LayerNormalization, the mean over tokens and a Dense(5) head.
"""

from __future__ import annotations

import sys

import keras  # noqa: E402 - export_keras sets the backend before this runs
from export_keras import BATCH, export  # noqa: F401 - sets TF/Keras environment first
from keras import layers

from _runner import run_models

TOKENS, WIDTH, CLASSES = 8, 16, 5


class PositionTable(layers.Layer):
    """A learnt position embedding added to the stream (ViT's / GPT's ``pos_embed``)."""

    def build(self, shape):
        self.table = self.add_weight(shape=(1, shape[1], shape[2]), name="table")

    def call(self, x):
        return x + self.table


def build_models():
    init = lambda s: keras.initializers.GlorotUniform(seed=s)  # noqa: E731
    inp = keras.Input((TOKENS, 12), name="x")
    # No bias: tf2onnx folds the embedding's bias into the position table (one [1, T, D]
    # constant), and N(0, 1) biases alone would give the stream more than the policy's 1/3.
    s = layers.Dense(WIDTH, use_bias=False, kernel_initializer=init(1), name="embed")(inp)
    s = PositionTable(name="pos")(s)
    h = layers.LayerNormalization(name="ln1")(s)
    h = layers.MultiHeadAttention(num_heads=2, key_dim=8, kernel_initializer=init(2),
                                  name="mha")(h, h)
    s = layers.Add(name="res1")([s, h])
    h = layers.LayerNormalization(name="ln2")(s)
    h = layers.Dense(32, activation="relu", kernel_initializer=init(3), name="fc1")(h)
    h = layers.Dense(WIDTH, kernel_initializer=init(4), name="fc2")(h)
    s = layers.Add(name="res2")([s, h])
    h = layers.LayerNormalization(name="ln_f")(s)
    h = layers.GlobalAveragePooling1D(name="pool")(h)
    out = layers.Dense(CLASSES, kernel_initializer=init(5), name="head")(h)
    return {"prenorm": (keras.Model(inp, out, name="prenorm"), (BATCH, TOKENS, 12))}


def main(argv):
    keras.utils.set_random_seed(0)
    return run_models(argv, "out_keras_transformer", build_models(), export)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
