"""Every Table 1 architecture and activation: LSUV reaches unit variance on real digits data."""

import numpy as np
import onnx
import pytest

from onnx_lsuv import lsuv_init

from conftest import output_variances, target_outputs
from fitnets import ACTIVATIONS, ARCHITECTURES, build, digits_batch


def batch_for(arch, digits):
    shape = ARCHITECTURES[arch]["input"]
    if shape == digits.shape[1:]:
        return digits
    if len(shape) == 1:  # an MLP on the raw 8x8 pixels
        return digits_batch(n=64, size=8, seed=0).reshape(64, -1)
    c, h, w = shape
    if h != 32:  # the experiments' 16x16 digits
        return digits_batch(n=64, size=h, seed=0)
    # 3x32x32 architectures: the same digits, padded to 32x32 and repeated over channels.
    x = np.pad(digits, ((0, 0), (0, 0), (2, 2), (2, 2)))
    return np.repeat(x, c, axis=1)[:32]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_sample_architecture_reaches_unit_variance(arch, activation, digits):
    model = build(arch, activation)
    x = batch_for(arch, digits)
    result = lsuv_init(model, x, provider="cpu")
    onnx.checker.check_model(result.model)
    names = target_outputs(model)
    assert len(result.report.layers) == len(names)
    for name, v in zip(names, output_variances(result.model, {"input": x}, names)):
        assert abs(v - 1.0) < 0.1, (name, v)


def test_bundled_sample_holds_on_held_out_digits(digits_heldout):
    model = onnx.load("sample_models/fitnet_mnist_relu.onnx")
    batch = np.load("sample_models/digits_batch.npy")
    result = lsuv_init(model, batch, provider="cpu")
    names = target_outputs(model)
    for v in output_variances(result.model, {"input": batch}, names):
        assert abs(v - 1.0) < 0.1
    for v in output_variances(result.model, {"input": digits_heldout}, names):
        assert 0.5 < v < 2.0
