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
  FP8-E4M3 with a fixed float32 scale s (vLLM, hnfverify/core/formats/fp8.py), |x| <= 448 s:
    |x - q s| <= (u + 2^-21) |x| + (1 + 2^-21) SUB s
  llama.cpp's block types (hnfverify/core/formats/ggml.py; A = max |x|, R = max - min of the block):
    q8_0, q4_0, q5_0:  |x - x~| <= (c + 2^-11)(1 + 2^-9) A + 2^-18, c = 1/254, 1/8, 1/16
    q4_1, q5_1:        |x - x~| <= (1/(2N) + 2^-11)(1 + 2^-9) R + (2^-11 + 2^-20) A + 2^-18, N = 15, 31
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


def fp8_fixed_scale_pipeline():
    """vLLM's fp8_e4m3 KV cache: a fixed float32 scale s > 0 (no FP16 rounding of it), |x| <= 448 s."""
    x, s, y, yc, r, xh, d1, f1, d2 = z3.Reals("x s y yc r xh d1 f1 d2")
    sv = z3.SolverFor("QF_NRA")
    sv.set("timeout", 120000)
    e32 = R(F(1, 2 ** 23))
    sv.add(s >= R(F(1, 2 ** 126)), x <= 448 * s, -x <= 448 * s)
    sv.add(d1 <= e32, -d1 <= e32, d2 <= e32, -d2 <= e32, f1 <= R(F(1, 2 ** 149)), -f1 <= R(F(1, 2 ** 149)))
    sv.add(y * s == x * (1 + d1) + f1 * s)                                       # x / s in float32 (may underflow)
    sv.add(yc == z3.If(y > 448, R(448), z3.If(y < -448, R(-448), y)))
    ay = z3.If(yc >= 0, yc, -yc)
    sv.add(r - yc <= R(F(1, 16)) * ay + R(F(2) ** -10), yc - r <= R(F(1, 16)) * ay + R(F(2) ** -10))   # the cast lemma
    sv.add(r <= 448, r >= -448)
    sv.add(xh == r * s * (1 + d2))                                               # fp8 * s in float32
    ax = z3.If(x >= 0, x, -x)
    bound = R(F(1, 16) + F(1, 2 ** 21)) * ax + R(F(2) ** -10 * (1 + F(1, 2 ** 21))) * s
    sv.add(z3.Or(x - xh > bound, xh - x > bound))
    expect_unsat("fp8-e4m3 with a fixed float32 scale (vLLM; |x| <= 448 s, clamp, float32 arithmetic)", sv)


def _fp16_cast(sv, v, r, e, f):
    """r = RNE_fp16(v) for 0 <= |v| <= 65504, as |r - v| <= 2^-11 |v| + 2^-25 (the cast lemmas above); a nonzero
    r is at least the smallest subnormal 2^-24 in magnitude, of v's sign, and needs |v| >= 2^-25 (below, RNE gives 0)."""
    sv.add(r == v * (1 + e) + f, e <= R(F(1, 2 ** 11)), -e <= R(F(1, 2 ** 11)), f <= R(F(1, 2 ** 25)),
           -f <= R(F(1, 2 ** 25)))
    tiny = R(F(1, 2 ** 24))
    sv.add(z3.Or(r == 0, z3.And(r >= tiny, v >= tiny / 2), z3.And(r <= -tiny, v <= -tiny / 2)))


def _rel(sv, *ds, k=1):
    for d in ds:
        sv.add(d <= R(k * F(1, 2 ** 24)), -d <= R(k * F(1, 2 ** 24)))


