"""The path tracker's per-sample state: phases, options, the state record and the models
of f it learns.

Points of the path are y = (z, λ), shape ``(B, n + 1)``; every other field is one value per
sample, so the tracker never loops over samples.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from . import host
from .config import SOLVER_KEYS
from .outcome import Status, _where

if TYPE_CHECKING:
    from .homotopies import FixedPointHomotopy, NewtonHomotopy
    from .linalg import SecantJacobian
    from .secant import InverseBroyden, LowRankJacobian

Tensor = torch.Tensor

# Corrector steps after which an accepted path step refreshes the dense Jacobian.
_SLOW_CORRECTOR = 3
# Exact-Jacobian Newton steps in a row that may fail to halve the lowest residual met so
# far (r_k > _NEWTON_PROGRESS · min_j r_j; under GMRES solves, end above it) before a sample
# counts as stalled. Newton on expansive cells often climbs before it converges (up to
# hundreds of times its best residual, then quadratic convergence); where exact Newton
# converges, each step does halve it.
_PATIENCE = 3

# Step control of the path (torchdiffeq names its equivalents ifactor and dfactor): after
# an accepted step the arclength step h grows by _GROW_FAST when the corrector took at most
# one step, by _GROW_SLOW after two, and shrinks by _SHRINK_SLOW after more.
_GROW_FAST, _GROW_SLOW, _SHRINK_SLOW = 2.0, 1.25, 0.8
# A rejected corrector, or a failed tangent solve, retries with h · _RETRY_FACTOR; a tangent
# that turned too sharply steps back to the previous anchor with h · _TURN_FACTOR.
_RETRY_FACTOR, _TURN_FACTOR = 0.5, 0.25
# A Newton step under a secant Jacobian that leaves more than _NEWTON_PROGRESS of the
# residual asks for the exact Jacobian.
_NEWTON_PROGRESS = 0.5
# A path within this distance of λ = 1 goes to the endgame.
_END_GAP = 1e-3
# The endgame's step length α halves after each rejected exact step; below this the endgame
# has stalled (three exact steps in a row, net of accepted ones, failed to lower its
# residual) and the sample starts a new path, as after a step underflow.
_MIN_DAMPING = 2.0 ** -2
# A path whose solves are not dense (n > homo_krylov_dim) costs about this many evaluations
# per state entry from λ = 0 until it stays at λ = 1: median 2,269 evaluations at n = 64
# (35 n) and 4,068 at n = 128 (32 n); at n = 512, 39 of 42 paths unfinished after 20,000
# (tanh cells, ‖W‖₂ 4.5-8, seeds 201-203 and 320; BENCHMARKS.md, "Broyden's stall and the
# path's cost").
_PATH_EVALS_PER_ENTRY = 32


class Phase(enum.IntEnum):
    """What a sample does in the current iteration of the tracker (the module docstring of
    :mod:`torchdeq_homotopy.path` describes each): Newton or Broyden steps at λ = 1, a
    tangent or corrector step on the path, the endgame at λ = 1, or nothing (done).

    Example:
        >>> Phase.CORRECT > Phase.TANGENT, Phase(4).name
        (True, 'DONE')
    """

    NEWTON = 0
    TANGENT = 1
    CORRECT = 2
    ENDGAME = 3
    DONE = 4


def _default(key: str) -> Any:
    """A tracker option's default: the one of its ``homo_*`` key (the single source)."""
    return field(default=SOLVER_KEYS[key].default)


@dataclass
class TrackerOptions:
    """Numerical options of the tracker: the ``homo_*`` solver keys without their prefix,
    with the keys' defaults
    (:data:`~torchdeq_homotopy.config.SOLVER_KEYS`); ``track=False`` is Newton–Krylov alone.
    """

    type: str = _default("homo_type")
    predictor: str = _default("homo_predictor")
    ode_method: str = _default("homo_ode_method")
    jvp: str = _default("homo_jvp")
    newton_iters: int = _default("homo_newton_iters")
    track: bool = True
    step_init: float = _default("homo_step_init")
    step_min: float = _default("homo_step_min")
    step_max: float = _default("homo_step_max")
    corrector_iters: int = _default("homo_corrector_iters")
    corrector_tol: float = _default("homo_corrector_tol")
    contraction: float = _default("homo_contraction")
    max_turn: float = _default("homo_max_turn")
    krylov_dim: int = _default("homo_krylov_dim")
    krylov_rtol: float = _default("homo_krylov_rtol")
    forcing: str = _default("homo_forcing")
    linear_solver: str = _default("homo_linear_solver")
    secant_rank: int = _default("homo_secant_rank")
    secant_patience: int | None = _default("homo_secant_patience")
    broyden_memory: int | None = _default("homo_broyden_memory")
    restarts: int = _default("homo_restarts")

    @classmethod
    def from_keys(cls, opts: dict[str, Any], track: bool, max_iter: int) -> TrackerOptions:
        """From resolved ``homo_*`` solver keys. The keys the tracker does not read
        (``homo_strict``, ``homo_warmup``, ``homo_return``) are dropped; Newton–Krylov
        (``track=False``) takes Newton steps for the whole budget, with GMRES under
        ``'auto'``."""
        taken = {k[len("homo_"):]: v for k, v in opts.items()
                 if k not in ("homo_strict", "homo_warmup", "homo_return")}
        options = cls(**taken, track=track)
        if not track:
            options.newton_iters = max_iter
            if options.linear_solver == "auto":
                options.linear_solver = "gmres"
        return options


