"""The codebook formats' levels (hnfverify/core/formats/integer.py LEVELS, docs/design.md §2.3b) are what
Lloyd's algorithm gives, and the reach W each error model uses is the table's.

The fit: 5,000 groups of 64 N(0, 1) samples (numpy's PCG64, seed 0), each group min-max normalized to
[0, 2^b - 1] as the codec does (z = min, s = (max - min) / (2^b - 1)); Lloyd's algorithm from the uniform
levels, levels free in [0, 2^b - 1], 150 iterations; each level rounded to a multiple of 1/32 (exact in
float32, and so is every midpoint). Exits non-zero unless the fitted table equals LEVELS and the rounded
levels still beat the uniform grid's mean squared error on the same samples.
"""

import sys
from fractions import Fraction as F
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hnfverify.core.formats.integer import LEVELS, codebook_reach  # noqa: E402


def fit(b: int, groups: int = 5000, size: int = 64, iters: int = 150):
    n = 2 ** b - 1
    x = np.random.default_rng(0).standard_normal((groups, size))
    lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
    y = ((x - lo) / (hi - lo) * n).ravel()
    lv = np.linspace(0, n, n + 1)
    for _ in range(iters):
        idx = np.searchsorted((lv[1:] + lv[:-1]) / 2, y)
        lv = np.array([y[idx == i].mean() for i in range(n + 1)])
    fitted = tuple(F(int(round(v * 32)), 32) for v in lv)
    q = np.array([float(v) for v in fitted])
    mse = float(np.mean((y - q[np.searchsorted((q[1:] + q[:-1]) / 2, y)]) ** 2))
    return fitted, mse, float(np.mean((y - np.round(y)) ** 2))


def main() -> int:
    bad = 0
    for b in sorted(LEVELS):
        fitted, mse, uni = fit(b)
        ok = fitted == LEVELS[b] and mse < uni
        bad += not ok
        print(f"  {'proved' if ok else 'FAILED'}  {b}-bit levels: Lloyd fit {'equals' if fitted == LEVELS[b] else 'DIFFERS FROM'} "
              f"the table; MSE {mse:.4f} vs uniform {uni:.4f} (units of s^2); reach W = {codebook_reach(LEVELS[b])}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
