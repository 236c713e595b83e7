"""Shared test helpers: model builders and an independent variance measurement."""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "sample_models"))
sys.path.insert(0, os.path.join(ROOT, "tests", "frameworks"))  # _common: the checks' helpers

OPSET = 17
IR_VERSION = 8


def framework_python(framework: str, modules) -> str | None:
    """The interpreter that has ``framework``: the one ONNX_LSUV_<FRAMEWORK>_PYTHON names
    (.ci/exporter-venvs builds them), else this one if it imports ``modules``; else None."""
    import importlib.util

    named = os.environ.get(f"ONNX_LSUV_{framework.upper()}_PYTHON")
    if named:
        return named
    if all(importlib.util.find_spec(m) is not None for m in modules):
        return sys.executable
    return None



def run_export_script(framework: str, modules, script: str, out: str, timeout: int) -> str:
    """Run tests/exporters/``script`` with the interpreter that has ``framework`` (skip the
    test where none has it), writing into ``out``; ``out``. Nothing downloads: polygraphy's
    own installs are off."""
    import subprocess

    python = framework_python(framework, modules)
    if python is None:
        pytest.skip(f"{framework} is not installed here (set "
                    f"ONNX_LSUV_{framework.upper()}_PYTHON, see .ci/exporter-venvs)")
    env = dict(os.environ, POLYGRAPHY_AUTOINSTALL_DEPS="0", TF_CPP_MIN_LOG_LEVEL="3",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([python, os.path.join(ROOT, "tests", "exporters", script), out],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out

def make_model(nodes, inputs, outputs, inits, opset=OPSET, ir_version=IR_VERSION):
    """A checked model. inputs/outputs: (name, shape) or (name, shape, elem_type)."""

    def vi(spec):
        name, shape = spec[0], spec[1]
        if shape is None:  # filled in by shape inference below
            return helper.make_empty_tensor_value_info(name)
        elem = spec[2] if len(spec) > 2 else TensorProto.FLOAT
        return helper.make_tensor_value_info(name, elem, shape)

    graph = helper.make_graph(
        nodes, "test", [vi(i) for i in inputs], [vi(o) for o in outputs],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=ir_version)
    model = onnx.shape_inference.infer_shapes(model)
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    return model


def output_values(model: onnx.ModelProto, feeds: dict, names: list[str]) -> list[np.ndarray]:
    """Tensors ``names`` on ``feeds``, from the test's own ORT session (independent of
    onnx_lsuv) with the tensors exposed as outputs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    for n in names:
        m.graph.output.append(helper.make_empty_tensor_value_info(n))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(names, feeds)


def output_variances(model: onnx.ModelProto, feeds: dict, names: list[str]) -> list[float]:
    """Variance of tensors ``names`` on ``feeds``, measured here with numpy in float64."""
    return [float(np.var(y, dtype=np.float64)) for y in output_values(model, feeds, names)]


def target_outputs(model: onnx.ModelProto) -> list[str]:
    """Output tensor of every Conv/ConvTranspose/Gemm node (the test's own notion)."""
    return [n.output[0] for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm")]


def initializers(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: t.SerializeToString() for t in model.graph.initializer}


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="session")
def digits():
    from fitnets import digits_batch

    return digits_batch(n=64, size=28, seed=0)


@pytest.fixture(scope="session")
def digits_heldout():
    from fitnets import digits_batch

    return digits_batch(n=64, size=28, seed=1)


# CI draws the same property-test examples every run (a failure there is then a change, not
# the luck of the draw); elsewhere hypothesis explores, and keeps what it finds in .hypothesis/.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    _hypothesis_settings.load_profile("ci")


def cli(*args: str):
    """The CLI in process (click's runner), on the CPU provider."""
    from click.testing import CliRunner

    from onnx_lsuv_cli.main import lsuv_command

    return CliRunner().invoke(lsuv_command, [*map(str, args), "--provider", "cpu"])


def saved(tmp_path, model, feeds):
    """``model`` and its one feed saved as m.onnx and d.npy in ``tmp_path``."""
    m, d = tmp_path / "m.onnx", tmp_path / "d.npy"
    onnx.save(model, m)
    np.save(d, next(iter(feeds.values())))
    return m, d
