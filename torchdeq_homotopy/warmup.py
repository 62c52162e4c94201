"""The homotopy solver's cheap first phase: fixed-point iteration while it is projected to
converge in time, then Anderson acceleration (TorchDEQ's, with a scale-free regularization),
which hands the batch back to fixed-point steps where its measured rate does not pay for its
cost.

On benign cells this solves everything at the cost of the cheapest TorchDEQ solver; on
the rest it leaves a best iterate (kept in the solve's :class:`~torchdeq_homotopy.outcome.Record`)
and a start for Newton. At training budgets it keeps the whole budget instead, and the
batch leaves Anderson for Broyden's method where a sample's residual grows or stalls
(``AndersonIteration(switch=True)``). Both phases are iterations
(:class:`FixedPointIteration`, :class:`AndersonIteration`) run by the solve's one driving loop,
:func:`~torchdeq_homotopy.iteration.drive`, over a :class:`WarmupLoop` carry.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .iteration import drive
from .outcome import Record, Status, TrackerResult, by_stop_mode
from .step_broyden import StepBroyden

Tensor = torch.Tensor


@dataclass
class Warmup:
    """What the warm-up leaves: its record of every evaluation (the budget and best
    iterate included), where Newton starts, with f there, f at x0 (the path's start;
    both already evaluated), and the samples where that f is not finite (``hopeless``)."""

    record: Record
    newton_start: Tensor
    newton_start_fz: Tensor
    x0_fz: Tensor
    hopeless: Tensor

    def solved(self, tol: float) -> bool:
        """Whether every sample's best iterate meets the tolerance, or is hopeless (f(x0) not
        finite: no phase can start from x0; the solver reports them NONFINITE) (one host
        sync)."""
        met = self.record.best.residual(self.record.stop_mode) <= tol
        return bool((met | self.hopeless).all())

    def result(self) -> TrackerResult:
        """The solve's result when the warm-up left nothing for the tracker: every sample
        MAX_EVALS (the solver marks those whose best meets the tolerance CONVERGED) at λ = 1."""
        step = self.record.best.step
        return self.record.result(
            status=torch.full_like(step, int(Status.MAX_EVALS), dtype=torch.long),
            lam=torch.ones_like(step))


PROGRESS_WINDOW = 5
"""Calls over which the warm-up measures a method's rate of progress."""

SWITCH_SHARE = 0.5
"""Share of the calls left within which each open row's Anderson rate over ``SWITCH_WINDOW``
calls must be projected to reach the tolerance for the batch to stay on Anderson at
training budgets (:meth:`AndersonIteration._judge`; chosen, with ``SWITCH_WINDOW``, when
rows switched one at a time, an earlier round's rule). Such a rate is optimistic: Anderson's fast
modes die first and its rate then slows, so a row projected to need all the calls left
usually needs more, and switching it later leaves Broyden's method too few calls for its
superlinear end. The first judgement, on a one-call rate (a fixed-point step, before
Anderson holds a secant pair), keeps all the calls left: there the half share switched
181–197 of 256 rows of ``benchmarks/parity.py``'s ``slow`` cell that Anderson solves, at
1.4–1.6× the time. Against all the calls left everywhere, on ``examples/unstable_deq.py``'s
model (``benchmarks/training_snapshots.py``, every solver on the same snapshots,
seeds 8–9) the forwards meeting the tolerance at 30 / 40 / 60 calls went from 0.8043 /
0.9754 / 0.9945 to 0.8129 / 0.9754 / 0.9953 (Broyden's at equal evaluations 0.8094 /
0.9723 / 0.9957; BENCHMARKS.md, "Warm-up hand-over at moderate budgets")."""
SWITCH_WINDOW = 2
"""Calls over which a row's Anderson rate is judged for the switch to Broyden's
method at training budgets (:meth:`AndersonIteration._judge`). Shorter than
``PROGRESS_WINDOW``: with 30–60 calls in all, waiting five calls to judge a row costs a
sixth of the budget. On hard 64-wide cells at equal evaluations it raised the solved
fraction at 30 / 40 / 60 calls from 0.136 / 0.375 / 0.670 to 0.147 / 0.380 / 0.678 (seeds
400–405, never used for the choice; chosen on 300–305 against a window of 3), and changed
no benign training-budget solve of ``benchmarks/parity.py`` (BENCHMARKS.md, "Warm-up
hand-over at moderate budgets"). At training budgets the fixed-point phase before it is
judged over this window too, and both judge from the first step on, over the calls known
while fewer are: a row whose first step contracts too slowly for the calls left leaves at
once, instead of after steps that only confirm it. On the same cells (on which its
fixed-point part was chosen) this raised 0.147 / 0.380 / 0.678 to 0.163 / 0.392 / 0.686
(Broyden's iterates, ``homo_warmup=0``: 0.164 / 0.397 / 0.682), and on seeds 500–505
(never used for a choice) 0.145 / 0.420 / 0.707 to 0.150 / 0.429 / 0.709 (Broyden's
iterates 0.151 / 0.433 / 0.714); design seeds 300–302: the same total."""


