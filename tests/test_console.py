"""The console (issue 29, item 5): a last summary line on every run, long tables shortened on
a terminal, the framework's module names, elapsed time in the progress, one JSON schema for
--json and --report, and --help at 80 columns listing every exit code."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import time

import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import helper

from onnx_lsuv_cli.main import Progress, lsuv_command

import models
from conftest import ROOT, cli, make_model, output_variances, rand, saved

EXE = shutil.which("onnx-lsuv")
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


# --- the summary line -------------------------------------------------------------------------

def test_a_run_ends_with_the_summary_line_counted_from_the_written_model(tmp_path):
    model, feeds, outputs = models.gemm_mlp(1)
    m, d = saved(tmp_path, model, feeds)
    res = cli(m, "--data", d, "-o", tmp_path / "o.onnx")
    assert res.exit_code == 0, res.output
    last = res.output.rstrip("\n").splitlines()[-1]
    found = re.fullmatch(r"(\d+)/(\d+) layers on target, [\d.]+ s on cpu, wrote (.+)", last)
    assert found, last
    on = sum(abs(v - 1) < 0.1 for v in output_variances(onnx.load(tmp_path / "o.onnx"),
                                                         feeds, outputs))
    assert (int(found[1]), int(found[2])) == (on, 3) and found[3].endswith("o.onnx")


@pytest.mark.parametrize("case,pattern,code", [
    ("check", r"0/3 layers on target, [\d.]+ s on cpu, checked .*m.onnx, nothing written "
              r"\(exit 3: check failed\)", 3),
    ("bad", r"stopped after [\d.]+ s, nothing written \(exit 2: bad input or usage\)", 2),
    ("baseline", r"3 layers initialised \(xavier, no data pass\), [\d.]+ s, wrote .*o.onnx", 0),
    ("excluded", r"0/0 layers on target, 3 left alone, [\d.]+ s.*, wrote .*o.onnx", 0),
])
def test_every_run_ends_with_a_summary_line_saying_what_happened(tmp_path, case, pattern,
                                                                  code):
    model, feeds, _ = models.gemm_mlp(1)
    m, d = saved(tmp_path, model, feeds)
    args = {"check": [m, "-d", d, "--check", "--target-var", "5"],
            "bad": [m, "-d", d, "-o", tmp_path / "o.onnx", "--tol", "-1"],
            "baseline": [m, "-o", tmp_path / "o.onnx", "--init", "xavier"],
            "excluded": [m, "-d", d, "-o", tmp_path / "o.onnx", "--exclude", "*"]}[case]
    res = cli(*args)
    assert res.exit_code == code, res.output
    assert re.fullmatch(pattern, res.output.rstrip("\n").splitlines()[-1]), res.output


# --- long tables on a terminal ----------------------------------------------------------------

def _deep_mlp(n: int = 60):
    nodes, inits, x = [], {}, "x"
    for k in range(n):
        nodes += [helper.make_node("Gemm", [x, f"w{k}", f"b{k}"], [f"y{k}"], name=f"fc{k}",
                                   transB=1),
                  helper.make_node("Tanh", [f"y{k}"], [f"t{k}"])]
        inits[f"w{k}"] = rand(8, 8, seed=k + 1)
        inits[f"b{k}"] = rand(8, seed=100 + k) * 0.1
        x = f"t{k}"
    return make_model(nodes, [("x", ["N", 8])], [(x, None)], inits), {"x": rand(32, 8, seed=0)}


def _on_a_terminal(args: list[str]) -> tuple[int, str]:
    """Run the installed command with stderr on a pseudo-terminal; (exit code, stderr)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([EXE, *args], stderr=slave, stdout=subprocess.DEVNULL, env=ENV)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(), out.decode()


@pytest.mark.skipif(EXE is None, reason="onnx-lsuv is not installed")
def test_a_long_table_is_shortened_on_a_terminal_and_says_how_to_see_every_row(tmp_path):
    model, feeds = _deep_mlp()
    m, d = saved(tmp_path, model, feeds)
    code, err = _on_a_terminal([str(m), "-d", str(d), "-o", str(tmp_path / "o.onnx"),
                                "--provider", "cpu"])
    assert code == 0, err
    rows = [x for x in err.splitlines() if re.match(r"\s*\d+\s+fc\d+\s", x)]
    assert 20 <= len(rows) <= 40, err
    hidden = re.search(r"(\d+) of 60 rows hidden, every one on target: -v shows every row", err)
    assert hidden and int(hidden[1]) == 60 - len(rows), err
    code, err = _on_a_terminal([str(m), "-d", str(d), "-o", str(tmp_path / "v.onnx"),
                                "--provider", "cpu", "-v"])
    assert code == 0
    assert len([x for x in err.splitlines() if re.match(r"\s*\d+\s+fc\d+\s", x)]) == 60
    assert "hidden" not in err
    res = cli(m, "-d", d, "-o", tmp_path / "p.onnx")  # not a terminal: every row
    assert len([x for x in res.output.splitlines() if re.match(r"\s*\d+\s+fc\d+\s", x)]) == 60


