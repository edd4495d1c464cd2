"""The synthetic domain's generator: a pure function of its seed, with cycles at exactly the configured periods."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.sources.synthetic import REAL_PERIODS, KernelSynth

LENGTH = 24 * 168  # a whole number of cycles of every period tested, so each harmonic falls on one FFT bin


def test_same_seed_same_series_other_seed_other_series():
    a, b = KernelSynth(seed=3, num_series=10), KernelSynth(seed=3, num_series=500)
    for i in (0, 7):
        assert np.array_equal(a.series(i), b.series(i))  # series i does not depend on how many are generated
    assert not np.allclose(a.series(0), KernelSynth(seed=4).series(0))
    assert not np.allclose(a.series(0), a.series(1))
    assert all(np.isfinite(a.series(i)).all() and a.series(i).shape == (4096,) for i in range(10))


@pytest.mark.parametrize("period", [24, 168, 48, 96, 7, 12])
def test_periodic_kernel_puts_its_power_on_the_harmonics_of_its_period(period):
    gen = KernelSynth(seed=1, length=LENGTH, periods=(period,), max_kernels=1)
    freqs = np.fft.rfftfreq(LENGTH)
    harmonic = np.isclose((freqs * period) % 1, 0) | np.isclose((freqs * period) % 1, 1)
    for i in range(5):
        x = gen.series(i)
        power = np.abs(np.fft.rfft(x - x.mean())) ** 2
        # The strongest component is a harmonic of the period, and so is (numerically) all of the power.
        assert harmonic[np.argmax(power)] and freqs[np.argmax(power)] > 0
        assert power[harmonic].sum() / power.sum() > 1 - 1e-9


def test_default_bank_cycles_are_the_real_periods():
    """Compositions add trends, noise and products, yet the strongest cycle of most series is a configured one."""
    gen = KernelSynth(seed=0, length=LENGTH)
    freqs = np.fft.rfftfreq(LENGTH)
    hits = 0
    for i in range(60):
        x = gen.series(i)
        x = x - np.polyval(np.polyfit(np.arange(LENGTH), x, 1), np.arange(LENGTH))  # drop the linear trend
        power = np.abs(np.fft.rfft(x)) ** 2
        power[freqs < 1 / 400] = 0  # slow RBF wander is not a cycle
        f = freqs[np.argmax(power)]
        # Within one FFT bin of a harmonic k/p (periods such as 365 do not divide the length).
        hits += any(abs(f * p - round(f * p)) <= p / LENGTH and round(f * p) >= 1 for p in REAL_PERIODS)
    assert hits >= 48, hits  # 53 of 60 for seed 0


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="periods"):
        KernelSynth(periods=(1,))
    with pytest.raises(ValueError, match="kernel_weights"):
        KernelSynth(kernel_weights=(1, 0, 0))
