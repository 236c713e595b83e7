"""Issue 28's experiment (experiments/transformer_study.py): the health statistics against a
forward pass written out by hand in float64, the standard library's split by file, the plan,
and ``run.py --study transformers --quick`` end to end. Skipped without torch."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from conftest import ROOT  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "experiments"))

import result_tables as tables  # noqa: E402
import transformer_study as study  # noqa: E402
from run import _plan_from_dict  # noqa: E402


def _off_defaults(module, seed=0):
    """Non-zero biases and LayerNorm statistics off 1 and 0, so a mix-up of weight and bias,
    or of one LayerNorm for another, shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, torch.nn.Linear):
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return module


def _by_hand(module, x, y):
    """The health statistics from a float64 forward written out here, not from hooks: every
    block's logits, branches and stream, from the module's parameters alone."""
    p = {k: v.detach().double() for k, v in module.state_dict().items()}

    def lin(name, h):
        return h @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    def ln(name, h):
        mu, var = h.mean(-1, keepdim=True), h.var(-1, correction=0, keepdim=True)
        return (h - mu) / torch.sqrt(var + 1e-5) * p[f"{name}.weight"] + p[f"{name}.bias"]

    def var(t):
        return float(t.var(correction=0))

    if isinstance(module, study.CharGPT):
        s = p["tok.weight"][x] + p["pos"][:, :x.shape[1]]
    else:
        n = x.shape[0]
        patches = x.double().reshape(n, 4, 2, 4, 2).transpose(2, 3).reshape(n, 16, 4)
        s = lin("embed", patches) + p["pos"]
        if isinstance(module, study.PostLNEncoder):
            s = ln("norm", s)
    out = {"logit_std": [], "attn_ratio": [], "mlp_ratio": [], "stream_var": var(s)}
    for i, block in enumerate(module.blocks):
        b = f"blocks.{i}"
        h = ln(f"{b}.norm1", s) if block.pre_ln else s
        n, t, d = h.shape
        q, k, v = (lin(f"{b}.{w}", h).reshape(n, t, 4, d // 4).transpose(1, 2) for w in "qkv")
        logits = q @ k.transpose(-2, -1) / math.sqrt(d // 4)
        allowed = torch.ones(t, t, dtype=torch.bool)
        if block.causal:
            allowed = allowed.tril()
        out["logit_std"].append(float(logits[..., allowed].std(correction=0)))
        att = torch.softmax(logits.masked_fill(~allowed, -math.inf), -1)
        branch = lin(f"{b}.proj", (att @ v).transpose(1, 2).reshape(n, t, d))
        out["attn_ratio"].append(var(branch) / var(s))
        s = s + branch if block.pre_ln else ln(f"{b}.norm1", s + branch)
        h = ln(f"{b}.norm2", s) if block.pre_ln else s
        branch = lin(f"{b}.fc2", torch.nn.functional.gelu(lin(f"{b}.fc1", h)))
        out["mlp_ratio"].append(var(branch) / var(s))
        s = s + branch if block.pre_ln else ln(f"{b}.norm2", s + branch)
    if isinstance(module, study.CharGPT):
        logits = lin("head", ln("norm", s))
    elif isinstance(module, study.PostLNEncoder):
        logits = lin("head", s.mean(1))
    else:
        logits = lin("head", ln("norm", s).mean(1))
    logits = logits.reshape(-1, logits.shape[-1])
    out["head_std"] = float(logits.std(correction=0))
    out["initial_loss"] = float(torch.nn.functional.cross_entropy(logits, y.reshape(-1)))
    return out


@pytest.mark.parametrize("arch", study.ARCHS)
def test_health_statistics_are_what_a_hand_written_forward_measures(arch):
    torch.manual_seed(3)
    module = _off_defaults(study.build(arch))
    g = torch.Generator().manual_seed(4)
    if arch == study.LM_ARCH:
        x = torch.randint(0, study.VOCAB_SIZE, (6, study.CONTEXT), generator=g)
        y = torch.randint(0, study.VOCAB_SIZE, (6, study.CONTEXT), generator=g)
    else:
        x, y = torch.randn(12, 8, 8, generator=g), torch.randint(0, 10, (12,), generator=g)
    got, want = study.health(module, x, y), _by_hand(module, x, y)
    assert set(got) == set(want)
    for key, value in want.items():
        assert np.allclose(got[key], value, rtol=1e-4), key
    assert len(got["logit_std"]) == 4


def test_a_causal_blocks_logit_std_leaves_the_masked_entries_out():
    torch.manual_seed(0)
    module = study.CharGPT()
    x = torch.randint(0, study.VOCAB_SIZE, (4, study.CONTEXT))
    stds = study.health(module, x, x)["logit_std"]
    assert all(math.isfinite(s) and 0 < s < 10 for s in stds)


def test_the_character_vocabulary_maps_everything_else_to_one_token():
    ids = study.encode("a\n~ \té")
    assert list(ids) == [study.VOCAB.index("a"), 0, study.VOCAB.index("~"),
                         study.VOCAB.index(" "), study.UNK, study.UNK]
    assert study.VOCAB_SIZE == 97 and len(set(study.VOCAB)) == 96


def test_the_stdlib_split_is_by_file_from_the_names_and_skips_installed_packages(tmp_path):
    for rel in ("a.py", "pkg/b.py", "pkg/c.txt", "site-packages/x.py", "d/dist-packages/y.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    assert study.stdlib_files(str(tmp_path)) == ["a.py", "pkg/b.py"]
    names = [f"m{i}.py" for i in range(200)]
    held = [n for n in names if study.is_validation(n)]
    assert 5 <= len(held) <= 40  # about 1 in VAL_EVERY, fixed by the names
    assert held == [n for n in names if study.is_validation(n)]


def test_the_lm_text_has_the_asked_characters_and_no_file_on_both_sides():
    data = study.stdlib_text(30_000, 5_000)
    assert data["chars"] == {"train": 30_000, "val": 5_000}
    assert len(data["train"]) == 30_000 and data["train"].max() < study.VOCAB_SIZE
    assert not set(data["train_files"]) & set(data["val_files"])
    assert all(study.is_validation(f) for f in data["val_files"])
    assert not any(study.is_validation(f) for f in data["train_files"])
    assert data["python"] == sys.version.split()[0]


def test_the_plan_round_trips_through_json_and_narrows():
    for plan in (study.FULL, study.QUICK):
        assert _plan_from_dict(json.loads(json.dumps(study.plan_dict(plan)))) == plan
    full = study.FULL.configs()
    assert len(full) == 3 * (5 + 3 + 3)
    assert {c.study for c in full} == {"transformers"}
    vit = study.FULL.narrowed(("vit_digits",), ("default", "transformer"))
    assert {(c.arch, c.init) for c in vit.configs()} == {("vit_digits", "default"),
                                                        ("vit_digits", "transformer")}
    assert len(study.FULL.with_seeds(2).configs()) == 3 * 3 * 2


def test_quick_study_writes_its_tables_curves_and_health(tmp_path):
    """The smoke test: run.py --study transformers --quick, and what it wrote."""
    out = tmp_path / "quick"
    run = [sys.executable, os.path.join(ROOT, "experiments", "run.py"), "--study",
           "transformers", "--quick", "--out", str(out)]
    proc = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    runs = data["runs"]
    assert len(runs) == len(study.QUICK.configs())
    assert data["meta"]["versions"]["onnx_lsuv_commit"]
    assert data["meta"]["lm_data"]["chars"]["train"] == study.TRAIN_CHARS
    for r in runs:
        arch, init = r["config"]["arch"], r["config"]["init"]
        budget = study.QUICK.budgets[arch]
        curve = r["val_loss"] if arch == study.LM_ARCH else r["test_acc"]
        assert len(curve) == len(r["train_loss"]) == len(r["epoch_s"]) == budget.epochs
        assert len(r["health"]["logit_std"]) == 4
        if init != "default":
            assert r["lsuv_converged"] and r["conversion_diff"] < 1e-5
            assert {layer["role"] for layer in r["lsuv_layers"]} >= {
                "q", "k", "v", "attn_out", "mlp_in", "mlp_out", "head"}
    # the policy changes what LSUV sets: the health at init differs between the policies
    for arch in study.ARCHS:
        paper, ours = (tables._study_runs(runs, arch, i)[0]["health"]
                       for i in ("paper", "transformer"))
        assert paper["logit_std"] != ours["logit_std"], arch
    text = (out / "RESULTS.md").read_text()
    plan = study.QUICK
    for arch in study.DIGITS_ARCHS:
        assert tables.table_transformer_digits(runs, arch, plan.inits, plan.threshold) in text
    assert tables.table_transformer_lm(runs, study.LM_ARCH, plan.inits,
                                       plan.lm_threshold) in text
    for arch in study.ARCHS:
        assert tables.table_health(runs, arch, plan.inits) in text
        png = (out / f"curves_{arch}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
    proc = subprocess.run(run + ["--tables-only"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "RESULTS.md").read_text() == text