ANDERSON_GAIN = 1.25
"""How many times fewer calls Anderson must be projected to need than plain fixed-point
steps to keep (or take back) the batch (:meth:`AndersonIteration._choose`): its step costs
a Gram matrix and a bordered solve besides f, about 0.17 ms per call on a 512-wide batch of
8 on the CI machine, where f took 0.11 ms. Chosen a priori and checked on the size sweep's
benign cells of seeds 240 and 250 (BENCHMARKS.md, "Anderson or fixed-point steps")."""


SPARSE_PROJECTION_SHARE = 0.01
"""The largest share of the calls left that projecting rates once per window instead of
at every call may delay a hand-over by (:func:`projects`)."""


def projects(calls: int, left: int | float, window: int) -> bool:
    """Whether the warm-up projects its rates after ``calls`` calls with ``left`` left:
    once per ``window`` calls (when ``calls`` is a multiple of it) while the window − 1
    calls a hand-over may come late are at most ``SPARSE_PROJECTION_SHARE`` of the calls
    left; at every call once fewer are left, where each call counts.

    A projection costs about a dozen operations on per-sample tensors: 0.1 ms per call on
    the CI machine, as much as f itself on a 128-wide tanh cell at batch 8, while the rate
    it projects moves little from one call to the next.

    Example:
        >>> [projects(c, left=1000, window=5) for c in (9, 10)]
        [False, True]
        >>> projects(9, left=100, window=5)      # 4 calls late would be 4 % of 100
        True
    """
    return not calls % window or (window - 1) > SPARSE_PROJECTION_SHARE * left


def _known_window(history: Sequence[Tensor]) -> int:
    """The window of a rate judged from the first step on at training budgets: the last
    ``SWITCH_WINDOW`` steps, or all of those known while fewer are (at least one)."""
    return max(1, min(SWITCH_WINDOW, len(history) - 1))


def horizon(calls_left: int, reserve: int) -> float:
    """Calls within which a slowly converging warm-up method must be projected to
    converge to keep the budget: ``reserve``, so that a slow method never holds a large
    budget that Broyden's method or the path would use better; but unbounded (it keeps
    the budget while it makes progress at all) once fewer than 2 · ``reserve`` calls are
    left, too few for the next phase to catch up, or when no calls are reserved.

    Example:
        >>> horizon(calls_left=500, reserve=30), horizon(calls_left=40, reserve=30)
        (30.0, inf)
        >>> horizon(calls_left=500, reserve=0)
        inf
    """
    return float("inf") if calls_left < 2 * reserve or reserve <= 0 else float(reserve)


def on_time(history: list[Tensor], tol: float, within: float,
            window: int = PROGRESS_WINDOW) -> Tensor:
    """Per sample, whether the residual's geometric rate over the last
    w = min(``window``, steps known) steps, ρ = (r_k / r_{k−w})^{1/w}, reaches ``tol``
    within ``within`` calls (ρ < 1 suffices while fewer than ``window`` steps are known:
    one step says too little to project):

        r_k ≤ tol   or   r_k ρ^within ≤ tol,

    the residual projected ``within`` calls on. For an open sample (r_k > tol) this is
    log(tol / r_k) / log ρ ≤ within with ρ < 1 (a rate ρ ≥ 1 never projects below r_k),
    without the logarithms: at the small states of a training forward each operation
    costs about as much as its arithmetic.

    Example:
        >>> halving = [torch.tensor([0.5 ** k]) for k in range(6)]
        >>> on_time(halving, 1e-3, 5).item(), on_time(halving, 1e-3, 4).item()
        (True, False)
    """
    known = min(window, len(history) - 1)
    now = history[-1]
    ratio = now / history[-1 - known]           # ρ^w
    if known < window:
        return ratio < 1
    return (now <= tol) | (now * ratio.pow(within / known) <= tol)


def geometric_rate(history: Sequence[Tensor]) -> Tensor:
    """Per sample, the residual's geometric rate per call over ``history`` (residuals after
    consecutive calls, oldest first): ρ = (r_k / r_0)^{1/k}.

    Example:
        >>> geometric_rate([torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([0.25])])
        tensor([0.5000])
    """
    return (history[-1] / history[0]).pow(1.0 / (len(history) - 1))


