"""The options of one run: built once (by the CLI or by ``lsuv_init``'s keywords), validated
once, carried through the run and written into the report."""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .baselines import BASELINES
from .errors import InputError

STRATEGIES = ("fast", "naive", "sequential")
PROVIDERS = ("auto", "cpu", "cuda")
# lsuv: orthonormal pre-init, then LSUV scaling (the paper). rescale: keep the model's weights
# and biases, only the LSUV scaling. orthonormal: the pre-init alone (Saxe et al.). xavier and
# msra: baselines to compare with. Only lsuv and rescale read data.
INITS = ("lsuv", "rescale", "orthonormal") + BASELINES
# paper: Algorithm 1 for every layer. transformer: layers with a transformer role
# (``roles.find_roles``) get their role's target (``policy``), the others the paper's.
POLICIES = ("paper", "transformer")
MAX_SEED = 2**63 - 1

# Messages name an option as the caller wrote it: "--tol" on the command line, "tol" in
# Python. The CLI sets this for its run (``command_line_words``); ``say`` reads it.
_COMMAND_LINE = contextvars.ContextVar("onnx_lsuv_command_line", default=False)
_NO_VALUE = object()


def say(option: str, value: Any = _NO_VALUE) -> str:
    """``option`` (a field of ``LSUVOptions``), with ``value`` if given, in the caller's
    words: ``--strategy naive`` on the command line, ``strategy 'naive'`` in Python."""
    if _COMMAND_LINE.get():
        flag = "--" + option.replace("_", "-")
        return flag if value is _NO_VALUE else f"{flag} {value}"
    return option if value is _NO_VALUE else f"{option} {value!r}"


@contextlib.contextmanager
def command_line_words():
    """Within it, messages name options by their flags (``say``): the CLI's run."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)



def _extended_targets(conjunction: str) -> str:
    """The targets beyond the paper's, in the caller's words: "--target-mean,
    --after-activation or --per-channel" (``LSUVOptions.extended``)."""
    return (f"{say('target_mean')}, {say('after_activation')} {conjunction} "
            f"{say('per_channel')}")

