"""Loading and saving: external data, atomic writes, nothing left behind."""

import errno
import hashlib
import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnx_lsuv.model_io as model_io
import onnx_lsuv.outputs as outputs
from onnx_lsuv import OutputError, lsuv_init, save_model_atomic
from onnx_lsuv_cli.main import lsuv_command

import models
from conftest import output_variances


def digest(paths):
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def save_external(model, path):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".data", size_threshold=0)


def test_external_data_model_round_trips_through_the_cli(tmp_path):
    model, feeds, outputs = models.residual_block()
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    save_external(model, src)
    np.save(tmp_path / "x.npy", feeds["x"])
    before = digest([src, str(src) + ".data"])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    outs = []
    for name in ("a.onnx", "b.onnx"):
        res = CliRunner().invoke(lsuv_command, [str(src), "--data", str(tmp_path / "x.npy"),
                                                "-o", str(out_dir / name), "-q"])
        assert res.exit_code == 0, res.output
        outs.append(out_dir / name)
    assert digest([src, str(src) + ".data"]) == before  # inputs untouched
    for out in outs:
        assert os.path.exists(str(out) + ".data")
        raw = onnx.load(out, load_external_data=False)
        locations = {e.value for t in raw.graph.initializer for e in t.external_data
                     if e.key == "location"}
        assert locations == {out.name + ".data"}  # relative to the output
    # Same seed and inputs: byte-identical data files, and models that differ only in the
    # data file's name.
    assert digest([str(outs[0]) + ".data"]) == digest([str(outs[1]) + ".data"])
    a, b = (outs[0].read_bytes(), outs[1].read_bytes())
    assert a.replace(b"a.onnx.data", b"b.onnx.data") == b
    loaded = onnx.load(outs[0])
    for v in output_variances(loaded, feeds, outputs):
        assert abs(v - 1) < 0.1
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    model, feeds, _ = models.conv_chain()
    result = lsuv_init(model, feeds, provider="cpu")

    def broken(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.os, "fsync", broken)
    for external in (False, True):
        with pytest.raises(OutputError, match="o.onnx.*no space left"):
            save_model_atomic(result.model, tmp_path / "o.onnx", external_data=external)
        assert list(tmp_path.iterdir()) == []


def test_interrupt_during_save_leaves_nothing_behind(tmp_path, monkeypatch):
    model, feeds, _ = models.conv_chain()
    result = lsuv_init(model, feeds, provider="cpu")
    (tmp_path / "o.onnx").write_bytes(b"previous output")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_io.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_model_atomic(result.model, tmp_path / "o.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["o.onnx"]
    assert (tmp_path / "o.onnx").read_bytes() == b"previous output"


def test_truncated_model_file_is_a_clear_input_error(tmp_path):
    model, _, _ = models.residual_block()
    data = model.SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 3])
    from onnx_lsuv import InputError

    with pytest.raises(InputError):
        lsuv_init(str(path), np.zeros((2, 3, 8, 8), np.float32), provider="cpu")


@pytest.mark.slow
def test_model_over_2_gib_is_initialised_and_saved_with_external_data(tmp_path):
    from onnx import helper

    from conftest import make_model, rand

    rows = (2**31 // (16 * 4)) + 1024  # a 2 GiB + table: over protobuf's limit
    table = np.zeros((rows, 16), np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1),
             helper.make_node("Gather", ["table", "idx"], ["row"]),
             helper.make_node("Add", ["y", "row"], ["out"])]
    small = make_model(nodes, [("x", ["N", 16])], [("out", None)],
                       {"w": rand(16, 16, seed=1), "idx": np.array([0], np.int64),
                        "table": np.zeros((1, 16), np.float32)})
    small.graph.initializer[2].CopyFrom(onnx.numpy_helper.from_array(table, "table"))
    del table
    feeds = {"x": rand(32, 16, seed=2)}
    result = lsuv_init(small, feeds, provider="cpu")
    assert result.report.layers[0].status == "converged"
    written = save_model_atomic(result.model, tmp_path / "big.onnx")
    assert len(written) == 2 and os.path.getsize(written[1]) > 2**31
    back = onnx.load(written[0], load_external_data=False)
    assert back.graph.node[0].name == "fc"


def test_written_model_gets_ordinary_file_permissions(tmp_path):
    model, feeds, _ = models.conv_chain()
    save_model_atomic(lsuv_init(model, feeds, provider="cpu").model, tmp_path / "o.onnx")
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(tmp_path / "o.onnx").st_mode & 0o777 == 0o666 & ~mask
