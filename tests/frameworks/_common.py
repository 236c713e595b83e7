"""What the framework checks share: the tests' own counting of the changed tensors and ONNX
Runtime's output on the initialised model. numpy, onnx and onnxruntime only (each check runs
in its framework's own interpreter)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def changed_tensors(before: onnx.ModelProto, after: onnx.ModelProto) -> list[str]:
    old, new = constants(before), constants(after)
    return sorted(n for n in new if n in old and not np.array_equal(old[n], new[n]))


def ort_output(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def var(a) -> float:
    return float(np.var(np.asarray(a, dtype=np.float64)))


def summary(result, x: np.ndarray, framework_out, variances: dict, moved: list[str]) -> dict:
    """The facts a test asserts on, measured here, beside what the call says it did."""
    return {
        "variances": variances,
        "converged": bool(result.report.converged),
        "changed": changed_tensors(result.exported, result.model),
        "match": result.match.to_dict(),
        "written": sorted(result.params),
        "moved": sorted(moved),
        "out_diff": float(np.abs(np.asarray(framework_out, np.float64)
                                 - ort_output(result.model, x)).max()),
        "out_scale": float(np.abs(np.asarray(framework_out)).max()),
        "ops": sorted({n.op_type for n in result.exported.graph.node}),
    }


def write(path: str, facts: dict) -> None:
    with open(path, "w") as f:
        json.dump(facts, f, indent=1)


def fixed_facts(result, fixed: dict, now: dict) -> dict:
    """For each fixed framework tensor (name -> its value before the call): whether it is
    bit for bit the same in the framework after (``now``), the ONNX constants of the export
    that hold its values (in any layout: the same sorted values), and whether each of those
    is bit for bit the same in the initialised model; and the report's left-alone reasons."""
    before, after = constants(result.exported), constants(result.model)
    facts = {}
    for name, value in fixed.items():
        value = np.asarray(value)
        key = np.sort(value, axis=None)
        holders = sorted(n for n, v in before.items() if v.size == value.size
                         and v.dtype == value.dtype and np.array_equal(np.sort(v, axis=None), key))
        facts[name] = {"framework_same": bool(np.array_equal(np.asarray(now[name]), value)),
                       "onnx": holders,
                       "onnx_same": all(n in after and np.array_equal(after[n], before[n])
                                        for n in holders)}
    return {"fixed": facts, "left_alone": [s["reason"] for s in result.report.left_alone],
            "not_initialised": len(result.report.not_initialised),
            "layers": [r.name for r in result.report.layers]}


def raised(call) -> dict:
    """What ``call()`` raised: its type, whether it is onnx_lsuv's InputError, its message
    ({"type": None} if it returned)."""
    from onnx_lsuv import InputError

    try:
        call()
    except Exception as err:
        return {"type": type(err).__name__, "input_error": isinstance(err, InputError),
                "message": str(err)}
    return {"type": None}


def same(before: dict, after: dict) -> bool:
    """Every array bit for bit the same (the same names, shapes, dtypes and bytes)."""
    return before.keys() == after.keys() and all(
        np.asarray(before[k]).dtype == np.asarray(after[k]).dtype
        and np.array_equal(before[k], after[k]) for k in before)
