"""``onnx-lsuv MODEL --data BATCH -o OUT``: parses options, calls the library, prints."""

from __future__ import annotations

import json
import logging
import os
import sys

import click
import numpy as np

import onnx_lsuv
from onnx_lsuv.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_FAILURE, InputError, LSUVError
from onnx_lsuv.model_io import (
    check_output_path,
    external_data_files,
    save_model_atomic,
    uses_external_data,
)

EPILOG = f"""\b
Examples:
  onnx-lsuv model.onnx --data batch.npy -o init.onnx
  onnx-lsuv model.onnx --data inputs.npz -o init.onnx --report report.json --plot layers.png
  onnx-lsuv model.onnx --data b1.npy --data b2.npy -o init.onnx --save-weights init.npz
  onnx-lsuv init.onnx --data batch.npy --check --json  # CI gate: exit {EXIT_CHECK_FAILED} if off
  onnx-lsuv model.onnx -o xavier.onnx --init xavier    # a baseline, no data needed

\b
Exit codes: {0} done; {EXIT_FAILURE} runtime failure (ONNX Runtime error, a layer that did
not converge: the model is still written); {EXIT_BAD_INPUT} bad input or usage (nothing
written); {EXIT_CHECK_FAILED} --check found a layer off its target variance.

\b
Shell completion (bash): eval "$(_ONNX_LSUV_COMPLETE=bash_source onnx-lsuv)"
"""


class _StderrHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        prefix = "warning: " if record.levelno >= logging.WARNING else ""
        click.echo(f"{prefix}{record.getMessage()}", err=True)


def _setup_logging(verbose: int, quiet: bool) -> None:
    log = logging.getLogger("onnx_lsuv")
    log.handlers[:] = [_StderrHandler()]
    log.propagate = False
    log.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO)
    if not verbose:  # ONNX Runtime's own warnings (e.g. initializers listed as inputs)
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)


class Progress:
    """Progress on stderr: a bar redrawn in place on a terminal, plain lines otherwise."""

    LABELS = {"init": "pre-init", "scaling": "scaling", "re-measure": "re-measure",
              "retry": "retrying"}

    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def __call__(self, stage: str, done: int, total: int, detail: str) -> None:
        label = self.LABELS.get(stage, stage)
        if self.tty:
            width = 30
            filled = width * done // max(total, 1)
            bar = "#" * filled + "-" * (width - filled)
            end = "\n" if done >= total else ""
            click.echo(f"\r{label:>10} [{bar}] {done}/{total} {detail[:40]:<40}", err=True,
                       nl=False)
            if end:
                click.echo("", err=True)
        elif stage != "init":
            click.echo(f"{label}: {done}/{total}" + (f" {detail}" if detail else ""), err=True)
        elif done == total:  # a line per pre-init layer says little in a log
            click.echo(f"{label}: {done}/{total} weights", err=True)


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """np.savez without its keyword names: a tensor may be called 'file'."""
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", "-d", "data", multiple=True, type=click.Path(),
              help="Batch: .npy (single-input models) or .npz (one array per input name). Give "
                   "it several times, or a directory of .npy files, to pool batches.")
@click.option("--output", "-o", "output", type=click.Path(dir_okay=False),
              help="Where to write the initialised model (not with --check).")
@click.option("--tol", type=float, default=0.1, show_default=True,
              help="Tolerance on the output variance (the paper's Tol_var).")
@click.option("--max-iter", type=int, default=10, show_default=True,
              help="Most rescaling tries per layer (the paper's T_max).")
@click.option("--target-var", type=float, default=1.0, show_default=True,
              help="Output variance to reach per layer.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random draws (same seed, same bytes).")
@click.option("--init", "init", type=click.Choice(["lsuv", "orthonormal", "xavier", "msra"]),
              default="lsuv", show_default=True,
              help="LSUV, or a baseline to compare with (no data pass).")
@click.option("--keep-bias", is_flag=True, help="Keep the biases instead of zeroing them.")
@click.option("--lstm-forget-bias", type=float, default=None,
              help="Set every LSTM's forget-gate input bias to this value (e.g. 1.0).")
@click.option("--no-orthonormal", is_flag=True,
              help="Keep the existing weights and biases; only rescale.")
@click.option("--orthonormal-only", is_flag=True,
              help="Only the orthonormal pre-init (same as --init orthonormal).")
