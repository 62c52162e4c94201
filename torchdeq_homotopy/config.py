"""Plugin configuration: every ``homo_*`` key, its default, and its validation.

All keys of this plugin share the prefix ``homo_``. They reach the code three ways,
exactly like TorchDEQ's own keys:

* as keyword arguments or a dict / ``argparse.Namespace`` given to
  :func:`torchdeq_homotopy.get_deq` (or to TorchDEQ's ``get_deq`` for the core keys),
* as ``solver_kwargs`` of a DEQ forward call, or keyword arguments of the solver,
* on the command line, through :func:`add_homotopy_args`.

Unknown ``homo_*`` keys, misspellings of known keys and invalid values raise a
:class:`ConfigError` that names the key and the valid choices.
"""
from __future__ import annotations

import argparse
import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

PREFIX = "homo_"


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the fix.

    Example:
        >>> import torchdeq_homotopy
        >>> try:
        ...     torchdeq_homotopy.get_deq(f_solver='homotopy', homo_krylov_dimm=20)
        ... except torchdeq_homotopy.ConfigError as error:
        ...     print('homo_krylov_dim' in str(error))
        True
    """


@dataclass(frozen=True)
class Key:
    """One documented configuration key.

    Attributes:
        name: the full key, with the ``homo_`` prefix.
        default: the value used when the key is not given.
        doc: one line saying what it controls.
        choices: the allowed values, for string keys.
        check: a predicate on the value, for numeric keys; ``check_doc`` says it.
    """

    name: str
    default: Any
    doc: str
    choices: tuple | None = None
    check: Callable[[Any], bool] | None = None
    check_doc: str = ""
    kind: type | None = None

    def validate(self, value: Any) -> Any:
        if self.choices is not None and value not in self.choices:
            raise ConfigError(
                f"{self.name}={value!r} is not valid; choose one of {list(self.choices)}."
            )
        if self.kind is not None and value is not None:
            if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, self.kind) or (self.kind is int and isinstance(value, bool)):
                raise ConfigError(
                    f"{self.name}={value!r} must be of type {self.kind.__name__}."
                )
        if self.check is not None and not self.check(value):
            raise ConfigError(f"{self.name}={value!r} is not valid; it must be {self.check_doc}.")
        return value


def _positive(x: Any) -> bool:
    return x > 0


def _non_negative(x: Any) -> bool:
    return x >= 0


def _unit_interval(x: Any) -> bool:
    return 0 < x < 1


_STEP_OPTIONS = ("step_size", "first_step")


def _integrator_options(x: Any) -> bool:
    """None, or a dict whose steps (``step_size``, ``first_step``), where given, are > 0:
    torchdiffeq raises an opaque error at 0 or below ("unsupported range: 0 -> inf")."""
    if x is None:
        return True
    if not isinstance(x, Mapping):
        return False
    try:
        return all(float(x[name]) > 0 for name in _STEP_OPTIONS if x.get(name) is not None)
    except (TypeError, ValueError):                 # not a number
        return False


SOLVER_KEYS: dict[str, Key] = {
    k.name: k
    for k in [
        Key("homo_type", "fixed_point", "homotopy: 'fixed_point' H = z - λf(z) - (1-λ)z0, "
            "or 'newton' H = G(z) - (1-λ)G(z0) with G(z) = z - f(z)",
            choices=("fixed_point", "newton")),
        Key("homo_predictor", "tangent", "predictor along the path: 'tangent' (Euler step on the "
            "unit tangent, one linear solve), 'secant' (through the last two path points, no "
            "solve) or 'ode' (integrate the Davidenko ODE with torchdiffeq's odeint)",
            choices=("tangent", "secant", "ode")),
        Key("homo_ode_method", "rk4", "torchdiffeq fixed-grid method of the 'ode' predictor",
            choices=("euler", "midpoint", "rk4", "explicit_adams", "implicit_adams")),
        Key("homo_jvp", "finite_difference", "Jacobian-vector products: 'finite_difference' "
            "((f(z+εv)-f(z))/ε, one f call), 'forward' (torch.func.jvp, exact) or 'auto' "
            "(forward, falling back to finite differences if the callable does not support it)",
            choices=("finite_difference", "forward", "auto")),
        Key("homo_warmup", 30, "evaluations the warm-up gets (at most half the "
            "budget): fixed-point iteration while it contracts, then Anderson "
            "acceleration (TorchDEQ's, scale-free regularization). With at least twice "
            "this many left, Anderson is skipped if the first step grew most residuals, "
            "hands over earlier when a sample is projected to miss the whole budget, and "
            "after them goes on only while projected to converge within this many more "
            "evaluations. With fewer left (training budgets) the warm-up keeps the budget "
            "and, judging rates from the first call on, each sample switches for good to "
            "Broyden's method when its residual grows or its rate would miss the "
            "tolerance (not in the last 6 calls, Anderson's memory); 0: no warm-up",
            kind=int, check=_non_negative, check_doc=">= 0"),
        Key("homo_newton_iters", 6, "Newton steps at λ = 1 tried first (with dense solves, "
            "those taken with an exact Jacobian; secant steps between are free); a sample "
            "hands over to path tracking after them, or earlier when three exact steps in a "
            "row fail to halve its lowest residual (under GMRES solves: end above it; "
            "0: always track from λ = 0)",
            kind=int, check=_non_negative, check_doc=">= 0"),
        Key("homo_step_init", 0.1, "first path step, as the increase of λ it makes",
            kind=float, check=_positive, check_doc="> 0"),
        Key("homo_step_min", 1e-4, "smallest path step (relative to the first); below it a "
            "sample is marked STEP_UNDERFLOW", kind=float, check=_positive, check_doc="> 0"),
        Key("homo_step_max", 16.0, "largest path step (relative to the first)",
            kind=float, check=_positive, check_doc="> 0"),
        Key("homo_restarts", 2, "new paths a sample may start, from a randomly perturbed "
            "z0, after its step underflows or its endgame at λ = 1 stalls (three exact Newton "
            "steps in a row fail to lower the residual: the path passed near λ = 1 at a "
            "fold, with no root near; a start point whose path is singular is rare, so a "
            "new one almost surely has a regular path)",
            kind=int, check=_non_negative, check_doc=">= 0"),
        Key("homo_corrector_iters", 4, "Newton corrector iterations per path step before the "
            "step is rejected and halved", kind=int, check=_positive, check_doc="> 0"),
        Key("homo_corrector_tol", 1e-3, "corrector tolerance, ||H(z, λ)|| <= tol (1 + ||z||)",
            kind=float, check=_positive, check_doc="> 0"),
        Key("homo_contraction", 0.5, "largest accepted ratio of successive corrector steps; a "
            "larger one rejects the step", kind=float, check=_unit_interval,
            check_doc="in (0, 1)"),
        Key("homo_max_turn", 0.5, "smallest cosine between successive tangents; a sharper "
            "turn (over 60° by default) steps back and shrinks h, against jumping between path "
            "branches",
            kind=float, check=lambda x: -1 < x < 1, check_doc="in (-1, 1)"),
        Key("homo_krylov_dim", 40, "GMRES iterations per linear solve (Krylov dimension)",
            kind=int, check=_positive, check_doc="> 0"),
        Key("homo_krylov_rtol", 1e-2, "GMRES relative residual tolerance of path solves, "
            "and of the first Newton step under homo_forcing='eisenstat_walker'",
            kind=float, check=_unit_interval, check_doc="in (0, 1)"),
        Key("homo_forcing", "eisenstat_walker", "GMRES tolerance of Newton steps at λ = 1: "
            "'eisenstat_walker' (per sample, tight while the residual falls fast, loose while "
            "it falls slowly) or 'constant' (homo_krylov_rtol)",
            choices=("eisenstat_walker", "constant")),
        Key("homo_linear_solver", "auto", "linear solves with I - λJ: 'secant' (a low-rank "
            "Broyden model of J_f per sample, solved by Woodbury; GMRES preconditioned by it "
            "where an exact solve is needed, its products fed back into the model), 'gmres' "
            "(unpreconditioned matrix-free Krylov), 'dense' (J from n products in one vmapped "
            "call, LU; its λ = 1 phase is exact Newton) or 'auto' (n > homo_krylov_dim: as "
            "'secant'; n <= homo_krylov_dim: dense path solves, and at λ = 1 exact Newton "
            "when homo_newton_iters steps of n + 1 evaluations fit in a quarter of the budget, "
            "then Broyden's method from z0 for the samples where Newton stalled; else "
            "Broyden's method first)",
            choices=("auto", "secant", "gmres", "dense")),
        Key("homo_secant_rank", 32, "columns of the secant model per sample (memory "
            "2 n · rank); the oldest is dropped when all are in use",
            kind=int, check=_positive, check_doc="> 0"),
        Key("homo_broyden_memory", None, "under 'auto' and 'secant': secant pairs kept by the "
            "Broyden phase at λ = 1 (None: the evaluation budget, as TorchDEQ's broyden keeps "
            "max_iter of them; none are dropped then, and past 2n they are merged exactly into n "
            "columns)", kind=int, check=lambda x: x is None or x > 0,
            check_doc="> 0 or None"),
        Key("homo_secant_patience", None, "under 'auto' and 'secant': Broyden steps at λ = 1 "
            "without a new lowest residual before a sample counts as stalled; the stalled "
            "samples start on the path once every sample of the batch has stalled (None: a "
            "third of the budget, and above homo_krylov_dim entries only while 32 n "
            "evaluations, a path's typical cost, are left; else Broyden's method goes on)",
            kind=int, check=lambda x: x is None or x > 0,
            check_doc="> 0 or None"),
        Key("homo_strict", False, "raise HomotopyConvergenceError when any sample fails "
            "instead of reporting it in info['status']", kind=bool),
        Key("homo_return", "image", "the state returned for a sample that did not converge: "
            "'image' returns f at its best iterate where the fixed-point or Anderson step "
            "into that iterate shrank distances by f at least twofold (secant ratio < 1/2), "
            "one fixed-point step further, as TorchDEQ's fixed_point_iter and anderson "
            "return for every sample, its residual not evaluated (info['image'] marks "
            "them; info's residuals are the best iterate's); 'best' always returns the best "
            "evaluated iterate. A converged sample always returns its best iterate",
            choices=("image", "best")),
    ]
}

CORE_KEYS: dict[str, Key] = {
    k.name: k
    for k in [
        Key("homo_method", "dopri5", "torchdiffeq method integrating the HomoODE over λ ∈ [0, 1] "
            "('bosh3' with homo_options first_step=0.005 needs fewer evaluations on "
            "GroupNorm cells started at zero; see BENCHMARKS.md)", kind=str),
        Key("homo_rtol", 1e-3, "relative tolerance of the HomoODE integrator",
            kind=float, check=_positive, check_doc="> 0"),
        Key("homo_atol", 1e-3, "absolute tolerance of the HomoODE integrator",
            kind=float, check=_positive, check_doc="> 0"),
        Key("homo_options", None, "torchdiffeq options dict of the integrator "
            "(e.g. {'first_step': 0.005}, or {'step_size': 0.25} for fixed-grid methods)",
            check=_integrator_options,
            check_doc="None or a dict whose step_size and first_step, if given, are > 0"),
        Key("homo_step_memory", True, "adaptive methods start each forward with the step "
            "their controller proposed after the first step of the last training forward "
            "(torchdiffeq's first_step; a homo_options first_step wins) instead of "
            "torchdiffeq's initial-step heuristic, which costs one evaluation and starts "
            "short; False: the heuristic on every forward (the published code's)", kind=bool),
        Key("homo_field", "direct", "vector field: 'direct' dz/dλ = func(z) (the paper's), "
            "'residual' func(z) - z, 'fixed_point' func(z) - z0",
            choices=("direct", "residual", "fixed_point")),
        Key("homo_init", "learned", "initial point: 'learned' (the paper's InitLayer: "
            "GroupNorm(min(32, C)) of a 1×1 convolution on a field of ones, trained toward "
            "the endpoints by the core), 'zeros', or 'given' (the z_init passed to the core)",
            choices=("learned", "zeros", "given")),
        Key("homo_init_lr", 0.02, "SGD learning rate of the learned initial point (the "
            "paper's)",
            kind=float, check=_positive, check_doc="> 0"),
        Key("homo_init_every", 20, "the initial point takes one SGD step, with that forward's "
            "gradient, on the first and every this-many-th training forward (the paper's)",
            kind=int, check=_positive, check_doc="> 0"),
        Key("homo_adjoint", False, "adjoint backward (memory independent of the number of "
            "integrator steps) instead of backpropagation through the integrator; on smooth "
            "cells its gradients equal backpropagation's to the integrator tolerance, on ReLU "
            "cells they converge only as about tol^0.35 (kinks)", kind=bool),
        Key("homo_residual", None, "evaluate func once more at z(1) to report the endpoint's "
            "||func(z) - z|| in info['abs_lowest'] and info['rel_lowest']: True always, False "
            "never (NaN reported), None only outside training (model.eval()), so that a "
            "training step costs the integrator's evaluations alone (the published code's "
            "count; the extra one is about 5 % of a forward)", kind=bool),
    ]
}

ALL_KEYS: dict[str, Key] = {**SOLVER_KEYS, **CORE_KEYS}

def _torchdeq_keys() -> frozenset[str]:
    """Every key TorchDEQ itself reads: the options of its ``add_deq_args`` (read from
    TorchDEQ, so the set follows its version) and ``no_stat``, a keyword of its cores that
    argparse does not carry."""
    from torchdeq.utils import add_deq_args

    parser = argparse.ArgumentParser(add_help=False)
    add_deq_args(parser)
    return frozenset(vars(parser.parse_args([]))) | {"no_stat"}


TORCHDEQ_KEYS: frozenset[str] = _torchdeq_keys()


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_plugin_key(name: str) -> None:
    """Raise :class:`ConfigError` if ``name`` looks like a plugin key but is not one.

    Example:
        >>> check_plugin_key('homo_type')
        >>> check_plugin_key('homo_tpye')
        Traceback (most recent call last):
        ...
        torchdeq_homotopy.config.ConfigError: unknown key 'homo_tpye'. Did you mean 'homo_type'? ...
    """
    if name in ALL_KEYS:
        return
    looks_like_ours = name.startswith(PREFIX) or difflib.get_close_matches(
        name, list(ALL_KEYS), n=1, cutoff=0.8)
    if looks_like_ours:
        raise ConfigError(
            f"unknown key {name!r}.{_suggest(name, ALL_KEYS)} "
            f"Valid plugin keys: {sorted(ALL_KEYS)}."
        )


def resolve(options: Mapping[str, Any], keys: Mapping[str, Key]) -> dict[str, Any]:
    """Validate ``options`` and return every key of ``keys`` with its value or default.

    Keys that belong to the plugin but not to ``keys`` (core keys given to a solver, say)
    are ignored; unknown ``homo_*`` keys and invalid values raise :class:`ConfigError`.

    Example:
        >>> resolve({'homo_type': 'newton'}, SOLVER_KEYS)['homo_type']
        'newton'
    """
    out = {name: key.default for name, key in keys.items()}
    for name, value in options.items():
        check_plugin_key(name)
        if name in keys:
            out[name] = keys[name].validate(value)
    return out


def validate(options: Mapping[str, Any], keys: Mapping[str, Key]) -> dict[str, Any]:
    """Validate ``options`` and return only those of them that belong to ``keys``.

    Example:
        >>> validate({'homo_rtol': 1e-4, 'f_tol': 1e-3}, CORE_KEYS)
        {'homo_rtol': 0.0001}
    """
    out = {}
    for name, value in options.items():
        check_plugin_key(name)
        if name in keys:
            out[name] = keys[name].validate(value)
    return out


def split_options(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a config into (plugin ``homo_*`` keys, everything else), validating the former.

    Example:
        >>> split_options({'homo_type': 'newton', 'f_tol': 1e-4})
        ({'homo_type': 'newton'}, {'f_tol': 0.0001})
    """
    ours, theirs = {}, {}
    for name, value in config.items():
        check_plugin_key(name)
        if name in ALL_KEYS:
            ours[name] = ALL_KEYS[name].validate(value)
        else:
            theirs[name] = value
    return ours, theirs


