"""``onnx-lsuv MODEL --data BATCH -o OUT``: parses options, calls the library, prints."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import warnings

import click
import numpy as np

import onnx_lsuv
from onnx_lsuv.data import data_files
from onnx_lsuv.errors import (
    EXIT_BAD_INPUT,
    EXIT_CHECK_FAILED,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    InputError,
    LSUVError,
)
from onnx_lsuv.match import fixed_weights, load_params, match_parameters
from onnx_lsuv.model_io import PROTOBUF_LIMIT, existing_file, load_model, tensor_bytes
from onnx_lsuv.options import (
    INITS,
    POLICIES,
    PROVIDERS,
    STRATEGIES,
    command_line_words,
    legacy_init,
)
from onnx_lsuv.outputs import (
    Transaction,
    check_output_path,
    stage_model,
    sync_file,
    write_file,
)
from onnx_lsuv.verdict import CONVERGED, GOOD

EXIT_OK = 0
EPILOG = f"""\b
Examples:
  onnx-lsuv model.onnx --data batch.npy -o init.onnx
  onnx-lsuv model.onnx -d inputs.npz -o init.onnx --report report.json \\
      --plot layers.png
  onnx-lsuv model.onnx -d b1.npy -d b2.npy -o init.onnx --save-weights w.npz
  onnx-lsuv model.onnx -d batch.npy -o init.onnx --match params.npz \\
      --save-weights new.npz
  onnx-lsuv model.onnx -d batch.npy -o init.onnx --match trainable.npz \\
      --only-matched --save-weights new.npz  # the rest: left alone
  onnx-lsuv init.onnx -d batch.npy --check --json  # CI gate: exit {EXIT_CHECK_FAILED} if off
  onnx-lsuv model.onnx -o xavier.onnx --init xavier  # a baseline, no data
  onnx-lsuv trained.onnx -d batch.npy -o scaled.onnx --init rescale

\b
Exit codes:
  {EXIT_OK:<4} done: every layer on target, every other candidate left alone by a
       documented rule (--exclude, a hand-set kernel, a quantised weight,
       a tie, --only-matched), counted in the summary
  {EXIT_FAILURE:<4} a layer not on target (did not converge, or dead: variance 0,
       NaN or Inf), a candidate that could not be initialised (named), or
       a --match that left a changed tensor unmapped: the model IS written;
       or ONNX Runtime failed on a measuring copy: nothing written
  {EXIT_BAD_INPUT:<4} bad input or usage, a model ONNX Runtime refuses as it is
       included: nothing written
  {EXIT_CHECK_FAILED:<4} --check found a layer off its target variance, or a candidate
       it could not measure
  {EXIT_INTERRUPTED:<4} interrupted (Ctrl-C): nothing written, or the files already
       in place are named
  {EXIT_TERMINATED:<4} terminated (SIGTERM: a timeout, CI cancellation, docker stop),
       as {EXIT_INTERRUPTED}

\b
Shell completion (bash):
  eval "$(_ONNX_LSUV_COMPLETE=bash_source onnx-lsuv)"
