"""Cost comparisons: the base's evaluations that match a sampler's agreement with the reference."""

import numpy as np
import pytest

from glance_jax.evaluation import equivalent_base_nfe, speedup


def test_equivalent_base_nfe_interpolates_in_log_nfe():
    nfes, psnrs = [3, 4, 6, 10], [21.0, 24.0, 27.0, 32.0]
    for n, p in zip(nfes, psnrs):  # the base rows themselves
        assert equivalent_base_nfe(nfes, psnrs, p) == pytest.approx((n, False))
    nfe, extrapolated = equivalent_base_nfe(nfes, psnrs, 29.5)  # halfway between 6 and 10 in PSNR
    assert not extrapolated and nfe == pytest.approx(np.sqrt(60.0))  # ... is the geometric mean in NFE
    assert speedup(nfes, psnrs, 29.5, 4) == pytest.approx((np.sqrt(60.0), np.sqrt(60.0) / 4, False))


def test_equivalent_base_nfe_outside_the_rows_is_flagged():
    nfes, psnrs = [4, 6, 10], [24.0, 27.0, 32.0]
    above, flagged = equivalent_base_nfe(nfes, psnrs, 37.0)  # one more 6 -> 10 segment up
    assert flagged and above == pytest.approx(10 * (10 / 6))
    below, flagged = equivalent_base_nfe(nfes, psnrs, 21.0)
    assert flagged and below == pytest.approx(4 * (4 / 6))


def test_rows_that_do_not_improve_are_dropped():
    # order does not matter; the 8-step row is no better than 6 steps and is ignored
    got = equivalent_base_nfe([10, 8, 6, 4], [32.0, 26.0, 27.0, 24.0], 29.5)
    assert got == pytest.approx((np.sqrt(60.0), False))
    with pytest.raises(ValueError, match="at least two base rows"):
        equivalent_base_nfe([4, 6], [27.0, 27.0], 27.0)
