"""The only module that touches ONNX Runtime: providers, sessions, runs."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from .errors import ProviderError, RuntimeFailure
from .model_io import PACKED_4BIT, raw_bytes
from .options import PROVIDERS
from .orthonormal import default_workers

log = logging.getLogger("onnx_lsuv")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# A measuring run happens once: cuDNN's exhaustive algorithm search (the default) costs more than
# it saves there.
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}
NO_DRIVER = "no NVIDIA driver found"
NO_CUDA_BUILD = "this onnxruntime build ({}) has no CUDA provider"
# From this many nodes on, a measuring session plans no reuse of memory between tensors: ONNX
# Runtime's reuse planning grows with the square of the nodes (an unrolled decoder, one
# thread: 1,067 nodes 0.06 s, 2,107 nodes 0.19 s, 4,189 nodes 0.67 s, 6,271 nodes 1.5 s;
# without it 0.03, 0.07, 0.18, 0.40 s, the same forward), and a session runs once or a few
# times. Each tensor is still freed after its last reader; models of fewer nodes (CNNs, whose
# big activations gain most from reuse) keep it.
MEM_REUSE_MAX_NODES = 2000
# numpy's first number for a dtype it does not define itself: ml_dtypes' bfloat16, float8 and
# int4 types, which ONNX Runtime's numpy conversion refuses ("Numpy_type 256 can't be converted").
NPY_USERDEF = 256


def _cuda_driver_present() -> bool:
    """Whether an NVIDIA driver library can be loaded (no GPU, no driver: skip the CUDA probe)."""
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
    found = ctypes.util.find_library("cuda")
    if found:
        names.append(found)
    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def _session_options(threads: int | None, nodes: int = 0) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.enable_mem_reuse = nodes < MEM_REUSE_MAX_NODES
    so.intra_op_num_threads = threads or default_workers()
    so.inter_op_num_threads = 1
    # Fatal only: every ONNX Runtime error reaches the user once, in our message.
    so.log_severity_level = 4
    # Each session here runs once or a few times: the arena's growth on a first run cost more
    # than plain allocations (measured: stats pass 1.0-1.3 s without, 1.2-2.0 s with it).
    so.enable_cpu_mem_arena = False
    # Nor is a prepacked copy of each constant MatMul/Gemm weight worth its memory for a run or
    # two: the kernels pack per run instead.
    so.add_session_config_entry("session.disable_prepacking", "1")
    return so


class Engine:
    """Creates sessions on one resolved execution provider.

    Args:
        provider: "cpu", "cuda" or "auto" (CUDA when it works, else the CPU with one line
            saying so). Defaults to "auto".
        threads: CPU threads per session. Defaults to the CPUs this process may use.

    Raises:
        ProviderError: "cuda" was asked for and CUDA cannot be used here.
    """

    def __init__(self, provider: str = "auto", threads: int | None = None) -> None:
        if provider not in PROVIDERS:
            raise ProviderError(f"unknown provider {provider!r}; choose one of {PROVIDERS}")
        self.threads = threads
        if provider == "cpu":
            self.providers: list = [CPU]
        else:
            reason = self._cuda_unavailable_reason()
            if reason is None:
                self.providers = [(CUDA, dict(CUDA_OPTIONS)), CPU]
            elif provider == "cuda":
                raise ProviderError(f"the CUDA provider is not available: {reason}")
            else:
                # No NVIDIA driver or no CUDA build: the CPU is expected, said only with -v. A
                # driver whose CUDA fails is a surprise: said loudly.
                quiet = reason in (NO_DRIVER, NO_CUDA_BUILD.format(ort.__version__))
                (log.debug if quiet else log.warning)(
                    "CUDA not available (%s); using the CPU provider", reason)
                self.providers = [CPU]
        self.name = "cuda" if self.providers[0] != CPU else "cpu"

    def _cuda_unavailable_reason(self) -> str | None:
        if CUDA not in ort.get_available_providers():
            return NO_CUDA_BUILD.format(ort.__version__)
        if not _cuda_driver_present():
            return NO_DRIVER
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            try:
                preload()
            except Exception as err:  # missing pip CUDA packages: the probe below decides
                log.debug("onnxruntime.preload_dlls failed: %s", err)
        probe = _probe_model()
        try:
            sess = ort.InferenceSession(
                probe.SerializeToString(), _session_options(1),
                providers=[(CUDA, dict(CUDA_OPTIONS)), CPU],
            )
        except Exception as err:
            return f"creating a CUDA session failed: {err}"
        if sess.get_providers()[0] != CUDA:
            return "onnxruntime could not load the CUDA libraries (CUDA 12/13, cuDNN 9)"
        return None

    def session(self, model: onnx.ModelProto | bytes,
                initializers: dict[str, np.ndarray] | None = None,
                fed: dict[str, np.ndarray] | None = None) -> Session:
        """An inference session for ``model`` on this engine's provider.

        Args:
            model: The model, or its serialised bytes.
            initializers: Values for the model's initializers that are external placeholders
                (see ``WeightState.skeleton``); handed to ONNX Runtime as OrtValues, which
                skips serialising and parsing them (ONNX Runtime copies them). Defaults to none.
            fed: Values for graph inputs that stand for constants, added to every run's feeds
                (read in place, never copied). Defaults to none.
        """
        data = model if isinstance(model, bytes) else model.SerializeToString()
        nodes = 0 if isinstance(model, bytes) else len(model.graph.node)
        so = _session_options(self.threads, nodes)
        values = []
        try:
            if initializers:
                values = [ort_value(a) for a in initializers.values()]
                so.add_external_initializers(list(initializers), values)
            fed = {name: feedable(a) for name, a in (fed or {}).items()}
            sess = ort.InferenceSession(data, so, providers=self.providers)
        except Exception as err:
            raise RuntimeFailure(f"ONNX Runtime could not load the model: {err}") from err
        if self.name == "cuda" and sess.get_providers()[0] != CUDA:
            raise RuntimeFailure("ONNX Runtime silently fell back from CUDA to the CPU")
        return Session(sess, [so, *values], fed)


def ort_value(array: np.ndarray) -> ort.OrtValue:
    """``array`` as an OrtValue on the CPU, whatever its dtype: numpy's own as it is (read in
    place), and ml_dtypes' bfloat16, float8 and int4 (which ONNX Runtime's numpy conversion
    refuses) by their ONNX type, from their bytes; 4-bit types packed two to a byte, as ONNX
    Runtime holds them."""
    if not array.flags.c_contiguous:  # (np.ascontiguousarray would make a scalar 1-D)
        array = np.array(array, order="C")
    if array.dtype.num < NPY_USERDEF:
        return ort.OrtValue.ortvalue_from_numpy(array)
    elem = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    if elem not in PACKED_4BIT:  # one element per item, the same size in both
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, elem)
    packed = np.frombuffer(raw_bytes(array, elem), np.uint8)
    value = ort.OrtValue.ortvalue_from_shape_and_type(list(array.shape), elem)
    if value.tensor_size_in_bytes() != packed.nbytes:
        raise RuntimeFailure(f"ONNX Runtime holds a {array.dtype} tensor of shape "
                             f"{list(array.shape)} in {value.tensor_size_in_bytes()} bytes, "
                             f"not the {packed.nbytes} of its packed form")
    ctypes.memmove(value.data_ptr(), packed.ctypes.data, packed.nbytes)
    return value


def feedable(array: np.ndarray | ort.OrtValue) -> np.ndarray | ort.OrtValue:
    """A value ``InferenceSession.run`` takes: a numpy array of one of numpy's own dtypes as it
    is, anything else (bfloat16, float8, int4) as an OrtValue."""
    if isinstance(array, np.ndarray) and array.dtype.num >= NPY_USERDEF:
        return ort_value(array)
    return array


@dataclass
class Session:
    """An ONNX Runtime session, what must outlive it (the OrtValues of its initializers), and
    the constants it takes as inputs."""

    ort_session: ort.InferenceSession
    keep: list = field(default_factory=list, repr=False)
    fed: dict[str, np.ndarray | ort.OrtValue] = field(default_factory=dict, repr=False)

    def _feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray | ort.OrtValue]:
        return {**{k: feedable(v) for k, v in feeds.items()}, **self.fed}

    def run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        """Fetch ``outputs``; ONNX Runtime errors become RuntimeFailure."""
        try:
            return self.ort_session.run(list(outputs), self._feeds(feeds))
        except Exception as err:
            raise RuntimeFailure(f"ONNX Runtime failed to run the model: {err}") from err

    def check(self, feeds: dict[str, np.ndarray]) -> None:
        """Run the whole model on ``feeds``, its outputs left as OrtValues (a bfloat16 output
        has no numpy type): a probe that a model runs proves it by running."""
        values = {k: v if isinstance(v, ort.OrtValue) else ort_value(v)
                  for k, v in self._feeds(feeds).items()}
        try:
            self.ort_session.run_with_ort_values(
                [o.name for o in self.ort_session.get_outputs()], values)
        except Exception as err:
            raise RuntimeFailure(f"ONNX Runtime failed to run the model: {err}") from err


def _probe_model() -> onnx.ModelProto:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)],
                                  ir_version=7)