def calls_needed(now: Tensor, rate: Tensor, tol: float) -> Tensor:
    """The calls the slowest open sample needs to reach ``tol`` from residual ``now`` at
    per-call rate ``rate``,

        calls = max over samples with r > tol of log(tol / r) / log ρ,

    inf where an open sample does not contract (ρ ≥ 1), 0 when none is open (a 0-d tensor:
    no host sync).

    Example:
        >>> round(calls_needed(torch.tensor([0.1, 0.5]), torch.tensor([0.1, 0.5]), 1e-3).item(), 2)
        8.97
        >>> calls_needed(torch.tensor([1.0]), torch.tensor([1.0]), 1e-3).item()
        inf
    """
    needed = torch.log(tol / now) / torch.log(rate)
    needed = torch.where(rate < 1, needed, torch.full_like(needed, float("inf")))
    return needed.masked_fill(now <= tol, 0.0).amax()


@dataclass
class ProgressRule:
    """When Anderson hands the unconverged samples over to the next phase.

    Anderson gets ``guaranteed`` calls of f, unless at least 2 · ``reserve`` > 0 calls are
    left and an open sample is projected (:func:`on_time`, over the last ``window`` calls) not to
    reach ``tol`` within all of them: then the budget is better spent by the next phase.
    After the guarantee it continues while every open sample's best residual is projected
    to reach ``tol`` within the :func:`horizon` of the calls left: a benign cell keeps the
    accelerator that is solving it, as TorchDEQ's Anderson would with the whole budget; a
    stalled or slow one hands over to Broyden's method and the path. At training budgets
    (fewer than 2 · ``reserve`` calls left) the guarantee is unconditional.

    With many calls left, rates are projected once per ``window`` calls, and between
    projections only convergence is checked (:func:`projects`).

    Example:
        >>> rule = ProgressRule(guaranteed=2, budget=1000, tol=1e-3, reserve=5, window=2)
        >>> history = [torch.tensor([1.0]), torch.tensor([0.1]), torch.tensor([0.01])]
        >>> rule.hand_over(4, history)     # rate 0.1 per call: one more call suffices
        False
        >>> stalled = history + [torch.tensor([0.01])] * 2
        >>> rule.hand_over(5, stalled), rule.hand_over(6, stalled)   # judged at even calls
        (False, True)
    """

    guaranteed: int
    budget: int
    tol: float
    reserve: int = 0
    window: int = PROGRESS_WINDOW

    def hand_over(self, calls: int, recent: Sequence[Tensor]) -> bool:
        """After ``calls`` calls of f; ``recent``: the best residual per sample after each
        of the last calls, oldest first (at least ``window`` + 1 of them once that many
        calls were made). One host sync per call, as TorchDEQ's Anderson's own test."""
        return bool(self.verdict(calls, recent))

    def verdict(self, calls: int, recent: Sequence[Tensor]) -> Tensor:
        """:meth:`hand_over` as a 0-d bool tensor, read by the caller (no host sync)."""
        open_ = recent[-1] > self.tol
        left = self.budget - calls
        if not projects(calls, left, self.window):    # between projections: convergence
            return ~open_.any()
        if calls < max(self.guaranteed, self.window + 1):
            # Within the guarantee Anderson goes on unless, with budget to spare for the
            # next phase, a sample is projected to miss the whole budget at its rate.
            if not 0 < 2 * self.reserve <= left or calls <= self.window:
                return ~open_.any()
            within = float(left)
        else:
            within = horizon(left, self.reserve)
        late = open_ & ~on_time(list(recent)[-1 - self.window:], self.tol, within,
                                self.window)
        return late.any() | ~open_.any()


@dataclass
class WarmupLoop:
    """The warm-up's carry: the solve's record, the best residual after each of the last
    calls, and the fixed-point phase's last image f(z) and verdicts (whether it is too
    slow to go on, whether the map expands)."""

    record: Record
    tol: float
    fz: Tensor                       # fixed-point phase: f at its last iterate z
    z: Tensor
    prev_z: Tensor | None            # and the iterate before z (None before a step)
    first_z: Tensor                  # x0, and f and the residual there
    first_fz: Tensor
    first_res: Tensor
    hopeless: Tensor                 # rows where f(x0) is not finite: never open
    any_hopeless: bool = True        # whether any row is (read with the first verdicts)
    best_recent: deque[Tensor] = field(
        default_factory=lambda: deque(maxlen=PROGRESS_WINDOW + 1))
    history: deque[Tensor] = field(  # fixed-point phase: residuals of its last iterates
        default_factory=lambda: deque(maxlen=PROGRESS_WINDOW + 1))
    open_any: bool = True            # fixed-point phase: some sample above tol
    slow: bool = False
    expanding: bool = False

    @property
    def calls(self) -> int:
        """Evaluations of f so far."""
        return self.record.budget.used


def _evaluate(f: Callable[[Tensor], Tensor], loop: WarmupLoop, z: Tensor,
              mixing: Tensor | bool = True) -> tuple[Tensor, Tensor]:
    """f at z, counted and recorded (``mixing``: the rows that reached z by a fixed-point
    or Anderson step, :meth:`~torchdeq_homotopy.outcome.Record.add`); returns (f(z), the
    residual of the stop mode, 0 on hopeless rows)."""
    loop.record.budget.spend()
    fz = f(z)
    abs_res, rel_res = loop.record.add(z, fz, mixing=mixing)
    loop.best_recent.append(_closed(loop.record.best.residual(loop.record.stop_mode), loop))
    return fz, _closed(by_stop_mode(loop.record.stop_mode, abs_res, rel_res), loop)


