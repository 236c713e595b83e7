"""onnx-lsuv: LSUV (layer-sequential unit-variance) initialisation for ONNX models.

Mishkin & Matas, "All you need is a good init", ICLR 2016 (arXiv:1511.06422).
"""

__version__ = "0.1.0"

from .errors import InputError, LSUVError, OutputError, ProviderError, RuntimeFailure  # noqa: E402
from .lsuv import LSUVResult, check_variances, lsuv_init  # noqa: E402
from .options import LSUVOptions  # noqa: E402
from .outputs import save_model_atomic  # noqa: E402
from .report import LayerRecord, Report  # noqa: E402

__all__ = [
    "__version__",
    "lsuv_init",
    "check_variances",
    "LSUVResult",
    "LSUVOptions",
    "Report",
    "LayerRecord",
    "save_model_atomic",
    "LSUVError",
    "InputError",
    "OutputError",
    "ProviderError",
    "RuntimeFailure",
]