"""

log = logging.getLogger("onnx_lsuv")


class _StderrHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        prefix = "warning: " if record.levelno >= logging.WARNING else ""
        click.echo(f"{prefix}{record.getMessage()}", err=True)


def _setup_logging(verbose: int, quiet: bool) -> None:
    log = logging.getLogger("onnx_lsuv")
    log.handlers[:] = [_StderrHandler()]
    log.propagate = False
    log.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO)
    if not verbose:  # ONNX Runtime's own lines (e.g. initializers listed as inputs); with -q
        import onnxruntime  # its error lines too: the reason is in our one error message

        onnxruntime.set_default_logger_severity(4 if quiet else 3)


class Progress:
    """Progress on stderr: a bar redrawn in place on a terminal, plain lines otherwise; each
    with the time since its stage began. On a terminal the line is redrawn every
    ``TICK`` seconds while a long step runs (the one-pass solve, the pre-init of a big
    weight), so the elapsed time keeps moving."""

    LABELS = {"init": "pre-init", "scaling": "scaling", "re-measure": "re-measure",
              "retry": "retrying"}
    TICK = 0.5

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self._stage: str | None = None
        self._began = time.perf_counter()
        self._line: tuple[str, int, int, str] | None = None
        self._lock = threading.Lock()
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()

    def __call__(self, stage: str, done: int, total: int, detail: str) -> None:
        with self._lock:
            if stage != self._stage:
                self._stage, self._began = stage, time.perf_counter()
            label = self.LABELS.get(stage, stage)
            if self.tty:
                self._line = (label, done, total, detail) if done < total else None
                self._draw(label, done, total, detail)
                if done >= total:
                    click.echo("", err=True)
                elif self._ticker is None:
                    self._ticker = threading.Thread(target=self._tick, daemon=True)
                    self._ticker.start()
            elif stage != "init":
                click.echo(f"{label}: {done}/{total}" + (f" {detail}" if detail else "")
                           + f" ({self.elapsed()})", err=True)
            elif done == total:  # a line per pre-init layer says little in a log
                click.echo(f"{label}: {done}/{total} weights ({self.elapsed()})", err=True)

    def elapsed(self) -> str:
        return f"{time.perf_counter() - self._began:.1f} s"

    def _draw(self, label: str, done: int, total: int, detail: str) -> None:
        width = 30
        filled = width * done // max(total, 1)
        bar = "#" * filled + "-" * (width - filled)
        click.echo(f"\r{label:>10} [{bar}] {done}/{total} {self.elapsed():>7} "
                   f"{detail[:32]:<32}", err=True, nl=False)

    def _tick(self) -> None:
        while not self._stop.wait(self.TICK):
            with self._lock:
                if self._line is not None:
                    self._draw(*self._line)

    def close(self) -> None:
        """Stop the redrawing (and end an unfinished bar's line)."""
        self._stop.set()
        with self._lock:
            if self._line is not None:
                click.echo("", err=True)
                self._line = None


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz of ``arrays`` without np.savez's keyword names (a tensor may be called 'file').
    bfloat16 and float8 arrays (ml_dtypes, which the .npy format stores as raw void bytes that
    no framework reads back) are widened to float32, exactly."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            arr = np.asanyarray(arr)
            if arr.dtype.kind == "V" and arr.dtype.names is None:
                arr = arr.astype(np.float32)
            with zf.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
    return buf.getvalue()


# --help lists the options in these groups, in this order (as Polygraphy's argument groups do).
GROUPS = {
    "Data": ["data"],
    "Layers": ["include", "exclude"],
    "Initialisation": ["init", "seed", "keep_bias", "lstm_forget_bias"],
    "Scaling": ["target_var", "tol", "max_iter", "strategy", "check"],
    "Beyond the paper (off by default)": ["target_mean", "after_activation", "per_channel"],
    "Transformers": ["policy", "attn_logit_std", "branch_ratio", "stream_var", "head_std"],
    "Output": ["output", "report_path", "as_json", "plot_path", "weights_path", "match_path",
               "only_matched", "external_data", "overwrite"],
    "Runtime": ["provider", "threads", "verbose", "quiet", "version", "help"],
}


class UsageProblem(click.UsageError):
    """click's usage errors (an unknown option, a value it cannot parse) in the style of every
    other error of the tool: one ``error:`` line, exit 2."""

    def show(self, file=None) -> None:
        text = self.format_message().rstrip(".")
        click.echo(f"error: {text[:1].lower() + text[1:]} (onnx-lsuv --help lists the "
                   "options)", err=True)


class GroupedCommand(click.Command):
    """A click command whose --help shows its options in ``GROUPS``, with click's own
    formatter (no add-on needed for five headings), and whose usage errors read as the
    tool's own (``UsageProblem``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as err:
            if isinstance(err, click.BadParameter):  # with the option's name, as click says it
                raise UsageProblem(err.format_message(), err.ctx) from None
            raise UsageProblem(err.message, err.ctx) from None

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        params = [p for p in self.get_params(ctx) if isinstance(p, click.Option)]
        help_name = self.get_help_option(ctx).name if self.get_help_option(ctx) else None
        rows = {("help" if p.name == help_name else p.name): p.get_help_record(ctx)
                for p in params}
        for title, names in GROUPS.items():
            records = [rows.pop(n) for n in names if rows.get(n)]
            if records:
                with formatter.section(f"{title} options"):
                    formatter.write_dl(records)
        rest = [r for r in rows.values() if r]
        if rest:
            with formatter.section("Other options"):
                formatter.write_dl(rest)


@click.command(cls=GroupedCommand, epilog=EPILOG,
               context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", "-d", "data", multiple=True, type=click.Path(),
              help="Batch: .npy (single-input models) or .npz (one array per input name). Give "
                   "it several times to pool batches into one; give a directory of .npy/.npz "
                   "files to stream them (about one batch in memory, read again per layer).")
@click.option("--exclude", "exclude", multiple=True, metavar="PATTERN",
              help="Leave alone the layers whose node name, weight name or op type matches this "
                   "glob (case-sensitive; repeat for more), e.g. a fixed decoding conv such as "
                   "YOLOv8's DFL: --exclude '*dfl*'.")
@click.option("--include", "include", multiple=True, metavar="PATTERN",
              help="Take the matching layers whatever else holds: over --exclude, and over "
                   "the layers left alone by default (a weight also read by a node that is not "
                   "a target, such as an LM head tied to the embedding; a kernel that looks "
                   "hand-set). --exclude '*' --include Conv keeps only the convolutions.")
@click.option("--init", "init", type=click.Choice(INITS), default="lsuv", show_default=True,
              help="lsuv: orthonormal pre-init, then LSUV scaling. rescale: keep the model's "
                   "weights and biases, only the LSUV scaling. orthonormal, xavier, msra: "
                   "baselines to compare with (no data pass).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random draws, 0 to 2**63-1 (same seed, same bytes).")
@click.option("--keep-bias", is_flag=True, help="Keep the biases instead of zeroing them.")
@click.option("--lstm-forget-bias", type=float, default=None,
              help="Set every LSTM's forget-gate input bias to this value (e.g. 1.0).")
@click.option("--no-orthonormal", is_flag=True, hidden=True,
              help="Deprecated: --init rescale.")
@click.option("--orthonormal-only", is_flag=True, hidden=True,
              help="Deprecated: --init orthonormal.")
@click.option("--target-var", type=float, default=1.0, show_default=True,
              help="Output variance to reach per layer.")
@click.option("--tol", type=float, default=0.1, show_default=True,
              help="Tolerance on the output variance (the paper's Tol_var).")
@click.option("--max-iter", type=int, default=10, show_default=True,
              help="Most rescaling tries per layer (the paper's T_max).")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="fast", show_default=True,
              help="fast: the in-graph one-pass solve; naive: one forward pass per try; "
                   "sequential: layer by layer from per-channel statistics over all batches "
                   "(what a directory of batches and the options below use).")
@click.option("--target-mean", type=float, default=None,
              help="Shift each layer's bias so its output has this mean (per channel with "
                   "--per-channel), as LSUV-pytorch's needed_mean; Conv, ConvTranspose and "
                   "Gemm without a bias get one. Default: no mean target (the paper).")
@click.option("--after-activation", is_flag=True,
              help="Measure after the activation that directly follows each layer (Relu, "
                   "Tanh, Sigmoid, Gelu, Max, ...), as fastai's and thinc's LSUV; layers "
                   "with none are measured at their output (reported).")
@click.option("--per-channel", is_flag=True,
              help="Give every output channel the target on its own (batch norm of the data "
                   "folded into the weights); the weight rows are then scaled unequally.")
@click.option("--policy", type=click.Choice(POLICIES), default="paper", show_default=True,
              help="paper: every layer to the target variance (Algorithm 1). transformer: "
                   "then each layer with a transformer role (shown in the table) to its "
                   "role's target, measured where it matters; the rest keep the paper's.")
@click.option("--attn-logit-std", type=float, default=None, metavar="STD",
              help="--policy transformer: std of the attention logits (Softmax input), set by "
                   "q and k evenly. Default: 0.4.")
@click.option("--branch-ratio", type=float, default=None, metavar="RATIO",
              help="--policy transformer, pre-LN blocks: Var(branch) / Var(stream) at each "
                   "residual Add, set by the branch's last layer. Default: 1 / (2 N_blocks).")
@click.option("--stream-var", type=float, default=None, metavar="VAR",
              help="--policy transformer: variance of the residual stream after the "
                   "embedding, set by the layer (or token table) that writes it. Default: 1/3.")
@click.option("--head-std", type=float, default=None, metavar="STD",
              help="--policy transformer: std of the head's output; 0 zeroes the head. "
                   "Default: 0.1.")
@click.option("--check", is_flag=True,
              help=f"Re-measure MODEL on the data, write nothing; exit {EXIT_CHECK_FAILED} if any "
                   "layer is off its target variance by TOL or more, or dead (variance 0, "
                   "NaN or Inf).")
@click.option("--output", "-o", "output", type=click.Path(dir_okay=False),
              help="Where to write the initialised model (not with --check).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False),
              help="Write the per-layer report as JSON to this file.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a one-object JSON summary on stdout (layers, statuses, worst "
                   "deviation, times, versions).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Draw per-layer variance before/after and weight std to a PNG "
                   "(needs matplotlib).")
@click.option("--save-weights", "weights_path", type=click.Path(dir_okay=False),
              help="Save the changed tensors (initializer name -> array) to an .npz; with "
                   "--match, the changed framework parameters under their own names.")
@click.option("--match", "match_path", type=click.Path(dir_okay=False),
              help="The framework's ORIGINAL parameters (name -> array, an .npz) that MODEL "
                   "was exported from: --save-weights then writes the changed parameters "
                   "under those names, in those shapes (found by value; exit 1 when a "
                   "changed tensor is not found).")
@click.option("--only-matched", is_flag=True,
              help="With --match: leave alone (reported, exit 0) every layer whose weight's "
                   "value is not among the --match parameters, e.g. a fixed STFT or mel "
                   "kernel when they list only the trained ones. Default: such layers are "
                   "initialised.")
@click.option("--external-data/--no-external-data", default=None,
              help="Write tensors to OUT.data beside OUT. Default: as the input model does, "
                   "and always above protobuf's 2 GiB.")
@click.option("--overwrite", is_flag=True, help="Allow the output to replace the input model.")
@click.option("--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True,
              help="ONNX Runtime execution provider.")
@click.option("--threads", type=int, default=None,
              help="CPU threads for ONNX Runtime and the pre-init. Default: the CPUs available.")
@click.option("-v", "--verbose", count=True, help="More detail on stderr (per-layer values).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr: no progress, no table.")
@click.version_option(onnx_lsuv.__version__, "--version", prog_name="onnx-lsuv")
def lsuv_command(model: str, verbose: int, quiet: bool, as_json: bool, **flags) -> None:
    """LSUV-initialise the Conv, ConvTranspose, Gemm, MatMul, LSTM, GRU and RNN layers of MODEL.

    Orthonormal pre-init (Saxe et al. 2014), then each layer's weights are rescaled in order
    until its output variance on the batch is TARGET_VAR within TOL (Mishkin & Matas 2016).
    Everything else in the model is written back unchanged; MODEL itself is never modified.
    """
    _setup_logging(verbose, quiet)
    if verbose and quiet:  # said even with -q: the user asked for both
        click.echo("warning: -v does nothing with -q (-q shows only errors); drop one",
                   err=True)
    tx = Transaction()
    t_start = time.perf_counter()
    progress = None if quiet else Progress(sys.stderr.isatty())
    try:
        with command_line_words():
            report, out = _run(model, flags, tx, progress)
            if progress is not None:
                progress.close()
            code = _finish(model, report, out, flags["check"], quiet, as_json, verbose)
    except LSUVError as err:
        _stop(progress)
        click.echo(f"error: {err}", err=True)
        _last_line(quiet, t_start, tx, err.exit_code)
        sys.exit(err.exit_code)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (see main)
        _stop(progress)
        what = "terminated" if isinstance(stop, Terminated) else "interrupted"
        code = EXIT_TERMINATED if isinstance(stop, Terminated) else EXIT_INTERRUPTED
        if tx.committed or tx.written:
            click.echo(f"{what} after writing {', '.join(tx.written)}", err=True)
        else:
            click.echo(f"{what}: nothing was written", err=True)
        _last_line(quiet, t_start, tx, code)
        sys.exit(code)
    except Exception as err:  # an unexpected failure: one line, not a traceback
        _stop(progress)
        click.echo(f"error: {type(err).__name__}: {err}", err=True)
        if verbose:
            raise
        _last_line(quiet, t_start, tx, EXIT_FAILURE)
        sys.exit(EXIT_FAILURE)
    if code:
        sys.exit(code)


EXIT_MEANING = {EXIT_FAILURE: "failed", EXIT_BAD_INPUT: "bad input or usage",
                EXIT_CHECK_FAILED: "check failed", EXIT_INTERRUPTED: "interrupted",
                EXIT_TERMINATED: "terminated"}


def _stop(progress: Progress | None) -> None:
    if progress is not None:
        progress.close()


def _seconds(t: float) -> str:
    return f"{t:.1f} s" if t >= 1 else f"{t:.2f} s"


def _last_line(quiet: bool, t_start: float, tx: Transaction, code: int) -> None:
    """The run's last line when it stopped early: how long, what was written, the exit."""
    if quiet:
        return
    wrote = f"wrote {', '.join(tx.written)}" if tx.written else "nothing written"
    click.echo(f"stopped after {_seconds(time.perf_counter() - t_start)}, {wrote} (exit "
               f"{code}: {EXIT_MEANING.get(code, 'failed')})", err=True)


def summary_line(report, out: str | None, model: str, check: bool, code: int) -> str:
    """The last line of every run that got to the end: ``21/21 layers on target, 1.5 s,
    wrote init.onnx`` (then what was left alone or not initialised, the exit code)."""
    n = len(report.layers)
    scaled = report.options.get("check") or report.options.get("init") in ("lsuv", "rescale")
    if scaled:
        head = f"{sum(r.status == CONVERGED for r in report.layers)}/{n} layers on target"
    else:
        head = f"{n} layers initialised ({report.options.get('init')}, no data pass)"
    parts = [head]
    if report.left_alone:
        parts.append(f"{len(report.left_alone)} left alone")
    if report.not_initialised:
        parts.append(f"{len(report.not_initialised)} NOT "
                     + ("measured" if check else "initialised"))
    total = report.timings.get("total_s", 0.0)
    parts.append(_seconds(total) + (f" on {report.provider}" if report.provider else ""))
    parts.append(f"checked {model}, nothing written" if check else f"wrote {out}")
    line = ", ".join(parts)
    return line + (f" (exit {code}: {EXIT_MEANING.get(code, 'failed')})" if code else "")


TABLE_ROWS = 40  # a longer table is shortened on a terminal (-v: every row)


def _finish(model: str, report, out: str | None, check: bool, quiet: bool,
            as_json: bool, verbose: int = 0) -> int:
    """The table, the JSON summary, the last line; the exit code of a run that wrote what
    it had to."""
    if not quiet:
        short = sys.stderr.isatty() and not verbose
        click.echo(report.table(limit=TABLE_ROWS if short else None,
                                more="-v shows every row, --report keeps them"), err=True)
    if as_json:
        click.echo(json.dumps(report.summary(), indent=2))
    unmatched = bool(report.match) and not report.match["complete"]
    if report.match and not quiet and not unmatched:
        click.echo(f"--match: {report.match['summary']}", err=True)
    if unmatched:
        click.echo(f"error: --match: {report.match['summary']}; --save-weights holds only the "
                   "parameters that were found", err=True)
    code = EXIT_FAILURE if unmatched else 0
    if not report.converged:
        problems = []
        off = sum(r.status not in GOOD for r in report.layers)
        if off:
            problems.append(f"{off} of {len(report.layers)} layers not on target")
        missed = report.not_initialised
        if missed:
            problems.append(
                f"{len(missed)} candidate layer(s) not {'measured' if check else 'initialised'}"
                ": " + "; ".join(f"{s['name']} ({s['op']}): {s['reason']}" for s in missed)
                + " (--exclude NAME accepts leaving one as it is)")
        click.echo("error: " + "; ".join(problems)
                   + ("" if check else f" (the model was written to {out})"), err=True)
        code = EXIT_CHECK_FAILED if check else EXIT_FAILURE
    if not quiet:
        click.echo(summary_line(report, out, model, check, code), err=True)
    return code


_POLICY_TARGETS = ("attn_logit_std", "branch_ratio", "stream_var", "head_std")


def _options(flags: dict) -> onnx_lsuv.LSUVOptions:
    """The run's options from the flags (the deprecated spellings mapped onto --init)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        init = legacy_init(flags["init"], False if flags["no_orthonormal"] else None,
                           flags["orthonormal_only"])
    if flags["no_orthonormal"] or flags["orthonormal_only"]:
        log.warning("--no-orthonormal and --orthonormal-only are deprecated: use --init %s",
                    init)
    targets = {name: flags[name] for name in _POLICY_TARGETS if flags[name] is not None}
    if targets and flags["policy"] != "transformer":
        raise InputError(f"{', '.join('--' + n.replace('_', '-') for n in targets)}: "
                         "targets of --policy transformer (the policy is "
                         f"{flags['policy']!r})")
    return onnx_lsuv.LSUVOptions(
        policy=flags["policy"], **targets,
        target_var=flags["target_var"], tol=flags["tol"], max_iter=flags["max_iter"],
        seed=flags["seed"], init=init, keep_bias=flags["keep_bias"],
        lstm_forget_bias=flags["lstm_forget_bias"], provider=flags["provider"],
        strategy=flags["strategy"], threads=flags["threads"], include=flags["include"],
        exclude=flags["exclude"], target_mean=flags["target_mean"],
        after_activation=flags["after_activation"], per_channel=flags["per_channel"])


def _run(model: str, flags: dict, tx: Transaction, progress: Progress | None):
    """Check every path and option first, call the library, then write all outputs in ``tx``
    as one transaction; (report, model path written)."""
    opts = _options(flags)
    existing_file(model, "model", "an .onnx file")
    data, output, check = list(flags["data"]), flags["output"], flags["check"]
    side = {"--report": flags["report_path"], "--plot": flags["plot_path"],
            "--save-weights": flags["weights_path"]}
    side = {k: v for k, v in side.items() if v}
    if (check or opts.scaling) and not data:
        raise InputError("--data is required (except with a baseline --init: orthonormal, "
                         "xavier, msra)")
    if check and (output or "--save-weights" in side):
        raise InputError("--check writes no model: drop -o/--save-weights")
    if not check and not output:
        raise InputError("-o/--output is required (or pass --check)")
    params = None
    if flags["match_path"]:
        if "--save-weights" not in side:
            raise InputError("--match needs --save-weights OUT.npz: where the framework's "
                             "new parameters go")
        params = load_params(existing_file(flags["match_path"], "--match parameters",
                                           "an .npz of name -> array"))
    elif flags["only_matched"]:
        raise InputError("--only-matched needs --match PARAMS.npz: the parameters a layer's "
                         "weight must be found among")
    # Every file the run reads is protected: the model, each data file (a directory's files
    # too) and the model's external data. The model is parsed once, here: its big tensors
    # stay in their files (memory-mapped), and everything below reads this copy.
    model_data: list[str] = []
    loaded = load_model(model, mapped=True, files=model_data)
    if flags["external_data"] is False and tensor_bytes(loaded) > PROTOBUF_LIMIT - (64 << 20):
        raise InputError(f"--no-external-data: {model} holds "
                         f"{tensor_bytes(loaded) / 2**30:.2f} GiB of tensors, over protobuf's "
                         "2 GiB; it can only be written with external data")
    inputs = [os.path.abspath(p) for p in [model] + data_files(data)
              + ([flags["match_path"]] if flags["match_path"] else [])] + model_data
    tx.protected |= {os.path.realpath(p) for p in inputs}
    finals = {k: check_output_path(v, inputs, what=k) for k, v in side.items()}
    out = None
    if not check:  # --overwrite lets -o replace the model file itself, never another input
        out = check_output_path(output, inputs, [model] if flags["overwrite"] else [])
        finals["-o"] = out
        data_names = re.compile(re.escape(os.path.basename(out)) + r"(\.[0-9a-f]{8})?\.data")
        for k, v in finals.items():  # where the model's data may go: no side file there
            if os.path.dirname(v) == os.path.dirname(out) and \
                    data_names.fullmatch(os.path.basename(v)):
                raise InputError(f"{k} {v} is named like the data file of -o {output}: "
                                 "choose another name")
        wants_data = flags["external_data"] or (flags["external_data"] is None and model_data)
        if wants_data and os.path.islink(os.path.abspath(output)) and \
                os.path.dirname(out) != os.path.dirname(os.path.abspath(output)):
            raise InputError(f"-o {output} is a symlink into another directory: the external "
                             "data beside its target would not be found from the link; give "
                             f"the target's path ({out}) or --no-external-data")
        if os.path.exists(out) and os.path.samefile(out, model):
            # The model is replaced: its data files are read by then, and the new model
            # reads its own, so they may go once it is in place.
            tx.protected -= {os.path.realpath(p) for p in model_data}
    if len(set(finals.values())) != len(finals):
        raise InputError("-o, --report, --plot and --save-weights must be different files")
    if "--plot" in side:
        from onnx_lsuv.plot import require_matplotlib

        require_matplotlib()
    if params is not None and flags["only_matched"]:
        opts = dataclasses.replace(opts, fixed=fixed_weights(
            loaded, params, missing="not among the --match parameters (--only-matched)"))
    if data and not opts.scaling and not check:
        log.warning("--data does nothing with --init %s: it draws the weights without "
                    "measuring (--init lsuv or rescale read the data)", opts.init)
    if check:
        report = onnx_lsuv.check_variances(loaded, data, opts, source=model)
        result = None
    else:
        result = onnx_lsuv.lsuv_init(loaded, data or None, opts, progress=progress,
                                     source=model)
        report = result.report
        weights = result.weights
        if params is not None:
            matched = match_parameters(loaded, result.weights, params)
            report.match = {**matched.to_dict(), "summary": matched.summary()}
            weights = matched.params
    with tx:
        if result is not None:
            external_data = flags["external_data"]
            if external_data is None and model_data:
                external_data = True
            built, arrays = result.unbuilt()
            stage_model(tx, built, out, external_data=external_data, arrays=arrays)
        if "--save-weights" in finals:
            write_file(tx, finals["--save-weights"], _npz_bytes(weights))
        if "--report" in finals:
            write_file(tx, finals["--report"], report.to_json().encode())
        if "--plot" in finals:
            from onnx_lsuv.plot import plot_report

            staged = tx.stage(finals["--plot"])
            plot_report(report, staged)
            sync_file(staged)
        tx.commit()
    return report, out


class Terminated(KeyboardInterrupt):
    """SIGTERM (from timeout, CI cancellation, docker stop, systemd): unwinds like Ctrl-C,
    so that every temporary file is removed on the way out."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    lsuv_command(prog_name="onnx-lsuv")


if __name__ == "__main__":
    main()
