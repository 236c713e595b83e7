"""Errors and the CLI's exit codes (the one place they are defined)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # a runtime failure: ONNX Runtime error, a layer that could not be processed
EXIT_BAD_INPUT = 2  # bad input or usage: missing or invalid model, data or option
EXIT_CHECK_FAILED = 3  # reserved for the check mode: a layer is off its target variance


class LSUVError(Exception):
    """Base class of the errors onnx-lsuv raises on purpose; ``exit_code`` is the CLI's."""

    exit_code = EXIT_FAILURE


class InputError(LSUVError, ValueError):
    """The model, the data or an option is not usable; the message says how to fix it."""

    exit_code = EXIT_BAD_INPUT


class ProviderError(LSUVError, RuntimeError):
    """The requested execution provider is not available."""

    exit_code = EXIT_BAD_INPUT


class RuntimeFailure(LSUVError, RuntimeError):
    """ONNX Runtime failed to build or run the model."""

    exit_code = EXIT_FAILURE
