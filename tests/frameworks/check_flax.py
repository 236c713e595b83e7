"""Back into Flax: ``lsuv_nnx`` (an nnx CNN with BatchNorm, ConvTranspose, Dropout, whose
RNG key is state but no parameter, and an nnx.Einsum head, updated in place) and
``lsuv_linen`` (the same net in linen, without the Dropout and the Einsum, new variables
returned), through jax2onnx; then measured in Flax's own forward.

Usage (in the Flax interpreter, onnx_lsuv on PYTHONPATH): check_flax.py nnx|linen OUT.json;
check_flax.py fixed-nnx|fixed-linen OUT.json: a fixed STFT kernel held outside the parameters
(an nnx.Variable; linen: a "consts" collection) applied with lax.conv, then trainable layers;
check_flax.py wrong OUT.json: a batch with 4 channels, not 3, to lsuv_nnx (its BatchNorm in
train mode: a forward would update its statistics) and to lsuv_linen: what each raised, and
whether every variable is bit for bit as before.

Measured: the variance of each Conv / ConvTranspose / Linear (Dense) / Einsum output, computed
by the module's own layers (nnx: called one by one, as the net's __call__ does; linen:
capture_intermediates).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen, nnx  # noqa: E402

from _common import fixed_facts, raised, same, summary, var, write  # noqa: E402

BIAS = nnx.initializers.normal(1.0)
X = np.random.default_rng(2).standard_normal((32, 12, 12, 3)).astype("float32")


class CNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), padding="SAME", bias_init=BIAS, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.up = nnx.ConvTranspose(8, 6, (3, 3), strides=(2, 2), padding="SAME",
                                    bias_init=BIAS, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)  # holds an RNG key: not a parameter
        self.fc = nnx.Linear(6, 5, bias_init=BIAS, rngs=rngs)
        self.ein = nnx.Einsum("bd,dh->bh", (5, 4), (4,), bias_init=BIAS, rngs=rngs)

    def steps(self, x):
        a = self.conv(x)
        b = self.up(nnx.relu(self.bn(a)))
        c = self.fc(self.drop(nnx.relu(b).mean((1, 2))))
        return {"conv": a, "up": b, "fc": c, "ein": self.ein(nnx.relu(c))}

    def __call__(self, x):
        return self.steps(x)["ein"]


class Linen(linen.Module):
    @linen.compact
    def __call__(self, x):
        h = linen.Conv(8, (3, 3), bias_init=BIAS, name="conv")(x)
        h = linen.relu(linen.BatchNorm(use_running_average=True, name="bn")(h))
        h = linen.ConvTranspose(6, (3, 3), strides=(2, 2), bias_init=BIAS, name="up")(h)
        return linen.Dense(5, bias_init=BIAS, name="fc")(linen.relu(h).mean((1, 2)))


def arrays(model) -> dict:
    """The module's state as numpy, RNG keys left out (numpy cannot hold them)."""
    out = {}
    for k, v in nnx.to_flat_state(nnx.state(model)):
        value = getattr(v, "value", v)
        if not jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            out[k] = np.asarray(value)
    return out


def flat(variables) -> dict:
    """A linen variables tree as numpy, by its path ("params/conv/kernel")."""
    return {"/".join(p.key for p in k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(variables)}


def changed(before: dict, after: dict) -> list:
    """The keys whose arrays differ, in ``before``'s order."""
    return [k for k in before if not np.array_equal(before[k], after[k])]


def set_bn(model, stats) -> None:
    """An nnx model's BatchNorm ``bn`` given (mean, var, scale, bias): not fresh ones."""
    model.bn.mean.value, model.bn.var.value, model.bn.scale.value, model.bn.bias.value = stats


def bn_stats(seed):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(0.5, 0.5, 8).astype("float32")),
            jnp.asarray(rng.uniform(0.5, 2.0, 8).astype("float32")),
            jnp.asarray(rng.uniform(0.5, 1.5, 8).astype("float32")),
            jnp.asarray(rng.normal(0.0, 1.0, 8).astype("float32")))


def stft_kernel(n: int = 16, bins: int = 4) -> np.ndarray:
    """A windowed DFT filter bank, [n, 1, 2 bins] (WIO)."""
    t, f = np.arange(n), np.arange(1, bins + 1)
    phase = 2 * np.pi * np.outer(f, t) / n
    bank = np.concatenate([np.cos(phase), np.sin(phase)]) * np.hanning(n)
    return bank.T[:, None, :].astype("float32")


def log_power(x, kernel):
    s = jax.lax.conv_general_dilated(x, kernel, (4,), "VALID",
                                     dimension_numbers=("NWC", "WIO", "NWC"))
    return jnp.log(jnp.square(s) + 1.0)


AUDIO = np.random.default_rng(2).standard_normal((32, 128, 1)).astype("float32")


class Spectral(nnx.Module):
    """A fixed STFT kernel in an nnx.Variable (not a Param), then a trainable Conv with a
    bias, a BatchNorm with trained statistics and a Linear head."""

    def __init__(self, rngs):
        self.stft = nnx.Variable(jnp.asarray(stft_kernel()))
        self.conv = nnx.Conv(8, 12, (3,), padding="SAME", bias_init=BIAS, rngs=rngs)
        self.bn = nnx.BatchNorm(12, rngs=rngs)
        self.fc = nnx.Linear(12, 5, bias_init=BIAS, rngs=rngs)

    def steps(self, x):
        a = self.conv(log_power(x, self.stft.value))
        return {"conv": a, "fc": self.fc(nnx.relu(self.bn(a)).mean(1))}

    def __call__(self, x):
        return self.steps(x)["fc"]