@click.option("--check", is_flag=True,
              help=f"Re-measure MODEL on the data, write nothing; exit {EXIT_CHECK_FAILED} if any "
                   "layer is off its target variance by TOL or more.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="ONNX Runtime execution provider.")
@click.option("--strategy", type=click.Choice(["fast", "naive"]), default="fast",
              show_default=True,
              help="fast: two forward passes in all; naive: one forward pass per try.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False),
              help="Write the per-layer report as JSON to this file.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a one-object JSON summary on stdout (layers, statuses, worst "
                   "deviation, times, versions).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Draw per-layer variance before/after and weight std to a PNG "
                   "(needs matplotlib).")
@click.option("--save-weights", "weights_path", type=click.Path(dir_okay=False),
              help="Save the changed tensors (initializer name -> array) to an .npz.")
@click.option("--external-data/--no-external-data", default=None,
              help="Write tensors to OUT.data beside OUT. Default: as the input model does, "
                   "and always above protobuf's 2 GiB.")
@click.option("--overwrite", is_flag=True, help="Allow the output to replace the input model.")
@click.option("-v", "--verbose", count=True, help="More detail on stderr (per-layer values).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr: no progress, no table.")
@click.version_option(onnx_lsuv.__version__, "--version", prog_name="onnx-lsuv")
def lsuv_command(model, data, output, tol, max_iter, target_var, seed, init, keep_bias,
                 lstm_forget_bias, no_orthonormal, orthonormal_only, check, provider, strategy,
                 report_path, as_json, plot_path, weights_path, external_data, overwrite,
                 verbose, quiet):
    """LSUV-initialise the Conv, ConvTranspose, Gemm, MatMul, LSTM, GRU and RNN layers of MODEL.

    Orthonormal pre-init (Saxe et al. 2014), then each layer's weights are rescaled in order
    until its output variance on the batch is TARGET_VAR within TOL (Mishkin & Matas 2016).
    Everything else in the model is written back unchanged; MODEL itself is never modified.
    """
    _setup_logging(verbose, quiet)
    try:
        report, out = _run(model, list(data), output, tol, max_iter, target_var, seed, init,
                           keep_bias, lstm_forget_bias, no_orthonormal, orthonormal_only, check,
                           provider, strategy, report_path, plot_path, weights_path,
                           external_data, overwrite, quiet)
    except LSUVError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was written", err=True)
        sys.exit(130)
    except Exception as err:  # an unexpected failure: one line, not a traceback
        click.echo(f"error: {type(err).__name__}: {err}", err=True)
        if verbose:
            raise
        sys.exit(EXIT_FAILURE)
    if not quiet:
        click.echo(report.table(), err=True)
        what = f"checked {model}" if check else f"wrote {out}"
        click.echo(f"{what}: {len(report.layers)} layers, provider {report.provider or '-'}, "
                   f"{report.timings.get('total_s', 0):.2f} s", err=True)
    if as_json:
        click.echo(json.dumps(report.summary(), indent=2))
    if not report.converged:
        sys.exit(EXIT_CHECK_FAILED if check else EXIT_FAILURE)


def _run(model, data, output, tol, max_iter, target_var, seed, init, keep_bias,
         lstm_forget_bias, no_orthonormal, orthonormal_only, check, provider, strategy,
         report_path, plot_path, weights_path, external_data, overwrite, quiet):
    """Validate the options together, call the library, write the outputs; (report, out)."""
    needs_data = check or (init == "lsuv" and not orthonormal_only)
    if needs_data and not data:
        raise InputError("--data is required (except with --orthonormal-only or a baseline "
                         "--init)")
    inputs = [model] + list(data) + external_data_files(model)
    side = [p for p in (report_path, plot_path, weights_path) if p]
    for path in side:
        check_output_path(path, inputs, False)
    if output and not check:
        data_file = os.path.abspath(output) + ".data"
        if data_file in inputs and os.path.abspath(output) != os.path.abspath(model):
            raise InputError(f"{data_file} holds the input model's external data: writing "
                             "the output there would break the input; choose another -o")
        side += [output, data_file]
    resolved = [os.path.abspath(p) for p in side]
    if len(set(resolved)) != len(resolved):
        raise InputError("-o, --report, --plot and --save-weights must be different files")
    progress = None if quiet else Progress(sys.stderr.isatty())
    if check:
        if output or weights_path:
            raise InputError("--check writes no model: drop -o/--save-weights")
        report = onnx_lsuv.check_variances(model, data, target_var=target_var, tol=tol,
                                           provider=provider)
        out = None
    else:
        if not output:
            raise InputError("-o/--output is required (or pass --check)")
        out = check_output_path(output, inputs, overwrite)
        result = onnx_lsuv.lsuv_init(
            model, data or None, target_var=target_var, tol=tol, max_iter=max_iter, seed=seed,
            keep_bias=keep_bias, orthonormal=not no_orthonormal,
            orthonormal_only=orthonormal_only, init=init, provider=provider, strategy=strategy,
            progress=progress, lstm_forget_bias=lstm_forget_bias)
        report = result.report
        if external_data is None and uses_external_data(model):
            external_data = True
        save_model_atomic(result.model, out, external_data=external_data)
        if weights_path:
            _save_npz(weights_path, result.weights)
    if report_path:
        with open(report_path, "w") as f:
            f.write(report.to_json())
    if plot_path:
        from onnx_lsuv.plot import plot_report

        plot_report(report, plot_path)
    return report, out


def main() -> None:
    lsuv_command(prog_name="onnx-lsuv")


if __name__ == "__main__":
    main()
