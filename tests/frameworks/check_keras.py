"""Back into Keras 3: ``onnx_lsuv.frameworks.keras.lsuv_model`` on a CNN with BatchNorm,
DepthwiseConv2D, a Dense on 3-D input and an LSTM, through tf2onnx and Keras' own export;
then measured in Keras' own forward.

Usage (in the Keras interpreter, onnx_lsuv on PYTHONPATH):
  check_keras.py one OUT.json EXPORTER   the one call; facts to OUT.json
  check_keras.py shared OUT.json EXPORTER  the same on two Dense layers with equal constant
                                         biases (stored once by both exporters)
  check_keras.py fixed OUT.json EXPORTER  a fixed STFT Conv1D (trainable=False), then
                                         trainable layers: the fixed kernel left alone
  check_keras.py wrong OUT.json          a batch of 21 features to the 20-feature Dense model:
                                         what it raised; every weight as before?
  check_keras.py export DIR              DIR/model.onnx (tf2onnx), params.npz, x.npy
  check_keras.py measure DIR             loads DIR/new.npz into the model; DIR/measure.json

Measured: the variance of every Conv2D / DepthwiseConv2D / Dense output (activations are
separate layers, so these are pre-activation; for conv_nobias, the output of bn2, which
tf2onnx folds into that bias-less conv, so that the ONNX conv computes bn2's output) and,
for the LSTM, of each gate's input projection x W_g, with W_g the Keras kernel's gate block
(gate order i f c o) and x the LSTM's input in Keras' own forward.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402

from _common import fixed_facts, raised, same, summary, var, write  # noqa: E402


def off_defaults(model) -> None:
    """Non-zero biases and BatchNorm statistics away from their defaults (fresh ones hide
    misplaced biases)."""
    rng = np.random.default_rng(1)
    for w in model.weights:
        leaf, shape = w.path.split("/")[-1], tuple(w.shape)
        if leaf == "moving_variance":
            w.assign(rng.uniform(0.5, 2.0, shape).astype("float32"))
        elif leaf in ("bias", "beta", "moving_mean"):
            w.assign(rng.normal(0.0, 1.0, shape).astype("float32"))
        elif leaf == "gamma":
            w.assign(rng.uniform(0.5, 1.5, shape).astype("float32"))


def build():
    keras.utils.set_random_seed(0)
    inp = keras.Input((12, 12, 3), name="x")
    h = layers.Conv2D(8, 3, padding="same", name="conv")(inp)
    h = layers.BatchNormalization(name="bn")(h)
    h = layers.ReLU()(h)
    h = layers.DepthwiseConv2D(3, padding="same", name="depthwise")(h)
    h = layers.BatchNormalization(name="bn_dw")(h)
    h = layers.ReLU()(h)
    h = layers.Conv2D(8, 1, use_bias=False, name="conv_nobias")(h)
    h = layers.BatchNormalization(name="bn2")(h)
    h = layers.ReLU()(h)
    h = layers.Reshape((144, 8))(h)
    h = layers.Dense(6, name="dense3d")(h)
    h = layers.Activation("tanh")(h)
    h = layers.LSTM(5, name="lstm")(h)
    out = layers.Dense(4, name="head")(h)
    model = keras.Model(inp, out)
    off_defaults(model)
    x = np.random.default_rng(2).standard_normal((32, 12, 12, 3)).astype("float32")
    return model, x


FOLDED = {"conv_nobias": "bn2"}  # tf2onnx folds a BatchNorm into a conv without a bias


def measure(model, x) -> dict:
    targets = [lay for lay in model.layers
               if isinstance(lay, (layers.Conv2D, layers.DepthwiseConv2D, layers.Dense))]
    lstm = model.get_layer("lstm")
    taps = [model.get_layer(FOLDED.get(t.name, t.name)).output for t in targets]
    probe = keras.Model(model.input, taps + [lstm.input])
    outs = probe(x, training=False)
    out = {t.name: var(o) for t, o in zip(targets, outs)}
    seq = np.asarray(outs[-1], np.float64)
    kernel = np.asarray(lstm.cell.kernel.numpy(), np.float64)
    h = kernel.shape[1] // 4
    for g, gate in enumerate("ifco"):
        out[f"lstm[{gate}]"] = var(seq @ kernel[:, g * h:(g + 1) * h])
    return out


def build_shared():
    """Input(20), two Dense(16, relu, bias_initializer=Constant(0.1)), Dense(4): both
    exporters store the two equal biases as one initializer read by both layers."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((20,), name="x")
    h = inp
    for name in ("d1", "d2"):
        h = layers.Dense(16, activation="relu", name=name,
                         bias_initializer=keras.initializers.Constant(0.1))(h)
    model = keras.Model(inp, layers.Dense(4, name="d3")(h))
    return model, np.random.default_rng(2).standard_normal((64, 20)).astype("float32")