class SpectralLinen(linen.Module):
    @linen.compact
    def __call__(self, x):
        kernel = self.variable("consts", "stft", lambda: jnp.asarray(stft_kernel()))
        h = linen.Conv(12, (3,), bias_init=BIAS, name="conv")(log_power(x, kernel.value))
        h = linen.relu(linen.BatchNorm(use_running_average=True, name="bn")(h))
        return linen.Dense(5, bias_init=BIAS, name="fc")(h.mean(1))


def bn12(seed):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(a.astype("float32")) for a in (
        rng.normal(0.5, 0.5, 12), rng.uniform(0.5, 2.0, 12), rng.uniform(0.5, 1.5, 12),
        rng.normal(0.0, 1.0, 12)))


def fixed(api: str, out_path: str) -> int:
    from onnx_lsuv.frameworks.flax import lsuv_linen, lsuv_nnx

    if api == "nnx":
        model = Spectral(nnx.Rngs(0))
        set_bn(model, bn12(1))
        model.eval()
        before = arrays(model)
        result = lsuv_nnx(model, AUDIO, seed=3)
        after = arrays(model)
        moved = [".".join(map(str, k)) for k in changed(before, after)]
        steps = model.steps(jnp.asarray(AUDIO))
        out, variances = steps["fc"], {k: var(v) for k, v in steps.items()}
        name, old, now = "stft", before[("stft",)], {"stft": after[("stft",)]}
    else:
        module = SpectralLinen()
        variables = module.init(jax.random.PRNGKey(0), AUDIO)
        mean, v, scale, shift = bn12(1)
        variables = {"params": {**variables["params"], "bn": {"scale": scale, "bias": shift}},
                     "batch_stats": {"bn": {"mean": mean, "var": v}},
                     "consts": variables["consts"]}
        result = lsuv_linen(module, variables, AUDIO, seed=3)
        new = result.variables
        moved = changed(flat(variables), flat(new))
        out, state = module.apply(new, AUDIO, capture_intermediates=True)
        inter = state["intermediates"]
        variances = {k: var(inter[k]["__call__"][0]) for k in ("conv", "fc")}
        name = "consts/stft"
        old, now = np.asarray(variables["consts"]["stft"]), {name: new["consts"]["stft"]}
    facts = summary(result, AUDIO, out, variances, moved)
    facts.update(fixed_facts(result, {name: old}, now))
    write(out_path, facts)
    return 0


def wrong(out_path: str) -> int:
    from onnx_lsuv.frameworks.flax import lsuv_linen, lsuv_nnx

    bad = X[:8, :, :, :2].repeat(2, axis=3)  # (8, 12, 12, 4)
    model = CNN(nnx.Rngs(0))
    set_bn(model, bn_stats(1))
    model.train()
    before = arrays(model)
    nnx_raised = raised(lambda: lsuv_nnx(model, bad, seed=3))
    nnx_same = same(before, arrays(model))
    module = Linen()
    variables = module.init(jax.random.PRNGKey(0), X)
    old = {k: v.copy() for k, v in flat(variables).items()}
    linen_raised = raised(lambda: lsuv_linen(module, variables, bad, seed=3))
    # a batch of the right shape to a linen BatchNorm in training mode: apply cannot update
    # the (immutable) batch_stats; the model's fault, not the batch's
    train = linen.BatchNorm(use_running_average=False)
    stats = train.init(jax.random.PRNGKey(0), X[:, 0, 0, :])
    train_raised = raised(lambda: lsuv_linen(train, stats, X[:, 0, 0, :], seed=3))
    write(out_path, {"nnx": {**nnx_raised, "same": nnx_same},
                     "linen": {**linen_raised, "same": same(old, flat(variables))},
                     "linen_train": train_raised})
    return 0


def main(argv):
    from onnx_lsuv.frameworks.flax import lsuv_linen, lsuv_nnx

    if argv[0] == "wrong":
        return wrong(argv[1])
    if argv[0].startswith("fixed-"):
        return fixed(argv[0][len("fixed-"):], argv[1])
    if argv[0] == "nnx":
        model = CNN(nnx.Rngs(0))
        set_bn(model, bn_stats(1))
        model.eval()
        before = arrays(model)
        result = lsuv_nnx(model, X, seed=3)
        after = arrays(model)
        moved = [".".join(map(str, k)) for k in changed(before, after)]
        steps = model.steps(jnp.asarray(X))
        out = steps["ein"]
        variances = {k: var(v) for k, v in steps.items()}
    else:
        module = Linen()
        variables = module.init(jax.random.PRNGKey(0), X)
        mean, v, scale, shift = bn_stats(1)
        variables = {"params": {**variables["params"], "bn": {"scale": scale, "bias": shift}},
                     "batch_stats": {"bn": {"mean": mean, "var": v}}}
        result = lsuv_linen(module, variables, X, seed=3)
        new = result.variables
        moved = changed(flat(variables), flat(new))
        out, state = module.apply(new, X, capture_intermediates=True)
        inter = state["intermediates"]
        variances = {k: var(inter[k]["__call__"][0]) for k in ("conv", "up", "fc")}
    write(argv[1], summary(result, X, out, variances, moved))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
