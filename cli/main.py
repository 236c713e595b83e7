"""``onnx-lsuv MODEL --data BATCH -o OUT``: parses options, calls the library, prints."""

from __future__ import annotations

import logging
import sys

import click

import onnx_lsuv
from onnx_lsuv.errors import EXIT_FAILURE, InputError, LSUVError
from onnx_lsuv.model_io import check_output_path, save_model_atomic, uses_external_data

EPILOG = """\b
Examples:
  onnx-lsuv model.onnx --data batch.npy -o init.onnx
  onnx-lsuv model.onnx --data inputs.npz -o init.onnx --report report.json
  onnx-lsuv model.onnx --data batch.npy -o init.onnx --keep-bias --tol 0.05

\b
Exit codes: 0 done, 1 runtime failure (ONNX Runtime error, a layer that did not
converge), 2 bad input or usage.
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


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", "-d", "data", required=False, type=click.Path(dir_okay=False),
              help="Batch: .npy (single-input models) or .npz (one array per input name).")
@click.option("--output", "-o", "output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the initialised model.")
@click.option("--tol", type=float, default=0.1, show_default=True,
              help="Tolerance on the output variance (the paper's Tol_var).")
@click.option("--max-iter", type=int, default=10, show_default=True,
              help="Most rescaling tries per layer (the paper's T_max).")
@click.option("--target-var", type=float, default=1.0, show_default=True,
              help="Output variance to reach per layer.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the orthonormal draws (same seed, same bytes).")
@click.option("--keep-bias", is_flag=True, help="Keep the biases instead of zeroing them.")
@click.option("--no-orthonormal", is_flag=True,
              help="Keep the existing weights and biases; only rescale.")
@click.option("--orthonormal-only", is_flag=True,
              help="Only the orthonormal pre-init; no data pass (--data not needed).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="ONNX Runtime execution provider.")
@click.option("--strategy", type=click.Choice(["fast", "naive"]), default="fast",
              show_default=True,
              help="fast: two forward passes in all; naive: one forward pass per try.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False),
              help="Write the per-layer report as JSON to this file.")
@click.option("--external-data/--no-external-data", default=None,
              help="Write tensors to OUT.data beside OUT. Default: as the input model does, "
                   "and always above protobuf's 2 GiB.")
@click.option("--overwrite", is_flag=True, help="Allow the output to replace the input model.")
@click.option("-v", "--verbose", count=True, help="More detail on stderr.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr; no table.")
@click.version_option(onnx_lsuv.__version__, "--version", prog_name="onnx-lsuv")
def lsuv_command(model, data, output, tol, max_iter, target_var, seed, keep_bias, no_orthonormal,
                 orthonormal_only, provider, strategy, report_path, external_data, overwrite,
                 verbose, quiet):
    """LSUV-initialise the Conv, ConvTranspose, Gemm and MatMul layers of MODEL.

    Orthonormal pre-init (Saxe et al. 2014), then each layer's weights are rescaled in order
    until its output variance on the batch is TARGET_VAR within TOL (Mishkin & Matas 2016).
    Everything else in the model is written back unchanged; MODEL itself is never modified.
    """
    _setup_logging(verbose, quiet)
    try:
        if data is None and not orthonormal_only:
            raise InputError("--data is required (or pass --orthonormal-only)")
        out = check_output_path(output, [model] + ([data] if data else []), overwrite)
        if report_path:
            check_output_path(report_path, [model] + ([data] if data else []), False)
        result = onnx_lsuv.lsuv_init(
            model, data, target_var=target_var, tol=tol, max_iter=max_iter, seed=seed,
            keep_bias=keep_bias, orthonormal=not no_orthonormal,
            orthonormal_only=orthonormal_only, provider=provider, strategy=strategy)
        if external_data is None and uses_external_data(model):
            external_data = True
        save_model_atomic(result.model, out, external_data=external_data)
        if report_path:
            with open(report_path, "w") as f:
                f.write(result.report.to_json())
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
    rep = result.report
    if not quiet:
        click.echo(rep.table(), err=True)
        t = rep.timings
        click.echo(f"wrote {output}: {len(rep.layers)} layers, provider "
                   f"{rep.provider or '-'}, {t.get('total_s', 0):.2f} s", err=True)
    if not rep.converged:
        sys.exit(EXIT_FAILURE)


def main() -> None:
    lsuv_command(prog_name="onnx-lsuv")


if __name__ == "__main__":
    main()