def ggml_symmetric(name, n, nearest):
    """q8_0 (``nearest``: d = A / n, q = roundf(x / d)) and q4_0 / q5_0 (d = M / -n, M the element of largest |x|,
    q = clamp(floor(x / d + n + 1/2), 0, 2n - 1), x~ = d16 (q - n)); d16 = fp16(d); every float32 rounding a
    (1 + e). d16 = 0 (d below 2^-25) reads every element as 0 (the codec writes code 0 there)."""
    x, a, d, d16, idv, t, w, qf, q, xh, e1, f1, e2, e5, f5, e6, e7, e3, f3 = z3.Reals(
        "x A d d16 id t w qf q xh e1 f1 e2 e5 f5 e6 e7 e3 f3")
    sv = z3.SolverFor("QF_NRA")
    sv.set("timeout", 120000)
    sv.add(x <= a, -x <= a, a >= 0, a <= R(65504), f1 <= R(F(1, 2 ** 149)), -f1 <= R(F(1, 2 ** 149)))
    _rel(sv, e1, e2, e5, e6, e7)
    if nearest:
        sv.add(d == a / n * (1 + e1) + f1, d >= 0)                    # amax / 127 in float32 (d >= 0)
    else:
        sv.add(z3.Or(d == a / n + f1, d == -a / n + f1))              # M / -n: exact but for underflow
    _fp16_cast(sv, d, d16, e3, f3)
    bound = R((F(1, 2 * n) if nearest else F(1, n)) + F(1, 2 ** 11)) * R(1 + F(1, 2 ** 9)) * a + R(F(1, 2 ** 18))
    sv.add(z3.Or(z3.And(d16 == 0, xh == 0),
                 z3.And(d16 != 0, idv * d == 1 + e2, t == x * idv * (1 + e5) + f5, f5 <= R(F(1, 2 ** 149)),
                        -f5 <= R(F(1, 2 ** 149)), *(
                     [q - t <= R(F(1, 2)), t - q <= R(F(1, 2)), xh == d16 * q * (1 + e6)] if nearest else
                     [w == (t + n + R(F(1, 2))) * (1 + e7), qf <= w, qf > w - 1,
                      q == z3.If(qf > 2 * n - 1, R(2 * n - 1), z3.If(qf < 0, R(0), qf)),
                      xh == d16 * (q - n) * (1 + e6)]))))
    sv.add(z3.Or(x - xh > bound, xh - x > bound))
    expect_unsat(f"llama.cpp {name} (blocks of 32, FP16 d, float32 arithmetic)", sv)


