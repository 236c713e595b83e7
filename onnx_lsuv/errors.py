"""Errors and the CLI's exit codes (the one place they are defined)."""

from __future__ import annotations

EXIT_FAILURE = 1  # a layer not on target (the model is written), or a failure of our own rewrites
# (ONNX Runtime failing on a measuring copy, nothing written)
EXIT_BAD_INPUT = 2  # bad input or usage: missing or invalid model, data or option
EXIT_CHECK_FAILED = 3  # check mode: a layer is off its target variance (degenerate ones too)
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT): the shell's 128 + 2; temporary files removed
EXIT_TERMINATED = 143  # SIGTERM (a timeout, CI cancellation, docker stop): 128 + 15


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
    """ONNX Runtime failed to build or run one of onnx-lsuv's measuring copies of the model
    (when it refuses the user's own model, that is an InputError)."""

    exit_code = EXIT_FAILURE


class OutputError(LSUVError, OSError):
    """An output file could not be written (disk full, file too big, ...): nothing was
    written; the message names the file."""

    exit_code = EXIT_FAILURE
