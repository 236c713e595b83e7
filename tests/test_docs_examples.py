"""Every example in README.md and docs/ runs, so none can rot (issue 29).

Each ```python, ```bash and ```console block of README.md and docs/**/*.md runs in its own copy
of one prepared directory: ``model.onnx``, ``batch.npy`` and ``ci_batch.npy`` (the bundled
sample and its digits batch), ``params.npz`` (the sample's initializers, standing for a
framework's parameters) and ``sample_models/`` (the sample under its own names). Python
blocks run in this interpreter, each in fresh globals; shell blocks run in bash with ``-e``
(a console block: its ``$ `` lines), with this interpreter's onnx-lsuv first on PATH. A block
passes when it exits 0 (a Python block: raises nothing).

An HTML comment on the line before a block (invisible on the rendered page) changes that:

    <!-- example: needs FRAMEWORK -->   torch: run here, skipped without torch; keras, flax,
                                        paddle: run in the framework's own interpreter, the
                                        one tests/test_frameworks.py uses (ONNX_LSUV_*_PYTHON,
                                        see .ci/exporter-venvs), skipped without it
    <!-- example: not-run (REASON) -->  never run: it downloads, installs, needs a GPU or runs
                                        for minutes; the reason is required

docs/development.md documents the same rules for the people who write the docs.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import ROOT, framework_python

SAMPLE = os.path.join(ROOT, "sample_models", "fitnet_mnist_relu.onnx")
BATCH = os.path.join(ROOT, "sample_models", "digits_batch.npy")
RUN_LANGS = {"python", "bash", "console"}
FRAMEWORKS = {"torch": ("torch",), "keras": ("keras", "tensorflow", "tf2onnx"),
              "flax": ("flax", "jax", "jax2onnx"), "paddle": ("paddle", "paddle2onnx")}
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*example:\s*(.*?)\s*-->$")
NEEDS = re.compile(r"^needs\s+(\w+)$")
NOT_RUN = re.compile(r"^not-run\s+\((.+)\)$")
TIMEOUT_S = 600


@dataclass(frozen=True)
class Example:
    source: str  # path relative to the repository, and the line of the opening fence
    line: int
    lang: str
    code: str
    needs: str | None = None
    not_run: str | None = None

    @property
    def id(self) -> str:
        return f"{self.source}:{self.line}"


def doc_files() -> list[str]:
    """README.md and every page of the docs site."""
    pages = sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
    return [os.path.join(ROOT, "README.md"), *pages]


def parse_marker(text: str, where: str) -> dict[str, str]:
    """The marker's meaning; anything else in an ``example:`` comment is an error, so a typo
    cannot silently turn a check off."""
    needs, not_run = NEEDS.match(text), NOT_RUN.match(text)
    if needs and needs.group(1) in FRAMEWORKS:
        return {"needs": needs.group(1)}
    if not_run and not_run.group(1).strip():
        return {"not_run": not_run.group(1).strip()}
    raise ValueError(f"{where}: unknown example marker {text!r}; expected 'needs "
                     f"{'|'.join(FRAMEWORKS)}' or 'not-run (REASON)'")


def examples_in(path: str) -> list[Example]:
    """The fenced blocks of one Markdown file in the languages that run, with their markers."""
    rel = os.path.relpath(path, ROOT)
    lines = open(path, encoding="utf-8").read().split("\n")
    found, i, previous = [], 0, ""
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening or not opening.group(2):
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        indent, lang, start = opening.group(1), opening.group(2), i + 1
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        if i == len(lines):
            raise ValueError(f"{rel}:{start}: unclosed code block")
        code = textwrap.dedent("\n".join(lines[start:i])) if indent else "\n".join(lines[start:i])
        marker = MARKER.match(previous)
        meaning = parse_marker(marker.group(1), f"{rel}:{start}") if marker else {}
        if lang in RUN_LANGS:
            found.append(Example(rel, start, lang, code + "\n", **meaning))
        elif marker:
            raise ValueError(f"{rel}:{start}: an example marker on a {lang!r} block, which "
                             "never runs")
        previous, i = "", i + 1
    return found


def all_examples() -> list[Example]:
    return [ex for path in doc_files() for ex in examples_in(path)]


EXAMPLES = all_examples()


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> str:
    """The directory every example starts from (copied per example)."""
    root = tmp_path_factory.mktemp("docs-examples")
    shutil.copy(SAMPLE, root / "model.onnx")
    shutil.copy(BATCH, root / "batch.npy")
    shutil.copy(BATCH, root / "ci_batch.npy")
    (root / "sample_models").mkdir()
    shutil.copy(SAMPLE, root / "sample_models")
    shutil.copy(BATCH, root / "sample_models")
    model = onnx.load(SAMPLE)  # the sample's own weights stand for a framework's parameters
    np.savez(root / "params.npz", **{t.name: numpy_helper.to_array(t)
                                     for t in model.graph.initializer})
    return str(root)


def workdir(template: str, tmp_path) -> str:
    here = os.path.join(str(tmp_path), "work")
    shutil.copytree(template, here)
    return here


def shell_path(tmp_path) -> str:
    """PATH with this interpreter's onnx-lsuv first: its console script where it is installed
    beside the interpreter, else a wrapper around ``python -m onnx_lsuv``."""
    bindir = os.path.dirname(sys.executable)
    if not os.path.exists(os.path.join(bindir, "onnx-lsuv")):
        bindir = os.path.join(str(tmp_path), "bin")
        os.makedirs(bindir, exist_ok=True)
        wrapper = os.path.join(bindir, "onnx-lsuv")
        with open(wrapper, "w") as f:
            f.write(f'#!/bin/sh\nexec "{sys.executable}" -m onnx_lsuv "$@"\n')
        os.chmod(wrapper, 0o755)
    return os.pathsep.join([bindir, os.environ.get("PATH", "")])


def shell_code(ex: Example) -> str:
    if ex.lang == "console":
        commands = [ln[2:] for ln in ex.code.splitlines() if ln.startswith("$ ")]
        assert commands, f"{ex.id}: a console block without '$ ' lines"
        return "\n".join(commands) + "\n"
    return ex.code


def run_shell(ex: Example, cwd: str, tmp_path) -> None:
    env = dict(os.environ, PATH=shell_path(tmp_path))
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", shell_code(ex)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, (f"{ex.id} exited {proc.returncode}:\n{ex.code}\n"
                                  f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def run_python_here(ex: Example, cwd: str, monkeypatch) -> None:
    monkeypatch.chdir(cwd)
    code = compile(ex.code, ex.id, "exec")
    exec(code, {"__name__": "__main__"})


def external_env() -> dict[str, str]:
    """The environment tests/test_frameworks.py gives a framework's interpreter."""
    return dict(os.environ, PYTHONPATH=ROOT, POLYGRAPHY_AUTOINSTALL_DEPS="0",
                TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def external_runs(request, template, tmp_path_factory):
    """The selected examples that need Keras, Flax or Paddle, each started in its own
    interpreter and directory as soon as the first example test runs: they spend most of
    their time importing and exporting, so they overlap with each other and with the rest."""
    selected = {item.callspec.params["ex"].id for item in request.session.items
                if hasattr(item, "callspec") and "ex" in item.callspec.params}
    started: dict[str, subprocess.Popen | None] = {}
    for ex in EXAMPLES:
        if ex.needs in (None, "torch") or ex.not_run or ex.id not in selected:
            continue
        python = framework_python(ex.needs, FRAMEWORKS[ex.needs])
        if python is None:
            started[ex.id] = None
            continue
        cwd = workdir(template, tmp_path_factory.mktemp("external"))
        started[ex.id] = subprocess.Popen([python, "-c", ex.code], cwd=cwd, env=external_env(),
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True)

    def result(ex: Example) -> tuple[int, str] | None:
        proc = started[ex.id]
        if proc is None:
            return None
        out, _ = proc.communicate(timeout=TIMEOUT_S)
        return proc.returncode, out

    yield result
    for proc in started.values():
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


PASSED: dict[tuple, str] = {}  # an example run here that passed: the same code elsewhere
                               # (README and a page showing one example) is not run twice


@pytest.mark.parametrize("ex", EXAMPLES, ids=[ex.id for ex in EXAMPLES])
def test_example_runs(ex: Example, template, tmp_path, monkeypatch, external_runs) -> None:
    key = (ex.lang, ex.needs, ex.code)
    if ex.not_run:
        pytest.skip(f"not run: {ex.not_run}")
    if ex.needs == "torch" and importlib.util.find_spec("torch") is None:
        pytest.skip("needs torch, which is not installed here")
    if ex.needs in (None, "torch"):
        if key in PASSED:
            return  # the same code passed as PASSED[key]
        cwd = workdir(template, tmp_path)
        if ex.lang == "python":
            run_python_here(ex, cwd, monkeypatch)
        else:
            run_shell(ex, cwd, tmp_path)
        PASSED[key] = ex.id
        return
    assert ex.lang == "python", f"{ex.id}: a framework's example must be Python"
    outcome = external_runs(ex)
    if outcome is None:
        pytest.skip(f"needs {ex.needs}, which is not installed here (set "
                    f"ONNX_LSUV_{ex.needs.upper()}_PYTHON, see .ci/exporter-venvs)")
    code, out = outcome
    assert code == 0, f"{ex.id} exited {code} in the {ex.needs} interpreter:\n{out[-4000:]}"


def test_every_page_is_searched_and_examples_are_found() -> None:
    """The collection itself: README and the pages hold examples of each kind that runs,
    and every framework page has its framework's example."""
    sources = {ex.source for ex in EXAMPLES}
    assert "README.md" in sources and "docs/getting-started.md" in sources
    assert {ex.lang for ex in EXAMPLES} >= {"python", "bash"}
    for framework in FRAMEWORKS:
        page = f"docs/frameworks/{'pytorch' if framework == 'torch' else framework}.md"
        assert any(ex.source == page and ex.needs == framework for ex in EXAMPLES), page


def test_markers_are_checked(tmp_path) -> None:
    """A misspelt marker, a not-run without a reason, or a marker on a block that never runs
    is an error, not a silently skipped example."""
    for bad in ("<!-- example: need torch -->", "<!-- example: not-run -->",
                "<!-- example: needs jax -->"):
        page = tmp_path / "page.md"
        page.write_text(f"{bad}\n```python\nprint(1)\n```\n")
        with pytest.raises(ValueError, match="unknown example marker"):
            examples_in(str(page))
    page = tmp_path / "page.md"
    page.write_text("<!-- example: needs torch -->\n```yaml\na: 1\n```\n")
    with pytest.raises(ValueError, match="never runs"):
        examples_in(str(page))
    page.write_text("<!-- example: not-run (downloads) -->\n```bash\nexit 1\n```\n\n"
                    "```console\n$ echo hi\nhi\n```\n")
    found = examples_in(str(page))
    assert [(ex.lang, ex.not_run) for ex in found] == [("bash", "downloads"), ("console", None)]
    assert shell_code(found[1]) == "echo hi\n"


def readme_commands() -> list[str]:
    """The shell commands of README.md's fresh-machine section, in order."""
    return [ex.code.strip() for ex in examples_in(os.path.join(ROOT, "README.md"))
            if ex.lang == "bash" and ex.code.startswith("python3 -m venv")]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    """.ci/run's contract: it runs README's test command as README gives it."""
    commands = readme_commands()
    assert len(commands) == 2 and "pytest" in commands[1], commands
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert commands[1] in ci.splitlines()


def test_readme_links_point_into_the_repository() -> None:
    """Every relative link of README.md names a file of this repository (none outside it)."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    links = [t.split("#")[0] for t in re.findall(r"\]\(([^)]+)\)", text)
             if not re.match(r"[a-z]+://", t) and not t.startswith("#")]
    assert links
    for link in links:
        path = os.path.normpath(os.path.join(ROOT, link))
        assert path.startswith(ROOT + os.sep) and os.path.exists(path), link