def _closed(residual: Tensor, loop: WarmupLoop) -> Tensor:
    """The residual as the warm-up's rules read it: 0 on hopeless rows (f(x0) not finite),
    which no phase can solve, so that they never hold the batch's iteration open or count
    as stalled or slow (the residual itself where no row is hopeless)."""
    return residual.masked_fill(loop.hopeless, 0.0) if loop.any_hopeless else residual


class FixedPointIteration:
    """z_{k+1} = f(z_k) while it pays, judged per step on each unconverged sample's
    residual r (one host sync per step, as TorchDEQ's own iteration): it goes on while
    every open sample's rate reaches the tolerance within the calls left, their
    :func:`horizon` and 2n calls for states of n entries (:func:`on_time`; Broyden's
    method solves a linear system of n unknowns in at most 2n steps, Gay 1979, and on
    states of 2–8 entries it needed 5–10 calls where fixed-point iteration took 10–30:
    BENCHMARKS.md, "Random benign problems at small budgets"). However fast a sample
    contracts, iteration that is
    projected to miss the tolerance hands over to the accelerators: at budget 20 and
    tolerance 1e-6, fixed-point iteration at a rate of 0.5 per call, held while it
    contracted faster than 0.7, ended above the tolerance where Broyden's method solved
    (BENCHMARKS.md, "Random benign problems at small budgets"). The rate is taken over
    ``PROGRESS_WINDOW`` steps, with any fall of the residual enough until that many are
    known, then, with many calls left, once per window (:func:`projects`; between
    projections only convergence is checked); with ``training`` (a budget of at most
    2 · ``reserve`` calls) over ``SWITCH_WINDOW``, projected at every step from the first
    on (:func:`_known_window`). The map
    expands at x0 when the first step grew the residual, r_1 > r_0 (judged on
    ||f(z) − z||), for at least half the open samples.

    Example:
        >>> from torchdeq_homotopy.outcome import Budget
        >>> record = Record.start(torch.zeros(1, 16), Budget(50), 'abs')
        >>> fixed_point = FixedPointIteration(lambda z: 0.5 * z + 1, reserve=30)
        >>> loop = drive(fixed_point, fixed_point.init(record, torch.zeros(1, 16), 1e-6))
        >>> loop.record.best.abs_res.item() <= 1e-6, loop.calls   # on time: 23 calls
        (True, 23)
        >>> x0 = torch.zeros(1, 16, dtype=torch.float64)
        >>> record = Record.start(x0, Budget(500), 'abs')
        >>> loop = drive(fixed_point, fixed_point.init(record, x0, 1e-12))
        >>> loop.slow, loop.calls          # 40 calls needed, 30 allowed: hands over
        (True, 6)
    """

    def __init__(self, f: Callable[[Tensor], Tensor], reserve: int,
                 training: bool = False) -> None:
        self.f, self.reserve, self.training = f, reserve, training

    def init(self, record: Record, x0: Tensor, tol: float) -> WarmupLoop:
        """f at x0."""
        record.budget.spend()
        fz = self.f(x0)
        abs_res, rel_res = record.add(x0, fz)
        hopeless = ~torch.isfinite(abs_res)
        loop = WarmupLoop(record=record, tol=tol, fz=fz, z=x0, prev_z=None, first_z=x0,
                          first_fz=fz, first_res=abs_res, hopeless=hopeless)
        loop.best_recent.append(_closed(record.best.residual(record.stop_mode), loop))
        return self._judge(loop, _closed(by_stop_mode(record.stop_mode, abs_res, rel_res),
                                         loop), abs_res)

    def step(self, loop: WarmupLoop) -> WarmupLoop:
        """z ← f(z)."""
        loop.prev_z, loop.z = loop.z, loop.fz
        loop.fz, stop = _evaluate(self.f, loop, loop.z)
        return self._judge(loop, stop, loop.record.abs_trace[-1])

    def terminate(self, loop: WarmupLoop) -> bool:
        return not loop.open_any or loop.slow or loop.record.budget.left <= 0

    def _judge(self, loop: WarmupLoop, stop: Tensor, abs_res: Tensor) -> WarmupLoop:
        """Whether the last step left samples open, was too slow, or expanded the map."""
        history, tol = loop.history, loop.tol
        history.append(stop)
        open_ = stop > tol
        slow = torch.zeros((), dtype=torch.bool, device=stop.device)
        # at training budgets every step is judged; else every step until the window is
        # full, then once per window (:class:`ProgressRule`)
        projected = (self.training or len(history) <= PROGRESS_WINDOW + 1
                     or projects(loop.calls - 1, loop.record.budget.left, PROGRESS_WINDOW))
        if len(history) > 1 and projected:
            left = loop.record.budget.left
            # the accelerator that follows beats slow iteration: no unbounded horizon, and
            # none past 2n calls, within which Broyden's method solves linear systems
            within = min(left, horizon(left, self.reserve), 2 * loop.z.shape[1])
            known = _known_window(history) if self.training else PROGRESS_WINDOW
            slow = (open_ & ~on_time(list(history), tol, within, known)).any()
        verdicts = [slow, open_.any()]
        if loop.calls == 1:      # whether any row is hopeless: if none, none is closed again
            verdicts.append(loop.hopeless.any())
        if loop.calls == 2:      # the first step grew the residual of half the open samples
            verdicts.append(2 * (open_ & (abs_res > loop.first_res)).sum() >= open_.sum())
        # every verdict in one read of the device (one host sync per step)
        loop.slow, loop.open_any, *extra = torch.stack(verdicts).tolist()
        if loop.calls == 1:
            loop.any_hopeless = extra[0]
        loop.expanding = loop.slow and loop.calls == 2 and extra == [True]
        return loop


