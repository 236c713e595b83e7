"""float16 and bfloat16 models: measured natively where ORT can, in float32 where it cannot,
written back in their own dtype."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from onnx_lsuv import lsuv_init

import models
from conftest import output_variances

BF16 = onnx.helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)


def cast_model(model, elem):
    """The test's own dtype conversion of a float32 test model (initializers and I/O)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    for t in m.graph.initializer:
        if t.data_type != elem:
            arr = numpy_helper.to_array(t).astype(np.float32).astype(np_dtype)
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
    for vi in list(m.graph.input) + list(m.graph.output):
        vi.type.tensor_type.elem_type = elem
    return m


@pytest.mark.parametrize("elem,kind", [(TensorProto.FLOAT16, "conv2d"),
                                       (TensorProto.FLOAT16, "gemm_transB1"),
                                       (TensorProto.BFLOAT16, "gemm_transB1"),
                                       (TensorProto.BFLOAT16, "matmul")])
def test_low_precision_weights_reach_unit_variance_in_their_own_dtype(elem, kind):
    model32, feeds, outputs = models.ALL[kind]()
    model = cast_model(model32, elem)
    result = lsuv_init(model, feeds, provider="cpu")
    types = {t.name: t.data_type for t in result.model.graph.initializer}
    assert all(v == elem for v in types.values())
    assert [i.type for i in result.model.graph.input] == [i.type for i in model.graph.input]
    # Measured here in float32 on the written weights (upcast), not with the code under test.
    back = cast_model(result.model, TensorProto.FLOAT)
    rounded = {k: v.astype(onnx.helper.tensor_dtype_to_np_dtype(elem)).astype(np.float32)
               for k, v in feeds.items()}
    for v in output_variances(back, rounded, outputs):
        assert abs(v - 1) < 0.1
    if elem == TensorProto.BFLOAT16:
        assert any("float32" in n for n in result.report.notes)