def check_known_keys(config: Mapping[str, Any], extra: Iterable[str] = ()) -> None:
    """Reject keys that neither TorchDEQ nor this plugin reads, naming the closest match.

    Example:
        >>> check_known_keys({'f_solver': 'homotopy'})
        >>> check_known_keys({'stop_mode': 'abs'})
        Traceback (most recent call last):
        ...
        torchdeq_homotopy.config.ConfigError: unknown key 'stop_mode', ...
    """
    known = set(TORCHDEQ_KEYS) | set(ALL_KEYS) | set(extra)
    for name in config:
        if name not in known:
            raise ConfigError(
                f"unknown key {name!r}, read neither by TorchDEQ nor by torchdeq_homotopy."
                f"{_suggest(name, known)} Known keys: {sorted(known)}."
            )


def registered_solvers() -> list[str]:
    """The names TorchDEQ's ``get_solver`` accepts, sorted. TorchDEQ has no public listing;
    its registry is read here, never written.

    Example:
        >>> import torchdeq_homotopy
        >>> {'anderson', 'homotopy'} <= set(registered_solvers())
        True
    """
    from torchdeq.solver import _solvers

    return sorted(map(str, _solvers))


def _registered_solver(name: str) -> str:
    known = registered_solvers()
    if name not in known:
        raise argparse.ArgumentTypeError(f"unknown solver {name!r}; registered solvers: {known}")
    return name


