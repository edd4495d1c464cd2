"""Time-300B's ``synthetic`` domain: seeded Gaussian-process series from random kernel compositions (KernelSynth).

Each series draws 1..``max_kernels`` kernels from a bank — periodic ones at the periods of real data (24 and 168 for
hourly, 48 for half-hourly, 7 for daily, 12 for monthly, 52 for weekly, ...), a smooth RBF kernel, a linear trend
and white noise — and joins them with random ``+`` or ``×``, as Chronos' KernelSynth does; a seeded generator makes
the corpus a pure function of :class:`KernelSynth`'s fields, which the manifest records.

Sampling goes through each kernel's spectral form rather than an O(L³) Cholesky factor, so a 4096-point series
costs milliseconds:

- periodic (ExpSineSquared, period p, length scale ℓ): exactly a random Fourier series.
  exp(-2 sin²(πτ/p)/ℓ²) = Σ_k q_k cos(2πkτ/p) with q_0 = ive(0, ℓ⁻²), q_k = 2·ive(k, ℓ⁻²), so
  f(t) = Σ_k √q_k (a_k cos(2πkt/p) + b_k sin(2πkt/p)) with a_k, b_k ~ N(0, 1) has that covariance and is Gaussian;
- RBF (length scale ℓ): random Fourier features (Rahimi & Recht), ω ~ N(0, ℓ⁻²) — approximate;
- linear: c + s·t/L with c, s ~ N(0, 1), exact; white noise: σ·N(0, 1), exact.

A sum of independent samples is a sample of the sum kernel; a product of independent zero-mean samples has the
product kernel's covariance (though it is no longer Gaussian). Variances and length scales are drawn per kernel
from the ranges below.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import ive

# Periods (in points) of the sampling rates users forecast: hourly day/week, half-hourly day, 15-minute day,
# daily week/year, weekly year, monthly year, quarterly year.
REAL_PERIODS = (24, 168, 48, 96, 7, 365, 52, 12, 4)
KERNELS = ("periodic", "rbf", "linear", "noise")


@dataclass(frozen=True)
class KernelSynth:
    seed: int = 0
    num_series: int = 1000
    length: int = 4096
    periods: tuple[int, ...] = REAL_PERIODS
    max_kernels: int = 5
    # Probability of each kernel family when drawing from the bank (periodic: one of `periods`, uniformly).
    kernel_weights: tuple[float, float, float, float] = (0.55, 0.2, 0.15, 0.1)
    # Every series holds at least one periodic kernel (joined by +): the cycles are what the domain is for.
    periodic_length_scale: tuple[float, float] = (0.5, 2.0)  # ℓ of ExpSineSquared, uniform
    rbf_length_scale: tuple[float, float] = (0.02, 0.3)  # as a fraction of the series length, log-uniform
    noise_std: tuple[float, float] = (0.01, 0.3)  # log-uniform
    rbf_features: int = 64
    harmonic_tolerance: float = 1e-6  # harmonics whose weight q_k falls below this are dropped

    def __post_init__(self):
        object.__setattr__(self, "periods", tuple(int(p) for p in self.periods))
        object.__setattr__(self, "kernel_weights", tuple(float(w) for w in self.kernel_weights))
        if self.num_series < 0 or self.length < 2 or self.max_kernels < 1:
            raise ValueError(f"KernelSynth: num_series >= 0, length >= 2 and max_kernels >= 1 required; got "
                             f"{self.num_series}, {self.length}, {self.max_kernels}")
        if not self.periods or min(self.periods) < 2:
            raise ValueError(f"KernelSynth.periods {self.periods}: need at least one period, each >= 2 points")
        if len(self.kernel_weights) != len(KERNELS) or min(self.kernel_weights) < 0 or sum(self.kernel_weights) <= 0:
            raise ValueError(f"KernelSynth.kernel_weights {self.kernel_weights}: one non-negative weight per "
                             f"kernel family {KERNELS}, not all zero")

    def describe(self) -> dict:
        return {"generator": "KernelSynth (GP kernel compositions, spectral sampling)", **asdict(self)}

    def series(self, index: int) -> np.ndarray:
        """Series `index`: float64 [length], the same for a given (seed, index) whatever else is generated."""
        rng = np.random.default_rng([self.seed, index])
        t = np.arange(self.length, dtype=np.float64)
        f = self._periodic(rng, t, int(rng.choice(self.periods)))
        p = np.asarray(self.kernel_weights) / sum(self.kernel_weights)
        for _ in range(int(rng.integers(0, self.max_kernels))):
            g = self._sample(rng, t, KERNELS[rng.choice(len(KERNELS), p=p)])
            f = f + g if rng.random() < 0.5 else f * g
        return f

    def _sample(self, rng: np.random.Generator, t: np.ndarray, kind: str) -> np.ndarray:
        if kind == "periodic":
            return self._periodic(rng, t, int(rng.choice(self.periods)))
        if kind == "rbf":
            lo, hi = self.rbf_length_scale
            scale = np.exp(rng.uniform(np.log(lo), np.log(hi))) * self.length
            omega_M = rng.normal(0.0, 1.0 / scale, self.rbf_features)
            phase_M = rng.uniform(0, 2 * np.pi, self.rbf_features)
            w_M = rng.normal(size=self.rbf_features)
            return np.sqrt(2.0 / self.rbf_features) * (np.cos(np.outer(t, omega_M) + phase_M) @ w_M)
        if kind == "linear":
            c, s = rng.normal(size=2)
            return c + s * t / self.length
        lo, hi = self.noise_std
        return np.exp(rng.uniform(np.log(lo), np.log(hi))) * rng.normal(size=len(t))

    def _periodic(self, rng: np.random.Generator, t: np.ndarray, period: int) -> np.ndarray:
        ell = rng.uniform(*self.periodic_length_scale)
        k_K = np.arange(period // 2 + 1)  # harmonics above Nyquist alias onto these
        q_K = ive(k_K, 1.0 / ell**2) * np.where(k_K == 0, 1.0, 2.0)
        k_K, q_K = k_K[q_K >= self.harmonic_tolerance], q_K[q_K >= self.harmonic_tolerance]
        a_K, b_K = rng.normal(size=(2, len(k_K))) * np.sqrt(q_K)
        angle_TK = 2 * np.pi * np.outer(t, k_K) / period
        return np.cos(angle_TK) @ a_K + np.sin(angle_TK) @ b_K
