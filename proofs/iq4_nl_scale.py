"""llama.cpp's iq4_nl (docs/design.md §2.3d): the error lemma of its reference quantizer, which picks each code with
the trial scale d0 = M / -127 (M the first element of largest |x|) and then stores the weighted least-squares scale
d = sum w q x / sum w q^2 (w = x^2) of those codes. Exits non-zero unless every step holds.

In units of d0, an element is u = x / d0 in [-127 (1 + 2^-23), 127 (1 + 2^-23)], its code the level q nearest u
(q in KVALUES; within 2^-14 of the nearest where float32 rounding of id * x moves a midpoint) and r = u - q.
Then d = d0 (1 + delta), delta = sum u^2 q r / sum u^2 q^2, and x - d q = d0 (r - delta q).

Step 1 (z3, one cubic per level and side): every block has the element M, with u = -127 (1 + O(2^-23)), q = -127,
so sum u^2 q^2 >= C = 127^4 (1 - 2^-21) and its own u^2 q r is at most F = 127^4 2^-21 in magnitude; with 31 other
elements, delta <= LAMBDA_HI iff sum over them of (u^2 q r - LAMBDA_HI u^2 q^2) <= LAMBDA_HI C - F, which holds if
every one of them has u^2 q (r - LAMBDA_HI q) <= (LAMBDA_HI C - F) / 31: a cubic in u on each level's cell.
Likewise delta >= LAMBDA_LO.
Step 2 (exact rationals): |r - delta q| <= E for delta in [LAMBDA_LO, LAMBDA_HI], u in any cell (linear in both: the
cell ends and the two deltas).
Step 3 (written, docs/design.md §2.3d, checked by an exact-rational search below): the float32 sums and division
give d_c with |d_c - d| <= 2^-14 |d0|; fp16(d_c) adds 2^-11 |d_c| + 2^-25; the float32 product fp16(d) q adds
2^-24 |x~|. Hence, with A = |M| = 127 |d0|,

    |x - x~| <= (E / 127 + 2^-14 + 2^-11 (1 + LAMBDA_HI + 2^-14) + 2^-22) A + 2^-18,

and a block with A < 1e-15 is stored as 0 (error A).
"""

import sys
from fractions import Fraction as F
from pathlib import Path

import z3

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hnfverify.core.formats.ggml import IQ4NL_COEF, IQ4NL_E, IQ4NL_LAMBDA_HI, IQ4NL_LAMBDA_LO, KVALUES  # noqa: E402

FAILS = []
ETA = F(1, 2 ** 14)                           # how far float32 rounding can move a code's cell
UMAX = 127 * (1 + F(1, 2 ** 22))


def R(x):
    x = F(x)
    return z3.RealVal(x.numerator) / z3.RealVal(x.denominator)


def cells():
    """(level, lo, hi): the u for which best_index_int8 can return the level (widened by ETA)."""
    v = KVALUES
    out = []
    for i, q in enumerate(v):
        lo = -UMAX if i == 0 else F(v[i - 1] + q, 2) - ETA
        hi = UMAX if i == len(v) - 1 else F(q + v[i + 1], 2) + ETA
        out.append((q, lo, hi))
    return out


def step1(lam, side):
    c = F(127) ** 4 * (1 - F(1, 2 ** 21))
    fm = F(127) ** 4 * F(1, 2 ** 21)
    rhs = (lam * c - fm) / 31 if side == "hi" else (lam * c + fm) / 31
    for q, lo, hi in cells():
        u = z3.Real("u")
        s = z3.SolverFor("QF_NRA")
        s.set("timeout", 60000)
        h = u * u * R(q) * (u - R(q) - R(lam) * R(q))
        s.add(u >= R(lo), u <= R(hi), h > R(rhs) if side == "hi" else h < R(rhs))
        r = s.check()
        if r != z3.unsat:
            FAILS.append(f"step 1 {side} level {q}: {r}")
    print(f"  {'proved' if not FAILS else 'FAILED'}  delta {'<=' if side == 'hi' else '>='} {lam} on every level's cell "
          f"(16 cubic inequalities, z3)")


def step2():
    worst = F(0)
    for q, lo, hi in cells():
        for u in (lo, hi):
            for lam in (IQ4NL_LAMBDA_LO, IQ4NL_LAMBDA_HI):
                worst = max(worst, abs(u - q - lam * q))
    ok = worst <= IQ4NL_E
    if not ok:
        FAILS.append(f"step 2: max |r - delta q| = {worst} > E = {IQ4NL_E}")
    print(f"  {'proved' if ok else 'FAILED'}  |r - delta q| <= E = {float(IQ4NL_E):.6g} (max {float(worst):.6g}, exact)")


def step3_search(n_blocks=3000, seed=7):
    """The reference quantizer in float32 (numpy, step by step as ggml-quants.c), its error against the lemma in
    exact rationals, on adversarial and random blocks."""
    import numpy as np

    import torch

    from hnfverify.core.formats import by_name
    from hnfverify.kv.quant import dequantize, quantize

    rng = np.random.default_rng(seed)
    blocks = []
    for i in range(n_blocks):
        kind = i % 6
        x = rng.standard_normal(32).astype(np.float32) * np.float32(np.exp(rng.uniform(-12, 8)))
        if kind == 1:
            x[:] = np.abs(x); x[0] = -x.max() * np.float32(1.0000001)   # one sign against all the rest
        elif kind == 2:
            x = np.where(x > 0, 1, -1).astype(np.float32) * x.max()
        elif kind == 3:
            x[1:] = x[0] * np.float32(-1)                                  # the other extreme, 31 times
        elif kind == 4:
            x *= 0; x[rng.integers(32)] = rng.uniform(-5, 5)
        blocks.append(x)
    xb = np.stack(blocks)
    y = dequantize(quantize(torch.from_numpy(xb), by_name("iq4_nl"))).numpy()
    worst = F(0)
    for x, yy in zip(xb, y):
        a = max(abs(F(float(v))) for v in x)
        for v, w in zip(x, yy):
            err = abs(F(float(v)) - F(float(w)))
            bound = IQ4NL_COEF * a + F(1, 2 ** 18)
            if err > bound:
                FAILS.append(f"step 3: |dx| = {float(err)} > {float(bound)} in a block with amax {float(a)}")
                return
            if a >= F(1, 64):                   # below, the FP16 scale's subnormal steps (the 2^-18) dominate
                worst = max(worst, err / a)
    print(f"  ok      no counterexample in {n_blocks} float32 blocks (largest |dx| / amax {float(worst):.4f} where "
          f"amax >= 1/64, the lemma's {float(IQ4NL_COEF):.4f})")


def main() -> int:
    print("iq4_nl's reference quantizer (least-squares scale of the trial codes):")
    step1(IQ4NL_LAMBDA_HI, "hi")
    step1(IQ4NL_LAMBDA_LO, "lo")
    step2()
    step3_search()
    if FAILS:
        print(f"NOT proved: {FAILS}")
        return 1
    print("the iq4_nl lemma holds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