@dataclass
class AndersonLoop:
    """Anderson's carry: the warm-up loop, TorchDEQ's ring buffers of the last ``m``
    iterates X and their images F (written in place, as TorchDEQ's), and the count k of
    iterates so far; with ``switch=True``, each row's last few residuals and, once the
    batch has left Anderson, Broyden's ``model`` of it, holding up to ``columns`` steps."""

    warm: WarmupLoop
    X: Tensor
    F: Tensor
    gram: Tensor       # the bordered Gram matrix [0 1ᵀ; 1 GGᵀ + λ s I]
    rhs: Tensor        # e_0
    k: int
    recent: deque[Tensor] = field(
        default_factory=lambda: deque(maxlen=SWITCH_WINDOW + 1))
    model: StepBroyden | None = None
    columns: int = 0   # steps a Broyden model may take: the calls left, and its first
    open_any: bool = True   # some row above tol after the last call (``switch=True``)
    plain: bool = False     # fixed-point steps instead of Anderson's (:meth:`_choose`)
    since: int = 0          # calls of f when the current method began
    rival: Tensor | None = None   # per row, the rate of the method left
    rate: Tensor | None = None    # per row, the current method's rate at the last judgement
    leave: Tensor | None = None   # 0-d: whether to change method, read in ``terminate``


