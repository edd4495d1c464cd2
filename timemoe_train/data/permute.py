"""Counter-based randomness: every random choice of the sample stream is a pure function of (seed, indices).

This is what makes resume "just an index" and the stream identical under any process layout: nothing carries
state from one draw to the next. `permute` is a keyed bijection of [0, n) (a Feistel network with cycle-walking),
so shuffling tens of millions of windows needs no permutation array in memory.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_U64 = np.uint64
_ROUNDS = 4  # Luby-Rackoff: four rounds of a good round function make a strong pseudo-random permutation


def _mix(x_N: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast bijective avalanche of uint64 values."""
    with np.errstate(over="ignore"):
        x_N = (x_N ^ (x_N >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        x_N = (x_N ^ (x_N >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x_N ^ (x_N >> _U64(31))


@lru_cache(maxsize=1 << 14)
def derive_key(seed: int, *parts: int) -> int:
    """A 64-bit key for one named random choice, e.g. derive_key(seed, TAG, group, epoch)."""
    key = _mix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=_U64))
    for part in parts:
        key = _mix(key ^ _mix(np.array([part & 0xFFFFFFFFFFFFFFFF], dtype=_U64)))
    return int(key[0])


def hash_ints(key: int, x_N: np.ndarray) -> np.ndarray:
    """Independent-looking uint64 values, one per integer in x_N, under `key` (splitmix64's output at x_N)."""
    with np.errstate(over="ignore"):
        return _mix(np.asarray(x_N, dtype=np.int64).astype(_U64) * _U64(0x9E3779B97F4A7C15) + _U64(key))


def uniform_ints(key: int, x_N: np.ndarray, high_N) -> np.ndarray:
    """One integer in [0, high) per element of x_N (high may be an array); modulo bias is below 2^-40 here."""
    return (hash_ints(key, x_N) % np.asarray(high_N, dtype=np.int64).astype(_U64)).astype(np.int64)


def permute(key: int, i_N: np.ndarray, n: int) -> np.ndarray:
    """Position of each i in [0, n) under the keyed permutation of [0, n)."""
    i_N = np.asarray(i_N, dtype=np.int64)
    if n <= 1:
        return np.zeros_like(i_N)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = _U64((1 << half) - 1)
    round_keys = [derive_key(key, r) for r in range(_ROUNDS)]  # cached

    def feistel(x_N):
        left, right = x_N >> _U64(half), x_N & mask
        for rk in round_keys:
            left, right = right, left ^ (hash_ints(rk, right) & mask)
        return (left << _U64(half)) | right

    # The network permutes [0, 4^half) ⊇ [0, n); walking the cycle until it re-enters [0, n) restricts it to a
    # permutation of [0, n). The domain is at most 4n, so a few steps suffice on average.
    out_N = feistel(i_N.astype(_U64))
    outside = out_N >= _U64(n)
    while outside.any():
        out_N[outside] = feistel(out_N[outside])
        outside = out_N >= _U64(n)
    return out_N.astype(np.int64)