def _escape(text: str) -> str:
    """Help text for argparse, which reads '%' as a format directive."""
    return text.replace("%", "%%")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_homotopy_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every ``--homo_*`` option to ``parser``, next to TorchDEQ's ``add_deq_args``.

    Also lets ``--f_solver`` and ``--b_solver`` accept any registered solver
    (TorchDEQ's ``add_deq_args`` restricts ``--b_solver`` to its own four names).

    Example:
        >>> import argparse
        >>> from torchdeq.utils import add_deq_args
        >>> parser = argparse.ArgumentParser()
        >>> add_deq_args(parser)
        >>> _ = add_homotopy_args(parser)
        >>> args = parser.parse_args(['--b_solver', 'homotopy', '--homo_type', 'newton'])
        >>> args.b_solver, args.homo_type
        ('homotopy', 'newton')
    """
    registered = ", ".join(registered_solvers())
    # A group whose conflict_handler is 'resolve' replaces TorchDEQ's two solver flags.
    solvers = parser.add_argument_group("solvers (any registered)", conflict_handler="resolve")
    for dest, direction in (("f_solver", "forward"), ("b_solver", "backward")):
        default = parser.get_default(dest)
        if default is not None:                       # added by TorchDEQ's add_deq_args
            solvers.add_argument(f"--{dest}", type=_registered_solver, default=default,
                                 help=f"{direction} solver (default {default}); "
                                      f"registered: {registered}")
    group = parser.add_argument_group("torchdeq_homotopy")
    group.add_argument("--solver", type=_registered_solver, default=None,
                       help=f"sets --f_solver and --b_solver together; registered: {registered}")
    for key in ALL_KEYS.values():
        flag = f"--{key.name}"
        if key.kind is bool:
            group.add_argument(flag, type=_parse_bool, default=key.default, metavar="BOOL",
                               help=f"{_escape(key.doc)} (default {key.default})")
        elif key.name == "homo_options":
            group.add_argument(flag, type=_parse_options, default=None, metavar="K=V,...",
                               help=f"{_escape(key.doc)} (default none)")
        else:
            group.add_argument(flag, type=key.kind or str, default=key.default,
                               choices=key.choices,
                               help=f"{_escape(key.doc)} (default {key.default})")
    return parser


def _parse_options(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        try:
            out[name] = float(value) if any(c in value for c in ".e") else int(value)
        except ValueError:
            out[name] = value
    return out