class AndersonIteration:
    """Anderson acceleration as TorchDEQ's ``anderson_solver`` (memory m = 6,
    undamped), with its regularization made scale-free: with the residuals
    G = F − X of the last n = min(k, m) iterates, the weights α solve

        [0  1ᵀ; 1  GGᵀ + λ s I] [β; α] = [1; 0],     z_{k+1} = Σ_i α_i f(x_i),

    s = mean_i ||g_i||² (``relative=True``), after a first fixed-point step x_1 = f(x_0).
    TorchDEQ's s = 1 (``relative=False``, its iterates exactly) lets λ = 1e-4 dominate
    GGᵀ once the residuals fall near 1e-2, and Anderson then slows to a crawl; with
    s = mean ||g_i||² the iterates do not depend on the scale of f (f → c f(·/c) gives
    c z_k). It stops when the budget is spent or ``rule`` hands the open samples over to
    the next phase (:class:`ProgressRule`).

    With ``switch=True`` (training budgets) the batch leaves Anderson at the first call
    where an open row is late: its residual grew in a step, r_k > r_{k−1}, or its rate
    over the last ``SWITCH_WINDOW`` calls (over the calls known, from the first step on,
    while fewer are) does not reach the tolerance within half the calls left
    (``SWITCH_SHARE``; all of them for the first, one-call rate) (:func:`on_time`). From
    then on every row takes Broyden's good steps,

        z_{k+1} = z_k + W_k (f(z_k) − z_k),      W ≈ (I − J_f)⁻¹,

    (:class:`~torchdeq_homotopy.step_broyden.StepBroyden`, storing only its steps), each
    row's W_0 the good updates of W = I with its own last n Anderson iterates as secant
    pairs (s, y) = (x_i − x_{i−1}, f(x_i) − f(x_{i−1})), in one compact update
    (:func:`~torchdeq_homotopy.secant.compact_inverse`). The batch does not switch once m
    or fewer calls are left. Each call runs one method's operations: at the small states
    of a training forward a call's overhead is its number of operations, and rows that
    left Anderson one group at a time (the rule of earlier rounds) made every later call
    pay for Anderson's weights and Broyden's step both, and each group for its own
    compact update. On the README main job's DEQ through training
    (``benchmarks/main_job_forwards.py``) that took 1.41× Anderson's time, against 1.06×
    switched as a batch (same run), at 25–31 calls either way; with the same solved
    fractions to ±0.007 on hard 64-wide cells at 30 / 40 / 60 calls
    (``benchmarks/moderate_budget.py``; seeds 300–305 chose, 700–705 confirmed), on a
    hard-equilibria DEQ's training forwards (``benchmarks/training_snapshots.py``, seeds
    5–7 and 12–13, within 0.002) and on every benign solve of ``benchmarks/parity.py``
    (BENCHMARKS.md, "Switching as a batch").

    Where the warm-up's fixed-point phase ran first, Anderson must earn its cost: every
    ``PROGRESS_WINDOW`` calls its measured rate is set against fixed-point iteration's, and
    the batch takes plain fixed-point steps x_k = f(x_{k−1}) (writing the same buffers, so
    Anderson can take them back) where Anderson is not projected to save
    ``ANDERSON_GAIN`` times the calls (:meth:`_choose`).

    Example:
        >>> from torchdeq_homotopy.outcome import Budget
        >>> f = lambda z: 0.95 * z + 0.05 * torch.arange(3.0)   # fixed-point: ~90 calls
        >>> x0 = torch.zeros(1, 3)
        >>> record = Record.start(x0, Budget(30), 'abs')
        >>> warm = FixedPointIteration(f, reserve=0).init(record, x0, 1e-3)
        >>> anderson = AndersonIteration(f, ProgressRule(30, 30, 1e-3))
        >>> loop = drive(anderson, anderson.init(warm))
        >>> loop.warm.record.best.abs_res.item() <= 1e-3, loop.warm.calls <= 6
        (True, True)
    """

    def __init__(self, f: Callable[[Tensor], Tensor], rule: ProgressRule, m: int = 6,
                 lam: float = 1e-4, relative: bool = True, switch: bool = False) -> None:
        self.f, self.rule, self.m, self.lam, self.relative = f, rule, m, lam, relative
        self.switch = switch

    def init(self, warm: WarmupLoop) -> AndersonLoop:
        """Anderson from the best iterate (f there is known: no call), and its first
        fixed-point step; with ``switch=True``, from the fixed-point phase's last step
        x_0 = z_{k−1}, x_1 = f(x_0) = z_k (both evaluated: no call), as TorchDEQ's
        Anderson continues a fixed-point iteration."""
        best = warm.record.best
        bsz, dim = best.z.shape
        X = best.z.new_zeros(bsz, self.m, dim)
        F = torch.zeros_like(X)
        gram = best.z.new_zeros(bsz, self.m + 1, self.m + 1)
        gram[:, 0, 1:] = gram[:, 1:, 0] = 1
        rhs = best.z.new_zeros(bsz, self.m + 1, 1)
        rhs[:, 0] = 1
        loop = AndersonLoop(warm=warm, X=X, F=F, gram=gram, rhs=rhs, k=2)
        if self.switch and warm.prev_z is not None:
            X[:, 0], F[:, 0], X[:, 1], F[:, 1] = warm.prev_z, warm.z, warm.z, warm.fz
            start, stop = warm.history[-2], warm.history[-1]
        else:
            X[:, 0], F[:, 0] = best.z, best.fz
            X[:, 1] = F[:, 0]
            start = _closed(best.residual(warm.record.stop_mode), warm)
            F[:, 1], stop = _evaluate(self.f, warm, X[:, 1])
        if len(warm.history) > 1:
            # the fixed-point phase's rate, against which Anderson is measured
            # (:meth:`_choose`): its slowest step, as the fast modes of J die out first
            history = torch.stack(list(warm.history))
            loop.rival = (history[1:] / history[:-1]).amax(dim=0)
            loop.since = warm.calls - (0 if self.switch else 1)
        if self.switch:
            loop.columns = int(warm.record.budget.left) + 1
            loop.recent.append(start)
            self._judge(loop, stop)
        return loop

    def step(self, loop: AndersonLoop) -> AndersonLoop:
        """The next iterate, x_k = α · F over the last n = min(k, m) (or a fixed-point
        step, :meth:`_choose`), and f there; once the batch has switched, Broyden's step
        (:meth:`_broyden_step`)."""
        X, F, k, m = loop.X, loop.F, loop.k, self.m
        if loop.model is not None:
            return self._broyden_step(loop)
        X[:, k % m] = F[:, (k - 1) % m] if loop.plain else self._mix(loop)
        F[:, k % m], stop = _evaluate(self.f, loop.warm, X[:, k % m])
        loop.k = k + 1
        if loop.rival is not None:
            self._choose(loop)
        if self.switch:
            self._judge(loop, stop)
        return loop

    def _broyden_step(self, loop: AndersonLoop) -> AndersonLoop:
        """The step once the batch took Broyden's method (:meth:`_join`): Broyden's next
        point and f there, without writing Anderson's buffers, which no row reads again,
        and with only the convergence verdict left to judge (one host sync)."""
        z = loop.model.next_point()
        fz, stop = _evaluate(self.f, loop.warm, z, mixing=False)
        loop.k += 1
        loop.model.observe(z, fz)
        self._judge(loop, stop)      # the convergence verdict alone
        return loop

    def _choose(self, loop: AndersonLoop) -> None:
        """Anderson's mix or plain fixed-point steps for the whole batch, whichever its
        measured rate projects to converge in fewer calls. Every ``PROGRESS_WINDOW`` calls of the
        current method (Anderson's first after ``2 · PROGRESS_WINDOW``: its first calls build
        its memory), its rate ρ over them (:func:`geometric_rate` of each row's best
        residual) is set against the rate the other method had when it was left, both
        projected from the residual now (:func:`calls_needed`, the slowest open row):

            Anderson gives way   where  ANDERSON_GAIN · calls(ρ_A) ≥ calls(ρ_FP),
            fixed-point gives way where calls(ρ_FP) > ANDERSON_GAIN · calls(ρ_A).

        A step of Anderson costs a Gram matrix and a bordered solve besides f, and on maps
        whose Jacobian's spectrum fills a disk around 0 (random tanh cells) Anderson takes
        as many calls as fixed-point iteration; where it accelerates, it keeps the batch.
        The verdict is read with the hand-over's (:meth:`terminate`): no host sync of its
        own."""
        warm = loop.warm
        run = warm.calls - loop.since
        # Anderson is first judged once its memory is full (m = 6 calls), over the window
        # after; fixed-point iteration after one window
        first = PROGRESS_WINDOW if loop.plain else 2 * PROGRESS_WINDOW
        if run < first or run % PROGRESS_WINDOW:
            return
        window = list(warm.best_recent)[-1 - PROGRESS_WINDOW:]
        rate, now = geometric_rate(window), window[-1]
        mine = calls_needed(now, rate, warm.tol)
        theirs = calls_needed(now, loop.rival, warm.tol)
        if loop.plain:      # Anderson's rate projected to save a share of the calls
            loop.leave = mine > ANDERSON_GAIN * theirs
        else:
            loop.leave = (ANDERSON_GAIN * mine >= theirs) & torch.isfinite(theirs)
        loop.rate = rate           # read with the hand-over's verdict (:meth:`terminate`)

    def _mix(self, loop: AndersonLoop) -> Tensor:
        """Anderson's next iterate  x_k = Σ_i α_i f(x_i)  over the last n = min(k, m),
        with α from the bordered, regularized Gram system of the class docstring."""
        X, F, m = loop.X, loop.F, self.m
        n = min(loop.k, m)
        G = F[:, :n] - X[:, :n]
        gg = torch.bmm(G, G.transpose(1, 2))
        diagonal = gg.diagonal(dim1=1, dim2=2)
        if self.relative:   # s = mean ||g_i||², kept above 0 so that the matrix stays regular
            diagonal.add_(self.lam * diagonal.mean(dim=1, keepdim=True).clamp_min(
                torch.finfo(X.dtype).tiny))
        else:               # s = 1
            diagonal.add_(self.lam)
        loop.gram[:, 1:n + 1, 1:n + 1] = gg             # GGᵀ + λ s I
        # ``solve_ex``: without the error check, a host sync per call on CUDA. The ridge
        # keeps the matrix regular (GGᵀ + λ s I is positive definite, so the bordered
        # matrix's Schur complement −1ᵀ(GGᵀ + λ s I)⁻¹1 is not 0); non-finite G gives
        # non-finite weights either way.
        alpha = torch.linalg.solve_ex(loop.gram[:, :n + 1, :n + 1],
                                      loop.rhs[:, :n + 1])[0][:, 1:n + 1, 0]
        return (alpha[:, None] @ F[:, :n])[:, 0]

    def _judge(self, loop: AndersonLoop, stop: Tensor) -> None:
        """Switch the batch to Broyden's method where an open row's residual ``stop`` grew,
        or its rate is too slow for ``SWITCH_SHARE`` of the calls left (all of them for the
        first, one-call rate), and note whether any row is still open (for
        :meth:`terminate`): one host sync for both.

        The batch does not switch once m or fewer calls are left (m: Anderson's memory):
        Broyden's model, seeded with each row's last m Anderson pairs, only does better
        than Anderson's window of m pairs once it holds more of them. At budgets of 4–8
        calls on tanh cells 32 and 256 wide (seeds 600–601) the switch had cost 1.5–2× the
        time of the solve and ended no lower (BENCHMARKS.md, "Budgets of a few calls")."""
        warm = loop.warm
        open_ = warm.best_recent[-1] > warm.tol
        if loop.model is not None:         # on Broyden's method: only convergence is left
            loop.open_any, loop.leave = bool(open_.any()), None
            return
        late = stop > loop.recent[-1]
        loop.recent.append(stop)
        verdicts = {"open": open_.any()}
        if warm.record.budget.left > self.m:   # else too few calls left for Broyden
            # within SWITCH_SHARE of the calls left for a rate over the full window; a
            # one-call rate (the first judgement) within all of them
            known = _known_window(loop.recent)
            share = SWITCH_SHARE if known == SWITCH_WINDOW else 1.0
            late |= ~on_time(list(loop.recent), warm.tol, share * warm.record.budget.left,
                             known)
            verdicts["switch"] = (open_ & late).any()
        if loop.leave is not None:
            verdicts["leave"] = loop.leave
        values = torch.stack(list(verdicts.values())).tolist()          # one host sync
        read = dict(zip(verdicts, values, strict=True))
        loop.open_any = read["open"]
        if "leave" in read:
            self._apply(loop, read["leave"])
        if read.get("switch", False):
            self._join(loop)

    def _join(self, loop: AndersonLoop) -> None:
        """Broyden's method for the batch: per row, a model from W = I updated with its
        last n Anderson iterates, oldest first, the last being the current one."""
        X, F, k, m = loop.X, loop.F, loop.k, self.m
        order = torch.arange(k - min(k, m), k, device=X.device) % m          # oldest first
        loop.model = StepBroyden(X[:, order], F[:, order], columns=loop.columns)

    def terminate(self, loop: AndersonLoop) -> bool:
        """The budget spent, or the open samples handed over (one host sync)."""
        warm = loop.warm
        if warm.record.budget.left <= 0:
            return True
        if self.switch:      # the batch already chose its method: no hand-over
            return not loop.open_any
        over = self.rule.verdict(warm.calls, warm.best_recent)
        if loop.leave is None:
            return bool(over)
        over, leave = torch.stack([over, loop.leave]).tolist()   # one host sync for both
        self._apply(loop, leave)
        return over

    @staticmethod
    def _apply(loop: AndersonLoop, leave: bool) -> None:
        """Change method if :meth:`_choose`'s verdict, now read, says so."""
        if leave:
            loop.plain, loop.rival, loop.since = not loop.plain, loop.rate, loop.warm.calls
        loop.leave = None


