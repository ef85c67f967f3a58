"""Error-model lemmas of every storage format, decided by z3. Exits non-zero unless every query
is UNSAT (i.e. every lemma holds). ``make test`` runs it.

Casts (z3 FloatingPoint theory, bit-precise, for EVERY float32 input x — the model's keys and
values are float32):
  fp16, bf16, fp8-e5m2, fp8-e4m3 round-to-nearest-even:
    normal range   |fl(x) - x| <= u |x|,      u = 2^-11, 2^-8, 2^-3, 2^-4
    subnormal      |fl(x) - x| <= SUB,        SUB = 2^-25, 2^-134, 2^-17, 2^-10
  E4M3 (no infinities, max 448) is checked as IEEE (4,4) below 240 (same grid, subnormals
  included) and as IEEE (5,4) on [2^-6, 448] (same normal grid, one binade more). The check is
  sound without any exactness argument: |r - x| is bounded above by the larger of the float64
  differences rounded toward +inf and -inf, and the bound u|x| + SUB is rounded toward -inf.
Pipelines (nonlinear real arithmetic, every float32/float64 rounding as a (1 + d), |d| <= 2^-23
resp. 2^-52; the casts above as assumptions):
  INT-b asymmetric, b = 2, 3, 4, 8 (hnfverify/core/formats/integer.py):
    |x - (q s + z)| <= u (1 + 2^-9) R + (u 2^-9 + 2^-20) A + 2^-23
  LM-b codebooks, b = 2, 3, 4 (the same pipeline, the stored value l_q s + z with l_q the level nearest
  to t = (x - z) / s, every level within reach W of every t in [0, 2^b - 1]): the same bound, u = W / (2^b - 1)
  FP8 with a per-token FP16 scale (hnfverify/core/formats/fp8.py):
    |x - q s| <= (u + 2^-21) |x| + (1 + 2^-21) SUB s
"""

import sys
import time
from pathlib import Path
from fractions import Fraction as F

import z3

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hnfverify.core.formats.integer import CODEBOOK_BITS, LEVELS, codebook_reach  # noqa: E402

FAILS = []


def R(x):
    x = F(x)
    return z3.RealVal(x.numerator) / z3.RealVal(x.denominator) if x.denominator != 1 else z3.RealVal(x.numerator)


def expect_unsat(name, solver):
    t = time.time()
    r = solver.check()
    ok = r == z3.unsat
    print(f"  {'proved' if ok else 'FAILED'}  {name}  ({r}, {time.time() - t:.2f} s)")
    if not ok:
        FAILS.append(name)


def f64(v):
    return z3.FPVal(float(v), z3.Float64())


def cast_lemma(name, eb, sb, lo, hi, rel, ab):
    """For float32 x with lo <= |x| <= hi: |RNE_(eb,sb)(x) - x| <= rel |x| + ab."""
    s = z3.Solver()
    s.set("timeout", 120000)
    x = z3.FP("x", z3.Float32())
    x64 = z3.fpToFP(z3.RNE(), x, z3.Float64())
    r64 = z3.fpToFP(z3.RNE(), z3.fpToFP(z3.RNE(), x, z3.FPSort(eb, sb)), z3.Float64())
    ax = z3.fpAbs(x64)
    s.add(z3.fpGEQ(ax, f64(lo)), z3.fpLEQ(ax, f64(hi)))
    err_up = z3.fpMax(z3.fpAbs(z3.fpSub(z3.RTP(), r64, x64)), z3.fpAbs(z3.fpSub(z3.RTN(), r64, x64)))
    bound_dn = z3.fpAdd(z3.RTN(), z3.fpMul(z3.RTN(), f64(rel), ax), f64(ab))
    s.add(z3.fpGT(err_up, bound_dn))
    expect_unsat(name, s)


def int_pipeline(b, reach=F(1, 2), label=None):
    """The INT-b pipeline; with ``reach`` W > 0 the codebook variant: the code q is any level within W of t
    (every t in [0, n] has its nearest level within W, and t > n takes the top level, at most W below n)."""
    n = 2 ** b - 1
    u = F(reach) / n
    lo, hi, x, z, s, tt, q, xh, d1, d2, a = z3.Reals("lo hi x z s tt q xh d1 d2 A")
    sv = z3.SolverFor("QF_NRA")
    sv.set("timeout", 120000)
    e32 = R(F(1, 2 ** 23))
    sv.add(lo <= x, x <= hi, a <= R(65504), a >= lo, a >= -lo, a >= hi, a >= -hi)
    sv.add(z <= lo, z >= lo - R(F(1, 2 ** 10)) * a - R(F(1, 2 ** 24)))                 # z = RD_fp16(lo)
    base = (hi - z) / n
    sv.add(s >= base * R(1 - F(1, 2 ** 52)), s >= R(F(1, 2 ** 24)))                       # s = RU_fp16(...)
    sv.add(s <= base * R(1 + F(1, 2 ** 52)) * R(1 + F(1, 2 ** 10)) + R(F(1, 2 ** 24)))
    two = R(F(1, 2 ** 23) + F(1, 2 ** 48))                  # (1 + 2^-24)^2 - 1: a subtraction, then a division
    sv.add(d1 <= two, -d1 <= two, d2 <= e32, -d2 <= e32)
    sv.add(tt * s == (x - z) * (1 + d1))                                                  # (x - z) / s in float32
    w = R(reach)
    sv.add(q >= 0, q <= n, z3.Or(z3.And(q - tt <= w, tt - q <= w),                       # round, clamp
                                 z3.And(q <= n, q >= n - w, tt > n)))
    sv.add(xh == (q * s + z) * (1 + d2))                                                  # q s + z in float32
    bound = R(u * (1 + F(1, 2 ** 9))) * (hi - lo) + R(u * F(1, 2 ** 9) + F(1, 2 ** 20)) * a + R(F(1, 2 ** 23))
    sv.add(z3.Or(x - xh > bound, xh - x > bound))
    expect_unsat(label or f"int{b} asymmetric group quantization (FP16 scale and zero-point, float32 arithmetic)", sv)