# --- the framework's module names -------------------------------------------------------------

class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1 = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
        self.fc = torch.nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(self.layer1(x).flatten(1))


def test_the_torch_front_end_names_each_layer_by_its_module_beside_the_onnx_node():
    from onnx_lsuv.frameworks.torch import lsuv_module

    torch.manual_seed(0)
    net = _Net()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = lsuv_module(net, torch.randn(32, 3, 8, 8))
    changed = {k.rsplit(".", 1)[0] for k, v in net.state_dict().items()
               if not torch.equal(before[k], v) and k.endswith("weight")}
    assert {r.module for r in result.report.layers} == changed == {"layer1.0", "fc"}
    table = result.report.table()
    assert table.splitlines()[0].split()[:3] == ["#", "node", "module"]
    for rec in result.report.layers:
        assert re.search(rf"{re.escape(rec.name)}\s+{re.escape(rec.module)}\s+{rec.op}", table)


# --- progress: elapsed time -------------------------------------------------------------------

def test_progress_shows_the_elapsed_time_while_a_long_step_runs(capsys):
    progress = Progress(tty=True)
    progress.TICK = 0.05
    progress("scaling", 0, 3, "one forward pass for every layer")
    err, deadline = "", time.monotonic() + 20  # the one-pass solve: no call until it is done
    while time.monotonic() < deadline:  # (on a loaded machine the ticks may come late)
        time.sleep(0.1)
        err += capsys.readouterr().err
        ticks = re.findall(r"0/3\s+([\d.]+) s", err)
        if len(ticks) >= 3 and float(ticks[-1]) >= 0.3:
            break
    progress("scaling", 3, 3, "")
    progress.close()
    err += capsys.readouterr().err
    seconds = [float(x) for x in re.findall(r"0/3\s+([\d.]+) s", err)]
    assert len(seconds) >= 3 and seconds[-1] >= 0.3 and seconds == sorted(seconds)
    plain = Progress(tty=False)
    plain("init", 2, 2, "w")
    plain("scaling", 3, 3, "")
    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"pre-init: 2/2 weights \([\d.]+ s\)", lines[0])
    assert re.fullmatch(r"scaling: 3/3 \([\d.]+ s\)", lines[1])


# --- one JSON schema --------------------------------------------------------------------------

def test_json_and_report_use_the_same_field_names_and_meanings(tmp_path):
    model, feeds, _ = models.gemm_mlp(1)
    m, d = saved(tmp_path, model, feeds)
    res = CliRunner().invoke(
        lsuv_command, [str(m), "-d", str(d), "-o", str(tmp_path / "o.onnx"), "--json",
                       "--report", str(tmp_path / "r.json"), "--provider", "cpu"])
    assert res.exit_code == 0, res.stderr
    printed = json.loads(res.stdout)
    written = json.loads((tmp_path / "r.json").read_text())
    assert printed == written
    for doc in (printed, written):
        assert isinstance(doc["layers"], list) and doc["n_layers"] == len(doc["layers"]) == 3
        assert doc["ok"] is doc["converged"] is True
        assert doc["n_by_status"]["converged"] == sum(r["status"] == "converged"
                                                      for r in doc["layers"])


# --- --help -----------------------------------------------------------------------------------

@pytest.mark.skipif(EXE is None, reason="onnx-lsuv is not installed")
def test_help_reads_well_at_80_columns_and_lists_every_exit_code():
    def helped(columns: int) -> str:
        env = dict(ENV, COLUMNS=str(columns))
        return subprocess.run([EXE, "--help"], capture_output=True, text=True, env=env,
                              check=True).stdout

    narrow, wide = helped(80), helped(1000)
    assert max(len(x) for x in narrow.splitlines()) <= 80
    # no word cut in two: every word at 80 columns is a word of the unwrapped help
    assert set(narrow.split()) <= set(wide.split())
    codes = narrow[narrow.index("Exit codes:"):].splitlines()[1:]
    listed = {int(x.split()[0]) for x in codes if re.match(r"\s+\d+\s{2,}\S", x)}
    assert listed == {0, 1, 2, 3, 130, 143}