def warm_up(f: Callable[[Tensor], Tensor], x0: Tensor, record: Record, tol: float,
            guaranteed: int | None = None, reserve: int = 0) -> Warmup | None:
    """Fixed-point iteration while it is projected to converge in time
    (:class:`FixedPointIteration`), then Anderson
    acceleration (:class:`AndersonIteration`) from the best iterate, within the budget of
    ``record``, to which every evaluation is added. After ``guaranteed`` calls (default:
    the whole budget) Anderson hands over to the next phase once an open sample is no
    longer projected to converge within the budget at its current rate
    (:class:`ProgressRule`).

    Where at least 2 · ``reserve`` calls are left after the fixed-point phase, Anderson is
    skipped if that phase's first step grew most residuals: on such expansive maps it
    rarely converges, and the path tracker's Broyden's method and path do better. With
    fewer calls left (a training budget) the warm-up keeps the budget instead: Anderson,
    switched as a batch to Broyden's method at the first call where an open row's
    residual grows or its rate is too slow (``AndersonIteration(switch=True)``).

    Newton later starts from the best iterate where the warm-up cut the residual tenfold;
    elsewhere (expansive or divergent maps) from x0, the better Newton start there.

    Example:
        >>> from torchdeq_homotopy.outcome import Budget
        >>> record = Record.start(torch.zeros(2, 3), Budget(30), 'abs')
        >>> warm = warm_up(lambda z: 0.5 * z + 1, torch.zeros(2, 3), record, 1e-6)
        >>> warm.solved(1e-6), warm.record.budget.used <= 25
        (True, True)
    """
    budget = record.budget
    if budget.left <= 0:
        return None
    # at a training budget every call counts: rates are judged from the first step on
    fixed_point = FixedPointIteration(f, reserve, training=budget.left <= 2 * reserve)
    loop = drive(fixed_point, fixed_point.init(record, x0, tol))
    open_ = _closed(record.best.residual(record.stop_mode), loop) > tol
    training = 0 < budget.left < 2 * reserve
    if (training or not loop.expanding) and bool(open_.any()) and budget.left >= 1:
        rule = ProgressRule(guaranteed if guaranteed is not None else budget.limit,
                            budget.limit, tol, reserve)
        anderson = AndersonIteration(f, rule, switch=training)
        drive(anderson, anderson.init(loop))
    best = record.best
    helped = (best.abs_res <= 0.1 * loop.first_res)[:, None]
    return Warmup(record=record,
                  newton_start=torch.where(helped, best.z, loop.first_z),
                  newton_start_fz=torch.where(helped, best.fz, loop.first_fz),
                  x0_fz=loop.first_fz, hopeless=loop.hopeless)
