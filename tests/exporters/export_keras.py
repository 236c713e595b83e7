"""Export small Keras 3 models to ONNX with tf2onnx.

Usage: /work/fw/tf/bin/python export_keras.py OUTDIR

Writes OUTDIR/<name>.onnx and OUTDIR/<name>.npy (float32 input batch) per model, and
OUTDIR/ref/<name>.npy (Keras' own output on that batch, to compare with ONNX Runtime).
Weights are random (seeded); every bias is drawn from N(0, 1); BatchNormalization gets
non-default moving mean / variance and gamma / beta.

Export path: tf2onnx.convert.from_function on a tf.function wrapping model(x, training=False)
with an explicit input_signature (tf2onnx.convert.from_keras needs Keras 2's
`model.output_names` etc. and does not work with Keras 3 models), opset 17; and, for
`keras_export`, Keras' own `model.export(path, format="onnx")` (tf2onnx inside, opset 15).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402
from keras import layers  # noqa: E402

from _runner import run_models  # noqa: E402

OPSET = 17
BATCH = 16


def randomise(model, seed):
    """Biases ~ N(0,1); BatchNorm stats non-default; kernels ~ N(0, 1/fan_in), all distinct."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for w in layer.weights:
            path = w.path if hasattr(w, "path") else w.name
            leaf = path.split("/")[-1]
            shape = tuple(w.shape)
            if leaf in ("bias",) or leaf.endswith("_bias"):
                w.assign(rng.normal(0.0, 1.0, shape).astype("float32"))
            elif leaf == "moving_mean":
                w.assign(rng.normal(0.5, 0.5, shape).astype("float32"))
            elif leaf == "moving_variance":
                w.assign(rng.uniform(0.5, 2.0, shape).astype("float32"))
            elif leaf == "gamma":
                w.assign(rng.uniform(0.5, 1.5, shape).astype("float32"))
            elif leaf == "beta":
                w.assign(rng.normal(0.0, 1.0, shape).astype("float32"))
            else:  # kernels: fresh draws, so no two weights are equal (a seeded Keras
                # initializer object reused by several sublayers, as MultiHeadAttention's
                # kernel_initializer, gives them all the same values, and tf2onnx then
                # merges the identical constants and even the identical MatMuls)
                fan_in = max(1, int(np.prod(shape[:-1])))
                w.assign(rng.normal(0.0, fan_in ** -0.5, shape).astype("float32"))


def build_models():
    init = lambda s: keras.initializers.GlorotUniform(seed=s)  # noqa: E731
    rinit = lambda s: keras.initializers.Orthogonal(seed=s)  # noqa: E731
    models = {}

    inp = keras.Input((32, 8), name="x")
    h = layers.Conv1D(16, 3, padding="same", kernel_initializer=init(1), name="conv1d_a")(inp)
    h = layers.ReLU(name="relu")(h)
    out = layers.Conv1D(8, 3, kernel_initializer=init(2), name="conv1d_b")(h)
    models["conv1d"] = (keras.Model(inp, out, name="conv1d"), (BATCH, 32, 8))

    inp = keras.Input((10, 12), name="x")
    h = layers.Dense(24, activation="relu", kernel_initializer=init(3), name="dense_a")(inp)
    out = layers.Dense(6, activation="relu", kernel_initializer=init(4), name="dense_b")(h)
    models["dense3d"] = (keras.Model(inp, out, name="dense3d"), (BATCH, 10, 12))

    inp = keras.Input((16, 16, 3), name="x")
    h = layers.Conv2D(8, 3, padding="same", kernel_initializer=init(5), name="conv2d")(inp)
    h = layers.DepthwiseConv2D(3, padding="same", depthwise_initializer=init(6),
                               name="depthwise")(h)
    out = layers.BatchNormalization(name="bn")(h)
    models["depthwise"] = (keras.Model(inp, out, name="depthwise"), (BATCH, 16, 16, 3))

    inp = keras.Input((8, 8, 4), name="x")
    out = layers.Conv2DTranspose(6, 3, strides=2, padding="same", kernel_initializer=init(7),
                                 name="deconv")(inp)
    models["conv2d_transpose"] = (keras.Model(inp, out, name="conv2d_transpose"),
                                  (BATCH, 8, 8, 4))

    inp = keras.Input((8, 6), name="x")
    out = layers.LSTM(10, kernel_initializer=init(8), recurrent_initializer=rinit(9),
                      return_sequences=True, name="lstm")(inp)
    models["lstm"] = (keras.Model(inp, out, name="lstm"), (BATCH, 8, 6))

    inp = keras.Input((8, 6), name="x")
    out = layers.GRU(10, kernel_initializer=init(10), recurrent_initializer=rinit(11),
                     return_sequences=True, name="gru")(inp)
    models["gru"] = (keras.Model(inp, out, name="gru"), (BATCH, 8, 6))

    # extra: reset_after=False (Keras 2's GRU v1 maths), to see whether tf2onnx then emits GRU
    inp = keras.Input((8, 6), name="x")
    out = layers.GRU(10, kernel_initializer=init(14), recurrent_initializer=rinit(15),
                     reset_after=False, return_sequences=True, name="gru")(inp)
    models["gru_reset_before"] = (keras.Model(inp, out, name="gru_reset_before"), (BATCH, 8, 6))

    inp = keras.Input((8, 16), name="x")
    h = layers.MultiHeadAttention(num_heads=2, key_dim=8, kernel_initializer=init(12),
                                  name="mha")(inp, inp)
    out = layers.Dense(16, activation=lambda t: keras.activations.gelu(t, approximate=True),
                       kernel_initializer=init(13), name="dense_gelu")(h)
    models["mha"] = (keras.Model(inp, out, name="mha"), (BATCH, 8, 16))

    # Keras' own exporter (model.export(format="onnx"), tf2onnx inside, its own opset)
    inp = keras.Input((12, 12, 3), name="x")
    h = layers.Conv2D(8, 3, padding="same", activation="relu", kernel_initializer=init(16),
                      name="conv")(inp)
    h = layers.BatchNormalization(name="bn")(h)
    h = layers.Conv1D(6, 3, padding="same", kernel_initializer=init(17), name="conv1d")(
        layers.Reshape((144, 8), name="flat")(h))
    out = layers.Dense(10, kernel_initializer=init(18), name="head")(h)
    models["keras_export"] = (keras.Model(inp, out, name="keras_export"), (BATCH, 12, 12, 3))
    return models


def export(name, model, shape, outdir, seed):
    randomise(model, seed)
    x = np.random.default_rng(1000 + seed).standard_normal(shape).astype(np.float32)
    ref = np.asarray(model(x, training=False))
    spec = (tf.TensorSpec((None,) + shape[1:], tf.float32, name="x"),)

    @tf.function(input_signature=spec)
    def fn(x):
        return model(x, training=False)

    path = os.path.join(outdir, name + ".onnx")
    if name == "keras_export":
        model.export(path, format="onnx", verbose=False)
    else:
        tf2onnx.convert.from_function(fn, input_signature=spec, opset=OPSET, output_path=path)
    np.save(os.path.join(outdir, name + ".npy"), x)
    np.save(os.path.join(outdir, "ref", name + ".npy"), ref.astype(np.float32))
    names = [getattr(w, "path", w.name) for w in model.weights]
    np.savez(os.path.join(outdir, "params", name + ".npz"),
             **{n: np.asarray(w.numpy()) for n, w in zip(names, model.weights)})
    return names


def main(argv):
    keras.utils.set_random_seed(0)
    return run_models(argv, "out_keras", build_models(), export)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