def measure_dense(model, x) -> dict:
    """Each Dense's pre-activation output x W + b, from its input in Keras' own forward."""
    dense = [lay for lay in model.layers if isinstance(lay, layers.Dense)]
    inputs = keras.Model(model.input, [lay.input for lay in dense])(x, training=False)
    return {lay.name: var(np.asarray(i, np.float64) @ np.asarray(lay.kernel.numpy(), np.float64)
                          + np.asarray(lay.bias.numpy(), np.float64))
            for lay, i in zip(dense, inputs)}


def stft_kernel(n: int = 16, bins: int = 4) -> np.ndarray:
    """A windowed DFT filter bank, [n, 1, 2 bins] (Keras' Conv1D layout)."""
    t, f = np.arange(n), np.arange(1, bins + 1)
    phase = 2 * np.pi * np.outer(f, t) / n
    bank = np.concatenate([np.cos(phase), np.sin(phase)]) * np.hanning(n)
    return bank.T[:, None, :].astype("float32")


def build_fixed():
    """A fixed STFT Conv1D (no bias, layer.trainable = False), log power, then a trainable
    Conv1D with a bias, pooling, a BatchNorm with trained statistics and a Dense head."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((128, 1), name="x")
    stft = layers.Conv1D(8, 16, strides=4, use_bias=False, name="stft")
    h = stft(inp)
    h = keras.ops.log(keras.ops.square(h) + 1.0)
    h = layers.ReLU()(layers.Conv1D(12, 3, padding="same", name="conv")(h))
    h = layers.BatchNormalization(name="bn")(layers.GlobalAveragePooling1D()(h))
    model = keras.Model(inp, layers.Dense(5, name="head")(h))
    stft.set_weights([stft_kernel()])
    stft.trainable = False
    off_defaults(model)
    return model, np.random.default_rng(2).standard_normal((32, 128, 1)).astype("float32")


def fixed(out_path: str, exporter: str) -> int:
    from onnx_lsuv.frameworks.keras import lsuv_model

    model, x = build_fixed()
    before = {w.path: np.asarray(w.numpy()) for w in model.weights}
    result = lsuv_model(model, x, exporter=exporter, seed=3)
    now = {w.path: np.asarray(w.numpy()) for w in model.weights}
    moved = [k for k in before if not np.array_equal(before[k], now[k])]
    names = ("conv", "head")
    taps = keras.Model(model.input, [model.get_layer(n).output for n in names])(x, training=False)
    facts = summary(result, x, model(x, training=False),
                    {n: var(t) for n, t in zip(names, taps)}, moved)
    facts.update(fixed_facts(result, {"stft/kernel": before["stft/kernel"]}, now))
    write(out_path, facts)
    return 0


def wrong(out_path: str) -> int:
    from onnx_lsuv.frameworks.keras import lsuv_model

    model, x = build_shared()
    bad = np.concatenate([x, x[:, :1]], axis=1)  # (64, 21)
    before = {w.path: np.asarray(w.numpy()).copy() for w in model.weights}
    facts = raised(lambda: lsuv_model(model, bad, seed=3))
    facts["same"] = same(before, {w.path: np.asarray(w.numpy()) for w in model.weights})
    write(out_path, facts)
    return 0


def main(argv):
    mode = argv[0]
    if mode == "wrong":
        return wrong(argv[1])
    if mode == "fixed":
        return fixed(argv[1], argv[2])
    if mode == "shared":
        from onnx_lsuv.frameworks.keras import lsuv_model

        model, x = build_shared()
        before = {w.path: np.asarray(w.numpy()) for w in model.weights}
        result = lsuv_model(model, x, exporter=argv[2], seed=3)
        moved = [w.path for w in model.weights
                 if not np.array_equal(before[w.path], np.asarray(w.numpy()))]
        write(argv[1], summary(result, x, model(x, training=False), measure_dense(model, x),
                               moved))
        return 0
    model, x = build()
    if mode == "one":
        from onnx_lsuv.frameworks.keras import lsuv_model

        before = {w.path: np.asarray(w.numpy()) for w in model.weights}
        result = lsuv_model(model, x, exporter=argv[2], seed=3)
        moved = [w.path for w in model.weights
                 if not np.array_equal(before[w.path], np.asarray(w.numpy()))]
        write(argv[1], summary(result, x, model(x, training=False), measure(model, x), moved))
    elif mode == "export":
        import tensorflow as tf
        import tf2onnx

        spec = (tf.TensorSpec((None, 12, 12, 3), tf.float32, name="x"),)
        fn = tf.function(lambda t: model(t, training=False), input_signature=spec)
        tf2onnx.convert.from_function(fn, input_signature=spec, opset=17,
                                      output_path=os.path.join(argv[1], "model.onnx"))
        np.savez(os.path.join(argv[1], "params.npz"),
                 **{w.path: np.asarray(w.numpy()) for w in model.weights})
        np.save(os.path.join(argv[1], "x.npy"), x)
    elif mode == "measure":
        with np.load(os.path.join(argv[1], "new.npz")) as new:
            by_path = {w.path: w for w in model.weights}
            for k in new.files:
                by_path[k].assign(new[k])
        write(os.path.join(argv[1], "measure.json"),
              {"variances": measure(model, x),
               "out": np.asarray(model(x, training=False)).tolist()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
