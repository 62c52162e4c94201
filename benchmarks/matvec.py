"""Batched matrix–vector products: ``torch.bmm`` with the vector as a one-column right-hand
side against the row form the package uses (:func:`torchdeq_homotopy.linalg.bmv`).

    python benchmarks/matvec.py [--repeats 100]

For each state size n and batch B, the product A x with A ``(B, k, n)`` (k = 20 stored
columns, a slice of a wider buffer as the solvers keep them) is timed as

* ``bmm(A, x[..., None])`` — the vector as a one-column right-hand side, and
* ``bmm(x[:, None], A.mT)`` — the row vector times the transposed view (``bmv``),

and likewise for the product C c with C ``(B, n, k)``, as a secant model's U or an inverse
Broyden model's C hold their columns. Both forms give the same values up to rounding
(checked). Then the per-row finiteness test, ``torch.isfinite(x).all(1)`` against
:func:`torchdeq_homotopy.linalg.finite_rows` (one float64-accumulated sum; same result,
checked). Microseconds per call, median of 5 blocks of ``--repeats`` calls. Under a minute on
2 CPU cores.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from torchdeq_homotopy.linalg import finite_rows


def timed(fn, repeats: int) -> float:
    """Median over 5 blocks of the mean µs per call."""
    fn()
    blocks = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        blocks.append((time.perf_counter() - start) / repeats * 1e6)
    return statistics.median(blocks)


def column_form(M: torch.Tensor, v: torch.Tensor):
    """M v as ``bmm`` with v a one-column right-hand side."""
    return lambda: torch.bmm(M, v[..., None]).squeeze(-1)


def row_form(M: torch.Tensor, v: torch.Tensor):
    """M v as the row vector vᵀ times the transposed view Mᵀ."""
    return lambda: torch.bmm(v[:, None], M.mT).squeeze(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    print("| B | n | product | column form µs | row form (`bmv`) µs | ratio |")
    print("|---|---|---|---|---|---|")
    for bsz, n in ((64, 256), (8, 512), (8, 2048), (64, 2048), (64, 12544)):
        k = 20
        repeats = max(5, args.repeats * 256 // n)
        A = torch.randn(bsz, k + 12, n)[:, :k]            # rows of a wider buffer
        C = torch.randn(bsz, n, k + 12)[..., :k]
        x, c = torch.randn(bsz, n), torch.randn(bsz, k)
        cases = (("A x, A (B, k, n)", column_form(A, x), row_form(A, x)),
                 ("C c, C (B, n, k)", column_form(C, c), row_form(C, c)))
        for name, column, row in cases:
            torch.testing.assert_close(column(), row(), rtol=1e-4, atol=1e-3)
            t_col, t_row = timed(column, repeats), timed(row, repeats)
            print(f"| {bsz} | {n} | {name} | {t_col:.0f} | {t_row:.0f} | {t_col / t_row:.1f}× |")
    print()
    print("| B | n | `isfinite(x).all(1)` µs | `finite_rows(x)` µs | ratio |")
    print("|---|---|---|---|---|")
    for bsz, n in ((8, 128), (64, 256), (64, 12544)):
        x = torch.randn(bsz, n)
        x[0, 1] = float("nan")
        assert torch.equal(finite_rows(x), torch.isfinite(x).all(dim=1))
        repeats = max(5, args.repeats * 10 * 256 // n)
        t_elem = timed(lambda x=x: torch.isfinite(x).all(dim=1), repeats)
        t_sum = timed(lambda x=x: finite_rows(x), repeats)
        print(f"| {bsz} | {n} | {t_elem:.0f} | {t_sum:.0f} | {t_elem / t_sum:.1f}× |")


if __name__ == "__main__":
    main()