def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class LSUVOptions:
    """Everything a run can be told. Invalid values raise InputError when it is built.

    Attributes:
        target_var: Output variance to reach per layer. Defaults to 1.0.
        tol: Tolerance on the variance (the paper's Tol_var). Defaults to 0.1.
        max_iter: Most rescaling tries per layer, all strategies and retries together (the
            paper's T_max). Defaults to 10.
        seed: Seed of the random draws, 0 to 2**63 - 1: the same seed gives the same bytes.
            Defaults to 0.
        init: "lsuv", "rescale", "orthonormal", "xavier" or "msra" (see ``INITS``).
            Defaults to "lsuv".
        keep_bias: Keep the biases instead of zeroing them with the pre-init. Defaults to False.
        lstm_forget_bias: Set every LSTM's forget-gate input bias to this finite value.
            Defaults to None (left as the init leaves it).
        provider: "auto", "cpu" or "cuda". Defaults to "auto".
        strategy: "fast" (the in-graph one-pass solve), "naive" (a whole forward pass per
            try) or "sequential" (layer after layer, each solved from per-channel statistics
            accumulated over every batch: what the options below and a stream of batches use;
            "fast" switches to it for them). Defaults to "fast".
        threads: CPU threads for ONNX Runtime and the pre-init. Defaults to None (the CPUs
            this process may use).
        include: Glob patterns (case-sensitive) of node names, weight names or op types to
            take as targets whatever else holds: over ``exclude``, and over the layers left
            alone by default (a weight also read by a node that is not a target, a kernel that
            looks hand-set). Defaults to none.
        exclude: Glob patterns of node names, weight names or op types to leave alone.
            Defaults to none.
        target_mean: After the scale, shift each layer's bias so that its output (at the
            measured point) has this mean, per layer or per channel; the variance target then
            applies to the centred output (LSUV-pytorch's ``needed_mean``). A layer without a
            bias input gets one where the node can take it (Conv, ConvTranspose, Gemm).
            Defaults to None (the paper: biases zeroed, no mean target).
        after_activation: Measure mean and variance at the output of the one activation that
            directly follows each layer (Relu, LeakyRelu, Tanh, Sigmoid, Gelu, Max, ...), as
            fastai's and thinc's LSUV do; layers with none fall back to their own output,
            reported. Defaults to False (the paper: the layer's output).
        per_channel: Give every output channel (unit) the target on its own, i.e. batch
            normalisation of the data folded into the weights (a per-channel TF LSUV,
            Kraehenbuehl et al. 2016): the rows of the orthonormal matrix are then scaled
            unequally. Defaults to False (the paper: one factor per layer, group or gate).
        fixed: ONNX tensor names of weights that are not to be trained (a fixed STFT, mel or
            constant-Q kernel): the layers that read them are left alone (neither pre-init
            nor scaling) and reported, with exit 0; ``include`` overrides it. A list of
            names, or a mapping name -> why (completing "its weight W is ..."), which the
            one-call front ends build from the framework's non-trainable tensors
            (``match.fixed_weights``). Kept as (name, why) pairs. Defaults to none.
        policy: "paper" (Algorithm 1 for every layer) or "transformer" (after it, the layers
            with a transformer role get the role's target, measured where it matters: see
            ``policy``). Defaults to "paper".
        attn_logit_std: policy "transformer": the std of the attention logits (the Softmax
            input) that q and k are scaled to, evenly between them. Defaults to 0.4.
        branch_ratio: policy "transformer", pre-LN blocks: Var(branch) / Var(stream) at
            each residual Add, set by the branch's last layer. Defaults to None:
            1 / (2 N_blocks).
        stream_var: policy "transformer": the variance of the residual stream after the
            embedding, set by the layer that writes it. Defaults to 1/3.
        head_std: policy "transformer": the std of the head's output; 0 zeroes its weight
            and bias. Defaults to 0.1.
    """

    target_var: float = 1.0
    tol: float = 0.1
    max_iter: int = 10
    seed: int = 0
    init: str = "lsuv"
    keep_bias: bool = False
    lstm_forget_bias: float | None = None
    provider: str = "auto"
    strategy: str = "fast"
    threads: int | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    target_mean: float | None = None
    after_activation: bool = False
    per_channel: bool = False
    fixed: tuple[tuple[str, str], ...] = ()
    policy: str = "paper"
    attn_logit_std: float = 0.4
    branch_ratio: float | None = None
    stream_var: float = 1.0 / 3.0
    head_std: float = 0.1

    def __post_init__(self) -> None:
        for name in ("tol", "target_var"):
            value = getattr(self, name)
            if not (_number(value) and math.isfinite(value) and value > 0):
                raise InputError(f"{say(name)} must be a positive number, got {value!r}")
        if not (isinstance(self.max_iter, numbers.Integral) and not isinstance(self.max_iter, bool)
                and self.max_iter >= 1):
            raise InputError(f"{say('max_iter')} must be an integer >= 1, got {self.max_iter!r}")
        if not (isinstance(self.seed, numbers.Integral) and not isinstance(self.seed, bool)
                and 0 <= self.seed <= MAX_SEED):
            raise InputError(f"{say('seed')} must be an integer from 0 to 2**63 - 1, got "
                             f"{self.seed!r}")
        if self.init not in INITS:
            raise InputError(f"{say('init')} must be one of {INITS}, got {self.init!r}")
        self._check_policy()
        if self.strategy not in STRATEGIES:
            raise InputError(f"{say('strategy')} must be one of {STRATEGIES}, got "
                             f"{self.strategy!r}")
        if self.provider not in PROVIDERS:
            raise InputError(f"{say('provider')} must be one of {PROVIDERS}, got "
                             f"{self.provider!r}")
        if self.lstm_forget_bias is not None and not (
                _number(self.lstm_forget_bias) and math.isfinite(self.lstm_forget_bias)):
            raise InputError(f"{say('lstm_forget_bias')} must be a finite number, got "
                             f"{self.lstm_forget_bias!r}")
        if self.target_mean is not None and not (
                _number(self.target_mean) and math.isfinite(self.target_mean)):
            raise InputError(f"{say('target_mean')} must be a finite number, got "
                             f"{self.target_mean!r}")
        for name in ("after_activation", "per_channel"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{say(name)} must be True or False, got {getattr(self, name)!r}")
        if self.extended and not self.scaling:
            raise InputError(f"{_extended_targets('and')} are targets of the LSUV scaling: "
                             f"{say('init', self.init)} does none (use {say('init', 'lsuv')} "
                             f"or {say('init', 'rescale')})")
        if self.strategy == "naive" and self.extended:
            raise InputError(f"{say('strategy', 'naive')} is the paper's plain loop: it takes "
                             f"no {_extended_targets('or')}; use {say('strategy', 'fast')} or "
                             f"{say('strategy', 'sequential')}")
        if self.threads is not None and not (
                isinstance(self.threads, numbers.Integral) and not isinstance(self.threads, bool)
                and self.threads >= 1):
            raise InputError(f"{say('threads')} must be an integer >= 1, got {self.threads!r}")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            try:
                value = tuple(value)
            except TypeError:
                value = None
            if value is None or not all(isinstance(p, str) and p for p in value):
                raise InputError(f"{say(name)} must be a list of non-empty glob patterns, got "
                                 f"{getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "fixed", _fixed_pairs(self.fixed))
        # Store plain Python numbers: the report is JSON.
        object.__setattr__(self, "target_var", float(self.target_var))
        object.__setattr__(self, "tol", float(self.tol))
        object.__setattr__(self, "max_iter", int(self.max_iter))
        object.__setattr__(self, "seed", int(self.seed))
        if self.target_mean is not None:
            object.__setattr__(self, "target_mean", float(self.target_mean))

    def _check_policy(self) -> None:
        if self.policy not in POLICIES:
            raise InputError(f"{say('policy')} must be one of {POLICIES}, got {self.policy!r}")
        for name in ("attn_logit_std", "stream_var"):
            value = getattr(self, name)
            if not (_number(value) and math.isfinite(value) and value > 0):
                raise InputError(f"{say(name)} must be a positive number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.branch_ratio is not None:
            if not (_number(self.branch_ratio) and math.isfinite(self.branch_ratio)
                    and self.branch_ratio > 0):
                raise InputError(f"{say('branch_ratio')} must be a positive number (or None: "
                                 f"1 / (2 N_blocks)), got {self.branch_ratio!r}")
            object.__setattr__(self, "branch_ratio", float(self.branch_ratio))
        if not (_number(self.head_std) and math.isfinite(self.head_std) and self.head_std >= 0):
            raise InputError(f"{say('head_std')} must be a number >= 0 (0 zeroes the head), got "
                             f"{self.head_std!r}")
        object.__setattr__(self, "head_std", float(self.head_std))
        if self.policy == "transformer" and not self.scaling:
            raise InputError(f"{say('policy', 'transformer')} sets targets measured on data: "
                             f"{say('init', self.init)} measures none (use lsuv or rescale)")
        if self.policy == "transformer" and self.extended:
            raise InputError(f"{say('policy', 'transformer')} re-solves the other layers at their "
                             f"output after the roles' targets: it takes no "
                             f"{_extended_targets('or')}")

    @property
    def extended(self) -> bool:
        """Whether a target beyond the paper's is asked for (a mean, after the activation, per
        channel): those runs are solved layer by layer (strategy "sequential")."""
        return self.target_mean is not None or self.after_activation or self.per_channel

    @property
    def scaling(self) -> bool:
        """Whether the run measures data and rescales (init "lsuv" or "rescale")."""
        return self.init in ("lsuv", "rescale")

    @property
    def reinit(self) -> bool:
        """Whether the weights are drawn anew (every init but "rescale")."""
        return self.init != "rescale"

    @property
    def zero_bias(self) -> bool:
        """Whether the targets' biases are zeroed with the new draw."""
        return self.reinit and not self.keep_bias

    @property
    def selection(self):
        """The include / exclude patterns as a ``layers.Selection``."""
        from .layers import Selection

        return Selection(self.include, self.exclude, self.fixed)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        d["fixed"] = dict(self.fixed)
        return d


LISTED = "listed in the option fixed"


def _fixed_pairs(value: Any) -> tuple[tuple[str, str], ...]:
    """``fixed`` as (ONNX tensor name, why) pairs, from a list of names (why: ``LISTED``),
    a mapping name -> why, or such pairs (what this returns, so that replace() keeps it)."""
    if isinstance(value, str):
        value = (value,)
    try:
        items = list(value.items()) if isinstance(value, Mapping) else [
            tuple(v) if isinstance(v, (tuple, list)) else (v, LISTED) for v in value]
    except TypeError:
        items = None
    if items is None or not all(len(i) == 2 and all(isinstance(x, str) and x for x in i)
                                for i in items):
        raise InputError(f"fixed must be a list of ONNX tensor names or a mapping name -> "
                         f"reason (non-empty strings), got {value!r}")
    return tuple(dict(items).items())


def legacy_init(init: str, orthonormal: bool | None, orthonormal_only: bool | None) -> str:
    """The ``init`` meant by the old ``orthonormal=False`` / ``orthonormal_only=True`` keywords
    (and the CLI's ``--no-orthonormal`` / ``--orthonormal-only``), with a DeprecationWarning.

    Raises:
        InputError: The old and new spellings contradict each other.
    """
    if orthonormal is None and not orthonormal_only:
        return init
    warnings.warn("orthonormal=False and orthonormal_only=True are deprecated: use "
                  "init='rescale' or init='orthonormal'", DeprecationWarning, stacklevel=3)
    if orthonormal_only and orthonormal is False:
        raise InputError("orthonormal_only and orthonormal=False together would change nothing")
    meant = "orthonormal" if orthonormal_only else "rescale" if orthonormal is False else init
    if init not in ("lsuv", meant):
        raise InputError(f"init={init!r} contradicts the deprecated "
                         f"{'orthonormal_only' if orthonormal_only else 'orthonormal'} option")
    return meant