def _maybe_any(mask: Tensor) -> bool:
    """False only when ``mask`` is known to be empty: checked on CPU, where the host check
    costs less than the masked updates it skips; assumed True on accelerators, where it
    would be a device sync."""
    return not host.reads_cheap(mask) or bool(mask.any())


def _e_lambda(like: Tensor) -> Tensor:
    """The unit vector along λ for every row of a ``(B, n + 1)`` batch of points."""
    e_lam = torch.zeros_like(like)
    e_lam[:, -1] = 1
    return e_lam


def _unit(y: Tensor) -> Tensor:
    return y / y.norm(dim=1, keepdim=True).clamp_min(1e-30)


@dataclass(frozen=True)
class PathGeometry:
    """Where each sample is on its path. Points are y = (z, λ), shape ``(B, n + 1)``."""

    y: Tensor             # current point: where f is evaluated next
    anchor: Tensor        # last accepted point of the path
    tangent: Tensor       # unit tangent at the anchor (e_λ before the first tangent)
    anchor_prev: Tensor   # the accepted point before the anchor, and its tangent, to
    tangent_prev: Tensor  # step back to when the path turns too sharply
    pred: Tensor          # predicted point of the current step
    step: Tensor          # arclength step h
    step_unit: Tensor     # h of the first path step; h_min and h_max are relative to it


@dataclass(frozen=True)
class CorrectorState:
    """The corrector of the current path step."""

    steps: Tensor         # corrector iterations of the current step
    dnorm: Tensor         # ||δ|| of the last corrector step
    dnorm_prev: Tensor    # ||δ|| of the one before
    retried: Tensor       # the step was already retried with an exact Jacobian


@dataclass(frozen=True)
class NewtonState:
    """The NEWTON phase at λ = 1 (exact Newton, or Broyden's method under the secant model)."""

    steps: Tensor         # exact-Jacobian Newton steps taken
    res_prev: Tensor      # residual before the last Newton step
    h_prev: Tensor        # ||H|| at the last Newton step, and that step's GMRES
    forcing: Tensor       # tolerance η (Eisenstat–Walker)
    lowest: Tensor        # lowest residual met in this phase
    worse_in_row: Tensor  # exact steps in a row that did not halve ``lowest`` (Broyden's
    #                       steps: that set no new ``lowest``)
    endgame_step: Tensor  # the last step was an endgame step (judged at its evaluation)
    damping: Tensor       # endgame step length α ∈ [_MIN_DAMPING, 1]
    end_res: Tensor       # the endgame's lowest residual (stop mode; inf outside it), and
    end_abs: Tensor       # its ||z - f(z)||, the point z where it was met and f(z) there:
    end_z: Tensor         # where a rejected endgame step goes back to (the solve's best
    end_fz: Tensor        # iterate may lie elsewhere, e.g. where Broyden's method stalled)


@dataclass(frozen=True)
class JacobianState:
    """What the last linear solve used, and what the next one needs."""

    solve_failed: Tensor  # the last linear solve gave non-finite values
    exact: Tensor         # the last linear solve used an exact Jacobian
    stale: Tensor         # the next solve needs an exact Jacobian