def fp8_pipeline(name, mx, u, sub):
    x, a, s, y, yc, r, xh, d1, d2 = z3.Reals("x A s y yc r xh d1 d2")
    sv = z3.SolverFor("QF_NRA")
    sv.set("timeout", 120000)
    e32 = R(F(1, 2 ** 23))
    sv.add(a >= x, a >= -x, a <= R(65504))
    lo_s = a / R(mx) * R(1 - F(1, 2 ** 52))
    sv.add(z3.Or(z3.And(s >= lo_s, s <= a * R(1 + F(1, 2 ** 9)) / R(mx)),             # RU_fp16(A / MAX)
                 z3.And(s == R(F(1, 2 ** 14)), lo_s <= s)))                            # or the floor 2^-14
    sv.add(d1 <= e32, -d1 <= e32, d2 <= e32, -d2 <= e32)
    sv.add(y * s == x * (1 + d1))                                                        # x / s in float32
    sv.add(yc == z3.If(y > R(mx), R(mx), z3.If(y < -R(mx), -R(mx), y)))                  # clamp
    ay = z3.If(yc >= 0, yc, -yc)
    sv.add(r - yc <= R(u) * ay + R(sub), yc - r <= R(u) * ay + R(sub))                    # the cast lemma
    sv.add(r <= R(mx), r >= -R(mx))                     # RNE never leaves [-MAX, MAX] for inputs inside it
    sv.add(xh == r * s * (1 + d2))                                                        # q s in float32
    ax = z3.If(x >= 0, x, -x)
    bound = R(u + F(1, 2 ** 21)) * ax + R(sub * (1 + F(1, 2 ** 21))) * s
    sv.add(z3.Or(x - xh > bound, xh - x > bound))
    expect_unsat(f"{name} with per-token FP16 scale (clamp, float32 arithmetic)", sv)


def main() -> int:
    print("casts, every float32 input (z3 FloatingPoint):")
    cast_lemma("fp16 normal", 5, 11, F(2) ** -14, 65504, F(2) ** -11, 0)
    cast_lemma("fp16 subnormal", 5, 11, 0, F(2) ** -14, 0, F(2) ** -25)
    cast_lemma("bf16 normal", 8, 8, F(2) ** -126, (2 - F(1, 128)) * F(2) ** 127, F(2) ** -8, 0)
    cast_lemma("bf16 subnormal", 8, 8, 0, F(2) ** -126, 0, F(2) ** -134)
    cast_lemma("fp8-e5m2 normal", 5, 3, F(2) ** -14, 57344, F(2) ** -3, 0)
    cast_lemma("fp8-e5m2 subnormal", 5, 3, 0, F(2) ** -14, 0, F(2) ** -17)
    cast_lemma("fp8-e4m3 below 240, as IEEE (4,4): normal", 4, 4, F(2) ** -6, 240, F(2) ** -4, 0)
    cast_lemma("fp8-e4m3 subnormal, as IEEE (4,4)", 4, 4, 0, F(2) ** -6, 0, F(2) ** -10)
    cast_lemma("fp8-e4m3 normal up to the saturation value 448, as IEEE (5,4)", 5, 4, F(2) ** -6, 448, F(2) ** -4, 0)
    print("quantization pipelines (z3 nonlinear real arithmetic):")
    for b in (2, 3, 4, 8):
        int_pipeline(b)
    for b in CODEBOOK_BITS:
        w = codebook_reach(LEVELS[b])
        int_pipeline(b, w, f"lm{b} codebook group quantization (reach W = {w}; FP16 scale and zero-point, float32)")
    fp8_pipeline("fp8-e4m3", 448, F(1, 16), F(2) ** -10)
    fp8_pipeline("fp8-e5m2", 57344, F(1, 8), F(2) ** -17)
    if FAILS:
        print(f"{len(FAILS)} lemma(s) NOT proved: {FAILS}")
        return 1
    print("all format error-model lemmas proved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