def ggml_asymmetric(name, n):
    """q4_1 / q5_1: d = (max - min) / n, q = min(floor((x - min) / d + 1/2), n), x~ = fp16(d) q + fp16(min), every
    float32 rounding a (1 + e); d16 = 0 (d below 2^-25) reads every element as fp16(min). In two steps (one query
    times out): (a) the code in units of d, y = (x - min) / d (exact): with t = fl(fl(x - min) fl(1/d)) = y (1 + g),
    |g| <= 3.01 * 2^-24 (three roundings; d >= 2^-25 is a normal float32, so no underflow), |q - y| <= 1/2 +
    2^-21 (y + 1) (plus 2^-149 absolute where the product is subnormal); (b) the stored value from (a), the FP16 casts and the two float32 roundings of d16 q + m16."""
    y, t, g, h, w, qf, q, e5 = z3.Reals("y t g h w qf q e5")
    sv = z3.SolverFor("QF_NRA")
    sv.set("timeout", 120000)
    _rel(sv, e5)
    sv.add(y >= 0, y <= n * R(1 + F(1, 2 ** 22)), g <= R(F(301, 100) * F(1, 2 ** 24)), -g <= R(F(301, 100) * F(1, 2 ** 24)))
    sv.add(h <= R(F(1, 2 ** 149)), -h <= R(F(1, 2 ** 149)))                 # a subnormal product: absolute error
    sv.add(t == y * (1 + g) + h, w == (t + R(F(1, 2))) * (1 + e5), qf <= w, qf > w - 1,
           q == z3.If(qf > n, R(n), z3.If(qf < 0, R(0), qf)))
    step = R(F(1, 2)) + R(F(1, 2 ** 21)) * (y + 1)
    sv.add(z3.Or(q - y > step, y - q > step, q < 0, q > n))
    expect_unsat(f"llama.cpp {name} (a): the code within 1/2 + 2^-21 (y + 1) of (x - min) / d, in [0, {n}]", sv)

    # (b1) P = d q (exact) from (a): multiply by d >= 0; (b2) Q = d16 q with d16 = fp16(d), 0 <= q <= n
    y, q, d, p_, d16, qq, e8, f8, lo, x = z3.Reals("y q d P d16 Q e8 f8 lo x")
    sv = z3.SolverFor("QF_NRA")
    sv.add(d >= 0, x - lo == y * d, y >= 0, q >= 0, q <= n, p_ == d * q,
           q - y <= R(F(1, 2)) + R(F(1, 2 ** 21)) * (y + 1), y - q <= R(F(1, 2)) + R(F(1, 2 ** 21)) * (y + 1))
    sv.add(z3.Or(p_ - (x - lo) > d / 2 + R(F(1, 2 ** 21)) * (x - lo + d),
                 (x - lo) - p_ > d / 2 + R(F(1, 2 ** 21)) * (x - lo + d), p_ < 0, p_ > n * d))
    expect_unsat(f"llama.cpp {name} (b1): |d q - (x - min)| <= d/2 + 2^-21 (x - min + d)", sv)
    sv = z3.SolverFor("QF_NRA")
    _fp16_cast(sv, d, d16, e8, f8)
    sv.add(d >= 0, q >= 0, q <= n, p_ == d * q, qq == d16 * q)
    sv.add(z3.Or(qq - p_ > R(F(1, 2 ** 11)) * p_ + R(n * F(1, 2 ** 25)), p_ - qq > R(F(1, 2 ** 11)) * p_ + R(n * F(1, 2 ** 25))))
    expect_unsat(f"llama.cpp {name} (b2): |fp16(d) q - d q| <= 2^-11 d q + {n} 2^-25", sv)
    # (b3) the stored value fl(fl(Q) + m16), m16 = fp16(min), from (b1), (b2) and d <= R (1 + 2^-23) / n
    x, a, lo, hi, d, p_, qq, m16, xh, e0, e1, e6, e7, e9, f9 = z3.Reals("x A lo hi d P Q m16 xh e0 e1 e6 e7 e9 f9")
    sv = z3.SolverFor("QF_NRA")
    sv.set("timeout", 120000)
    sv.add(lo <= x, x <= hi, a <= R(65504), a >= lo, a >= -lo, a >= hi, a >= -hi)
    _rel(sv, e0, e1, e6, e7)
    sv.add(d == (hi - lo) * (1 + e0) / n * (1 + e1), d >= 0)        # d16 != 0 needs d >= 2^-25: no underflow
    _fp16_cast(sv, lo, m16, e9, f9)
    sv.add(p_ >= 0, p_ <= n * d, p_ - (x - lo) <= d / 2 + R(F(1, 2 ** 21)) * (x - lo + d),
           (x - lo) - p_ <= d / 2 + R(F(1, 2 ** 21)) * (x - lo + d),
           qq - p_ <= R(F(1, 2 ** 11)) * p_ + R(n * F(1, 2 ** 25)), p_ - qq <= R(F(1, 2 ** 11)) * p_ + R(n * F(1, 2 ** 25)))
    sv.add(z3.Or(z3.And(xh == m16, d <= R(F(1, 2 ** 25))),                # d16 = 0 (RNE of d <= 2^-25): codes read as m16
                 xh == (qq * (1 + e6) + m16) * (1 + e7)))
    bound = R(F(1, 2 * n) + F(1, 2 ** 11)) * R(1 + F(1, 2 ** 9)) * (hi - lo) + R(F(1, 2 ** 11) + F(1, 2 ** 20)) * a \
        + R(F(1, 2 ** 18))
    sv.add(z3.Or(x - xh > bound, xh - x > bound))
    expect_unsat(f"llama.cpp {name} (b3): blocks of 32, FP16 d and min, float32 arithmetic", sv)
    # (a)'s premise y <= n (1 + 2^-22): x - min <= max - min = R and d = fl(fl(R) / n) >= R (1 - 2^-24)^2 / n
    yy, rr, dd, e0, e1 = z3.Reals("yy rr dd e0 e1")
    sv = z3.SolverFor("QF_NRA")
    _rel(sv, e0, e1)
    sv.add(rr > 0, dd == rr * (1 + e0) / n * (1 + e1), yy * dd <= rr, yy > n * R(1 + F(1, 2 ** 22)))
    expect_unsat(f"llama.cpp {name}: (x - min) / d <= {n} (1 + 2^-22)", sv)


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
    fp8_fixed_scale_pipeline()
    ggml_symmetric("q8_0", 127, True)
    ggml_symmetric("q4_0", 8, False)
    ggml_symmetric("q5_0", 16, False)
    ggml_asymmetric("q4_1", 15)
    ggml_asymmetric("q5_1", 31)
    if FAILS:
        print(f"{len(FAILS)} lemma(s) NOT proved: {FAILS}")
        return 1
    print("all format error-model lemmas proved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