@dataclass(frozen=True)
class _State:
    """Per-sample state of the tracker: phase and status, and four sub-records. Records are
    immutable: every transition returns a new state (``dataclasses.replace``), sharing the
    tensors it did not change."""

    phase: Tensor         # Phase per sample
    status: Tensor        # Status per sample
    path: PathGeometry
    corrector: CorrectorState
    newton: NewtonState
    jacobian: JacobianState
    needs_restart: Tensor  # the step underflowed or λ went below 0: restart or give up
    restarts: Tensor      # paths restarted from a perturbed start point

    @classmethod
    def start(cls, x0: Tensor, newton_first: bool) -> _State:
        """Every sample at (x0, 1) in NEWTON, or at (x0, 0) waiting for its first tangent."""
        bsz = x0.shape[0]
        lam = torch.ones(bsz, 1, dtype=x0.dtype, device=x0.device)
        y0 = torch.cat([x0, lam if newton_first else 0 * lam], dim=1)
        e_lam = _e_lambda(y0)
        inf = torch.full((bsz,), float("inf"), dtype=x0.dtype, device=x0.device)
        zeros_i = torch.zeros(bsz, dtype=torch.long, device=x0.device)
        false = torch.zeros_like(zeros_i, dtype=torch.bool)
        path = PathGeometry(
            y=y0, anchor=torch.cat([x0, 0 * lam], dim=1), tangent=e_lam,
            anchor_prev=torch.cat([x0, 0 * lam], dim=1), tangent_prev=e_lam.clone(),
            pred=y0.clone(), step=torch.zeros_like(inf), step_unit=torch.zeros_like(inf))
        return cls(
            phase=torch.full_like(zeros_i, int(Phase.NEWTON if newton_first else Phase.TANGENT)),
            status=torch.full_like(zeros_i, int(Status.RUNNING)), path=path,
            corrector=CorrectorState(steps=zeros_i.clone(), dnorm=inf.clone(),
                                     dnorm_prev=inf.clone(), retried=false.clone()),
            newton=NewtonState(steps=zeros_i.clone(), res_prev=inf.clone(), h_prev=inf.clone(),
                               forcing=torch.zeros_like(inf), lowest=inf.clone(),
                               worse_in_row=zeros_i.clone(), endgame_step=false.clone(),
                               damping=torch.ones_like(inf), end_res=inf.clone(),
                               end_abs=inf.clone(), end_z=x0, end_fz=x0),
            jacobian=JacobianState(solve_failed=false.clone(), exact=~false, stale=~false),
            needs_restart=false.clone(), restarts=zeros_i.clone())

    def finish(self, mask: Tensor, status: Status) -> _State:
        """The samples in ``mask`` end with ``status`` (phase DONE)."""
        return replace(self, status=self.status.masked_fill(mask, int(status)),
                       phase=self.phase.masked_fill(mask, int(Phase.DONE)))

    def begin_step(self, mask: Tensor, pred: Tensor) -> _State:
        """The samples in ``mask`` start the corrector of a path step at the predicted
        point ``pred``: y = y_p, no corrector step taken yet."""
        if not _maybe_any(mask):
            return self
        path = replace(self.path, pred=_where(mask, pred, self.path.pred),
                       y=_where(mask, pred, self.path.y))
        corrector = self.corrector
        corrector = replace(corrector, steps=corrector.steps.masked_fill(mask, 0),
                            dnorm=corrector.dnorm.masked_fill(mask, float("inf")),
                            dnorm_prev=corrector.dnorm_prev.masked_fill(mask, float("inf")))
        return replace(self, path=path, corrector=corrector,
                       phase=self.phase.masked_fill(mask, int(Phase.CORRECT)))

    def with_phase(self, mask: Tensor, phase: Phase) -> _State:
        """The samples in ``mask`` move to ``phase``."""
        return replace(self, phase=self.phase.masked_fill(mask, int(phase)))


@dataclass
class JacobianModels:
    """What the tracker learns about f during one solve, carried by its loop beside the
    state: the homotopy, and the models of J_f its linear solves use.

    Unlike the state's records, these are buffers updated in place (O(m n) per sample for
    the secant models, as TorchDEQ's Broyden keeps its own); each is built when a phase
    first needs it.
    """

    linear_solver: str            # path solves: 'dense', 'secant' or 'gmres' ('auto' resolved)
    broyden_newton: bool          # the NEWTON phase is Broyden's method (else exact Newton)
    homotopy: FixedPointHomotopy | NewtonHomotopy   # until a sample leaves λ = 1 a Newton
    #                               homotopy with G(z0) = 0 stands in; built with f(z0)
    dense: SecantJacobian         # dense solves: J_f, Broyden-updated between refreshes
    jvp_mode: str                 # how Jacobian-vector products are taken (may fall back)
    broyden_next: bool = False    # stalled exact Newton hands over to Broyden's method
    fz0: Tensor | None = None     # f(z0), once the path's homotopy is built
    x0_fz: Tensor | None = None   # f(z0) if an earlier phase evaluated it (free then)
    low_rank: LowRankJacobian | None = None   # secant solves: J_f ≈ U Vᵀ per sample
    broyden: InverseBroyden | None = None     # secant solves' NEWTON phase (Broyden)
    broyden_rows: Tensor | None = None        # the samples in it at its last step
    generator: torch.Generator | None = None  # the restarts' perturbations (fixed seed)
    krylov_solves: int = 0        # GMRES solves run, and the products they made
    krylov_products: int = 0
