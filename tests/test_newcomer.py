"""A newcomer's first hour, as a test (issue 29): build the wheel, make a fresh virtualenv from
it, run the main job of README's first command on the bundled sample, and one docs example
per framework that this machine has.

Nothing may download while the tests run, so the fresh virtualenv installs from a local
wheelhouse that ONNX_LSUV_WHEELHOUSE names (.ci/run fills it with ``pip download`` first);
without it the tests are skipped. The wheel is built here with ``python -m build --wheel
--no-isolation`` (it needs ``build`` and setuptools >= 77 in this environment: the docs
extra's step of .ci/run installs them), unless ONNX_LSUV_WHEEL names one already built.

The PyTorch example runs in the fresh virtualenv (torch from the wheelhouse). Keras, Flax and
Paddle cannot share one environment with onnx-lsuv's own onnx pins, so their examples run in
the framework interpreters of .ci/exporter-venvs (ONNX_LSUV_*_PYTHON) with the wheel's
unpacked files, not the checkout, on PYTHONPATH.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import pytest

from conftest import ROOT, framework_python, output_variances, target_outputs
from test_docs_examples import FRAMEWORKS, examples_in, external_env, readme_commands

pytestmark = pytest.mark.slow
TIMEOUT_S = 900
TOL = 0.1
PAGES = {"torch": "pytorch", "keras": "keras", "flax": "flax", "paddle": "paddle"}


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, **kw)
    assert proc.returncode == 0, (f"{shlex.join(cmd)} exited {proc.returncode}:\n"
                                  f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def wheelhouse() -> str:
    found = os.environ.get("ONNX_LSUV_WHEELHOUSE")
    if not found or not os.path.isdir(found):
        pytest.skip("needs ONNX_LSUV_WHEELHOUSE, a directory of the wheel's dependencies "
                    "(.ci/run makes it): nothing may download while the tests run")
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    given = os.environ.get("ONNX_LSUV_WHEEL")
    if given:
        return os.path.abspath(given)
    if importlib.util.find_spec("build") is None:
        pytest.skip("needs the 'build' package to build the wheel (pip install build)")
    out = tmp_path_factory.mktemp("dist")
    # A copy of the checkout: the build writes build/ and *.egg-info beside the sources.
    src = tmp_path_factory.mktemp("src") / "onnx-lsuv"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", ".ci-*", "dist", "build", "*.egg-info", "__pycache__", "site"))
    run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out),
         str(src)])
    (built,) = glob.glob(str(out / "onnx_lsuv-*.whl"))
    return built


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory, wheel, wheelhouse) -> str:
    """A new virtualenv with the wheel (and its torch extra) installed from the wheelhouse."""
    venv = tmp_path_factory.mktemp("newcomer") / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    run([str(venv / "bin" / "pip"), "install", "-qq", "--disable-pip-version-check",
         "--no-index", "--find-links", wheelhouse, wheel])
    return str(venv)


def first_command_main_job() -> list[str]:
    """The onnx-lsuv call at the end of README's first fresh-machine command."""
    first = readme_commands()[0]
    job = first.split("&&")[-1].strip()
    assert job.startswith("onnx-lsuv "), first
    return shlex.split(job)


def test_readme_first_command_on_the_sample(fresh_venv, tmp_path) -> None:
    """The installed console script initialises the sample: every layer's output variance in
    the written model, measured by this test's own ONNX Runtime session, is 1 within tol."""
    for name in ("fitnet_mnist_relu.onnx", "digits_batch.npy"):
        (tmp_path / "sample_models").mkdir(exist_ok=True)
        shutil.copy(os.path.join(ROOT, "sample_models", name), tmp_path / "sample_models")
    job = first_command_main_job()
    env = dict(os.environ, PATH=os.pathsep.join([os.path.join(fresh_venv, "bin"),
                                                 os.environ["PATH"]]))
    env.pop("PYTHONPATH", None)
    run(job, cwd=tmp_path, env=env)
    out = job[job.index("-o") + 1]
    model = onnx.load(str(tmp_path / out))
    batch = np.load(tmp_path / "sample_models" / "digits_batch.npy")
    names = target_outputs(model)
    assert len(names) == 7
    feeds = {model.graph.input[0].name: batch}
    variances = output_variances(model, feeds, names)
    assert all(abs(v - 1.0) < TOL for v in variances), dict(zip(names, variances))


def framework_example(framework: str):
    page = os.path.join(ROOT, "docs", "frameworks", f"{PAGES[framework]}.md")
    found = [ex for ex in examples_in(page) if ex.needs == framework and not ex.not_run]
    assert found, f"{page} has no runnable {framework} example"
    return found[0]


@pytest.fixture(scope="module")
def unpacked_wheel(tmp_path_factory, wheel) -> str:
    where = tmp_path_factory.mktemp("wheel")
    with zipfile.ZipFile(wheel) as whl:
        whl.extractall(where)
    return str(where)


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_one_docs_example_per_framework(framework, fresh_venv, wheelhouse, unpacked_wheel,
                                        tmp_path) -> None:
    ex = framework_example(framework)
    script = tmp_path / "example.py"
    script.write_text(ex.code)
    if framework == "torch":
        pip = os.path.join(fresh_venv, "bin", "pip")
        wheel_file = glob.glob(os.path.join(wheelhouse, "torch-*.whl"))
        if not wheel_file:
            pytest.skip("the wheelhouse has no torch (.ci/run downloads torch==2.13.0 into it)")
        version = re.match(r"torch-([^-]+)-", os.path.basename(wheel_file[0])).group(1)
        run([pip, "install", "-qq", "--disable-pip-version-check", "--no-index",
             "--find-links", wheelhouse, f"torch=={version}", "onnxscript"])
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = run([os.path.join(fresh_venv, "bin", "python"), str(script)], cwd=tmp_path,
                   env=env)
    else:
        python = framework_python(framework, FRAMEWORKS[framework])
        if python is None:
            pytest.skip(f"{framework} is not installed here (set ONNX_LSUV_"
                        f"{framework.upper()}_PYTHON, see .ci/exporter-venvs)")
        env = dict(external_env(), PYTHONPATH=unpacked_wheel)
        proc = run([python, "-c", "import onnx_lsuv, sys; print(onnx_lsuv.__file__)"],
                   cwd=tmp_path, env=env)
        assert proc.stdout.strip().startswith(unpacked_wheel), proc.stdout
        proc = run([python, str(script)], cwd=tmp_path, env=env)
    # the example prints the report's table: every layer converged, none left out
    assert "converged" in proc.stdout, proc.stdout[-3000:]
    assert "not_converged" not in proc.stdout and "NOT initialised" not in proc.stdout
