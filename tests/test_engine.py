"""Providers: CPU everywhere, CUDA where it really works, clear errors where it does not."""

import logging

import numpy as np
import pytest

from onnx_lsuv import ProviderError, lsuv_init
from onnx_lsuv.engine import Engine

import models
from conftest import output_variances


def cuda_works() -> bool:
    try:
        return Engine("cuda").name == "cuda"
    except ProviderError:
        return False


CUDA = cuda_works()


def test_cpu_engine_runs_on_the_cpu_provider():
    model, feeds, _ = models.conv_chain()
    engine = Engine("cpu")
    sess = engine.session(model)
    assert sess.ort_session.get_providers() == ["CPUExecutionProvider"]
    assert sess.run(feeds, ["y2"])[0].shape == (16, 8, 6, 6)


@pytest.mark.skipif(CUDA, reason="CUDA works here: the error path cannot be seen")
def test_asking_for_cuda_without_it_is_a_clear_error():
    with pytest.raises(ProviderError, match="CUDA provider is not available"):
        Engine("cuda")


@pytest.mark.skipif(CUDA, reason="CUDA works here: auto picks it")
def test_auto_falls_back_to_the_cpu_with_one_line_for_verbose_only(caplog, monkeypatch):
    # Without an NVIDIA driver the CPU is what anyone expects: one line, at debug level (-v).
    from onnx_lsuv import engine as engine_module

    monkeypatch.setattr(engine_module, "_cuda_driver_present", lambda: False)
    monkeypatch.setattr(engine_module.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with caplog.at_level(logging.DEBUG, logger="onnx_lsuv"):
        engine = Engine("auto")
    assert engine.name == "cpu"
    lines = [r for r in caplog.records if "CPU provider" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.DEBUG
    assert "no NVIDIA driver found" in lines[0].getMessage()


def test_a_driver_whose_cuda_fails_is_said_loudly(caplog, monkeypatch):
    from onnx_lsuv import engine as engine_module

    monkeypatch.setattr(engine_module, "_cuda_driver_present", lambda: True)
    monkeypatch.setattr(engine_module.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])

    def refuse(*args, **kwargs):
        raise RuntimeError("libcudnn.so.9: cannot open shared object file")

    monkeypatch.setattr(engine_module.ort, "InferenceSession", refuse)
    with caplog.at_level(logging.INFO, logger="onnx_lsuv"):
        engine = Engine("auto")
    assert engine.name == "cpu"
    (line,) = [r for r in caplog.records if "CPU provider" in r.getMessage()]
    assert line.levelno == logging.WARNING and "libcudnn" in line.getMessage()


def test_unknown_provider_is_refused():
    with pytest.raises(ProviderError):
        Engine("tpu")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs onnxruntime-gpu with a working CUDA provider")
@pytest.mark.parametrize("kind", ["residual", "conv_bn", "matmul", "depthwise_conv"])
def test_cuda_reaches_unit_variance_and_agrees_with_the_cpu(kind):
    model, feeds, outputs = models.ALL[kind]()
    gpu = lsuv_init(model, feeds, provider="cuda")
    cpu = lsuv_init(model, feeds, provider="cpu")
    assert gpu.report.provider == "cuda"
    v_gpu = output_variances(gpu.model, feeds, outputs)
    assert all(abs(v - 1) < 0.1 for v in v_gpu)
    np.testing.assert_allclose(v_gpu, output_variances(cpu.model, feeds, outputs), atol=0.02)
