"""Shared test helpers."""
import pytest
import torch


@pytest.fixture
def record_tangent_lams():
    """Wrap a tracker's ``_set_tangent`` so that each call appends the dλ/ds component of
    the new tangents (NaN for samples not taking one) to the returned list."""

    def install(tracker) -> list[torch.Tensor]:
        recorded: list[torch.Tensor] = []
        original = tracker._set_tangent

        def spy(state, models, tangent_ok, t, budget=None, exact=None):
            recorded.append(torch.where(tangent_ok, t[:, -1], torch.nan))
            return original(state, models, tangent_ok, t, budget, exact)

        tracker._set_tangent = spy
        return recorded

    return install
