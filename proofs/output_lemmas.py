"""Machine checks of the output lemmas O1-O3 (written proofs: docs/design.md §2.6) and of the suffix
composition step O4 (§2.5); the code they justify is the end of hnfverify/core/bound.py. Exits non-zero
unless every check passes AND every deliberately strengthened (false) variant is refuted.

Notation: logits z in R^n of one token (the reference run), z~ = z + dz (the other run),
p = softmax(z), p~ = softmax(z~), osc(x) = max_i x_i - min_i x_i, margin(x) = x_j - max_{k != j} x_k for
the unique argmax j of x, E_p f = sum_i p_i f_i.

  O1  osc(x) <= 2 max_i |x_i|,  osc(x)^2 <= 2 sum_i x_i^2 (osc <= sqrt 2 ||x||_2);
      dz_i = w_i.dH (lm_head rows w_i): |dz_i| <= ||w_i|| ||dH||, so osc(dz) <= Gamma Phi when
      Gamma >= 2 max_i ||w_i|| and Phi >= ||dH|| (>= ||dH_t|| for each token t if Phi bounds the
      Frobenius norm over all tokens).
  O2  Hoeffding's lemma as used: KL(p || p~) <= osc(dz)^2/8 and KL(p~ || p) <= osc(dz)^2/8, via
        KL(p || p~) = log E_p e^dz - E_p dz,   KL(p~ || p) = log E_p~ e^-dz + E_p~ dz;
        psi(l) = log E_p e^(l dz): psi(0) = 0, psi'(0) = E_p dz, psi''(l) = Var_{p_l}(dz) with the
        tilted p_l,i = p_i e^(l dz_i) / E_p e^(l dz) (p_1 = p~);
        Popoviciu: Var <= osc^2/4 for any distribution on values of oscillation osc;
        Taylor: psi(1) = psi(0) + psi'(0) + int_0^1 (1 - l) psi''(l) dl <= psi'(0) + sup psi'' / 2.
  O3  greedy: margin(z~) > osc(dz) (or > Z >= osc(dz))  =>  argmax z = argmax z~ (unique), and
      margin(z) >= margin(z~) - osc(dz); symmetric in the two runs; false with >= (a tie).
  O4  suffix composition (scalar form: norms as nonnegative reals): ||e||^2 = sum_l ||e_l||^2,
      ||J_l e_l|| <= S_l ||e_l||, ||e_l|| <= eps_l, ||R|| <= (K/2) ||e||^2:
        ||sum_l J_l e_l + R|| <= sum_l S_l eps_l + (K/2) sum_l eps_l^2;
      ||e_l||_F <= sqrt(T) b_l when every token's row has norm <= b_l; sum eps^2 <= rho^2 puts e in
      the ball of radius rho.

Kinds of check, as in proofs/attention_lemmas.py:
  sympy  algebraic identities (symbolic, exact);
  z3     inequalities in quantifier-free (nonlinear) real arithmetic: the negation is UNSAT, small n;
  random seeded search over exact-rational instances (fractions.Fraction): O1, O3, O4 decided exactly;
         O2's KL evaluated with mpmath at 60 significant digits (the working precision raised by the
         digits lost to cancellation when osc is tiny), each comparison required to hold up to 1e-40
         relative to the bound; the Taylor remainder and Popoviciu on the tilted distributions also
         numerically (mpmath quad).
Sanity: strengthened false statements (a constant 1.9 for 2, >= for >, 8.5 for 8, K/4 for K/2, ...)
must each be refuted (z3 SAT, or a counterexample in the same case stream) -- the checks are not vacuous.
"""

import math
import random
import sys
import time
from fractions import Fraction as F

import mpmath as mp
import sympy as sp
import z3

SEED = 20250612
Z3_TIMEOUT_MS = 30000
DIGITS = 60
TOL = mp.mpf(10) ** -40


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parent))
from _tally import Tally, zabs, zreals  # noqa: E402





def zmax(xs):
    m = xs[0]
    for x in xs[1:]:
        m = z3.If(x > m, x, m)
    return m


def zmin(xs):
    m = xs[0]
    for x in xs[1:]:
        m = z3.If(x < m, x, m)
    return m


def zosc(xs):
    return zmax(xs) - zmin(xs)


def sqr(e):
    return e * e


def Q(x):
    x = F(x)
    return z3.RealVal(f"{x.numerator}/{x.denominator}")


def osc(xs):
    return max(xs) - min(xs)


def M(x):
    x = F(x)
    return mp.mpf(x.numerator) / x.denominator


def rand_frac(rng, scale=1):
    return F(rng.randint(-10 ** 6, 10 ** 6), 10 ** 6) * F(scale)


def unique_argmax(xs):
    top = max(xs)
    idx = [i for i, x in enumerate(xs) if x == top]
    return idx[0] if len(idx) == 1 else None


def margin_of(xs, j):
    rest = [x for k, x in enumerate(xs) if k != j]
    return xs[j] - max(rest) if rest else None


# ---------------------------------------------------------------------------------------------
# O1 oscillation inequalities and the lm_head step
# ---------------------------------------------------------------------------------------------

def check_O1_osc(rng):
    T = Tally()
    for n in (2, 3, 4, 5):
        x = zreals("x", n)
        amax = zmax([zabs(v) for v in x])
        T.z3_proves(f"n={n}: 0 <= osc(x) <= 2 max|x_i|", [], z3.And(zosc(x) >= 0, zosc(x) <= 2 * amax))
        T.z3_refutes(f"n={n}: osc <= 1.9 max|x_i|", [], zosc(x) <= Q(F(19, 10)) * amax)
    for n in (2, 3, 4):
        x = zreals("x", n)
        sq = sum(v * v for v in x)
        T.z3_proves(f"n={n}: osc(x)^2 <= 2 sum x_i^2", [], sqr(zosc(x)) <= 2 * sq)
        T.z3_refutes(f"n={n}: osc^2 <= 1.9 sum x^2", [], sqr(zosc(x)) <= Q(F(19, 10)) * sq)
    # the pairwise form the two rest on: (x_i - x_k)^2 = 2 x_i^2 + 2 x_k^2 - (x_i + x_k)^2
    a, b = sp.symbols("a b", real=True)
    T.sympy_zero("(a - b)^2 = 2a^2 + 2b^2 - (a + b)^2", (a - b) ** 2 - (2 * a * a + 2 * b * b - (a + b) ** 2))
    # the lm_head step: dz_i = w_i . dH, Cauchy-Schwarz (d = 2, 3)
    for d in (2, 3):
        w, h = zreals("w", d), zreals("h", d)
        nw, nh = z3.Reals("nw nh")
        T.z3_proves(f"d={d}: |w.dH| <= ||w|| ||dH||",
                    [nw >= 0, nh >= 0, nw * nw == sum(v * v for v in w), nh * nh == sum(v * v for v in h)],
                    zabs(sum(u * v for u, v in zip(w, h))) <= nw * nh)
    for n in (2, 3):
        dz, nw = zreals("dz", n), zreals("nw", n)
        nh, G, P = z3.Reals("nh G P")
        hyps = ([v >= 0 for v in nw] + [nh >= 0, nh <= P] + [G >= 2 * v for v in nw]
                + [zabs(u) <= v * nh for u, v in zip(dz, nw)])
        T.z3_proves(f"n={n}: |dz_i| <= ||w_i|| ||dH||, Gamma >= 2 max ||w_i||, Phi >= ||dH|| => osc(dz) <= Gamma Phi",
                    hyps, zosc(dz) <= G * P)
    # the constant 2 is needed for real rows: the complete model for two rows in d = 2 (w_2 = -w_1, dH = w_1)
    w1, w2, h = zreals("wa", 2), zreals("wb", 2), zreals("h", 2)
    n1, n2, nh, G, P = z3.Reals("n1 n2 nh G P")
    dot = lambda u, v: u[0] * v[0] + u[1] * v[1]
    full = [n1 >= 0, n2 >= 0, nh >= 0, n1 * n1 == dot(w1, w1), n2 * n2 == dot(w2, w2), nh * nh == dot(h, h),
            G >= 2 * n1, G >= 2 * n2, P >= nh]
    T.z3_refutes("two rows, d=2: osc(W dH) <= 0.95 Gamma Phi (i.e. Gamma = 1.9 max ||w||)", full,
                 zosc([dot(w1, h), dot(w2, h)]) <= Q(F(95, 100)) * G * P)
    for nt in (2, 3):
        hs = zreals("ht", nt)
        Fr = z3.Real("Fr")
        T.z3_proves(f"T={nt}: ||dH_t|| <= ||dH||_F (Frobenius over the tokens)",
                    [v >= 0 for v in hs] + [Fr >= 0, Fr * Fr == sum(v * v for v in hs)], z3.And(*[v <= Fr for v in hs]))

    # exact search
    cases = []
    for n in (1, 2, 3, 5, 50):
        for c in (F(0), F(1), F(-7, 3), F(10) ** -30, F(200)):
            cases.append([c] * n)                                          # constant: osc = 0
    for _ in range(100):                                                   # planted equality (a, -a, 0, ...)
        n = rng.choice((2, 3, 5, 50))
        a = rand_frac(rng, rng.choice((1, F(1, 10 ** 30), 200)))
        cases.append([a, -a] + [F(0)] * (n - 2))
    while len(cases) < 3000:
        n = rng.choice((1, 2, 3, 4, 5, 8, 50))
        sc = rng.choice((F(1), F(1, 10 ** 30), F(200), F(10) ** 6))
        mode = rng.choice(("random", "spike", "shifted"))
        if mode == "random":
            x = [rand_frac(rng, sc) for _ in range(n)]
        elif mode == "spike":
            x = [F(0)] * n
            x[rng.randrange(n)] = rand_frac(rng, sc)
        else:
            c = rand_frac(rng, sc)
            x = [c + rand_frac(rng, sc / 1000) for _ in range(n)]
        cases.append(x)
    for x in cases:
        T.n_cases += 1
        o, amax, sq = osc(x), max(abs(v) for v in x), sum(v * v for v in x)
        T.holds("osc <= 2 max|x|", 0 <= o <= 2 * amax, x[:4])
        T.holds("osc^2 <= 2 sum x^2", o * o <= 2 * sq, x[:4])
        T.false_stmt("osc <= 1.9 max|x|", o <= F(19, 10) * amax)
        T.false_stmt("osc^2 <= 1.9 sum x^2", o * o <= F(19, 10) * sq)
    # lm_head rows: exact dz = W dH with rational rows; ||.|| bounded above by exact rational roots
    for _ in range(500):
        n, d = rng.choice((2, 3, 8)), rng.choice((1, 2, 4))
        W = [[rand_frac(rng) for _ in range(d)] for _ in range(n)]
        if rng.random() < 0.2:                                             # planted: w_2 = -w_1, dH = w_1
            W[1] = [-v for v in W[0]]
            H = list(W[0])
        else:
            H = [rand_frac(rng, rng.choice((1, F(1, 10 ** 20)))) for _ in range(d)]
        dz = [sum(a * b for a, b in zip(w, H)) for w in W]
        sq_w = max(sum(v * v for v in w) for w in W)
        sq_h = sum(v * v for v in H)
        # osc <= 2 max||w|| ||dH||  <=>  osc^2 <= 4 max||w||^2 ||dH||^2 (both sides >= 0): exact
        T.n_cases += 1
        T.holds("osc(W dH) <= 2 max||w|| ||dH||", osc(dz) ** 2 <= 4 * sq_w * sq_h, (W, H))
        T.false_stmt("osc(W dH) <= 1.9 max||w|| ||dH||", osc(dz) ** 2 <= F(19, 10) ** 2 * sq_w * sq_h)
    return T


# ---------------------------------------------------------------------------------------------
# O3 the greedy lemma
# ---------------------------------------------------------------------------------------------

def check_O3_greedy(rng):
    T = Tally()
    for n in (2, 3, 4, 5):
        zt, dz = zreals("zt", n), zreals("dz", n)
        z = [a - b for a, b in zip(zt, dz)]                                   # z~ = z + dz
        for j in range(n):
            others = [k for k in range(n) if k != j]
            marg = zt[j] - zmax([zt[k] for k in others])
            kept = z3.And(*[z[j] > z[k] for k in others])
            T.z3_proves(f"n={n}, j={j}: margin(z~) > osc(dz) => argmax z = j uniquely", [marg > zosc(dz)], kept)
            if j == 0:
                T.z3_proves(f"n={n}: margin(z) >= margin(z~) - osc(dz)", [],
                            z[j] - zmax([z[k] for k in others]) >= marg - zosc(dz))
                Zv = z3.Real("Z")
                zform = [dz[i] - dz[k] <= Zv for i in range(n) for k in range(n)] + [zt[j] - zt[k] > Zv for k in others]
                T.z3_proves(f"n={n}: the code's form: Z >= dz_i - dz_k (all i, k), margin > Z => kept", zform, kept)
                marg_z = z[j] - zmax([z[k] for k in others])
                T.z3_proves(f"n={n}: symmetric: margin(z) > osc(dz) => argmax z~ = j uniquely", [marg_z > zosc(dz)],
                            z3.And(*[zt[j] > zt[k] for k in others]))
                T.z3_refutes(f"n={n}: margin >= osc => kept", [marg >= zosc(dz)], kept)
                T.z3_refutes(f"n={n}: margin > max|dz_i| => kept", [marg > zmax([zabs(v) for v in dz])], kept)
                T.z3_refutes(f"n={n}: margin(z) >= margin(z~) - osc/2", [],
                             z[j] - zmax([z[k] for k in others]) >= marg - zosc(dz) / 2)

    # exact search: z~ with a unique argmax j, dz with osc = u * margin for u < 1, u = 1 (tie planted), u > 1
    n_kept = n_tie = 0
    for i in range(4000):
        n = rng.choice((1, 2, 3, 5, 50))
        sc = rng.choice((F(1), F(1, 10 ** 30), F(200)))
        mode = rng.choice(("random", "dominant", "near-tie"))
        zt = [rand_frac(rng, sc) for _ in range(n)]
        if mode == "dominant":
            zt[rng.randrange(n)] = 1000 * sc
        elif mode == "near-tie" and n >= 2:
            a, b = rng.sample(range(n), 2)
            zt[a] = max(zt) + sc / 10 ** 6
            zt[b] = zt[a] - sc / 10 ** rng.randint(6, 30)
        j = unique_argmax(zt)
        if j is None:
            continue
        m = margin_of(zt, j)
        u = rng.choice((F(rng.randint(0, 999), 1000), F(1) - F(1, 10 ** 20), F(1), F(1), F(3, 2)))
        o = (m if m is not None else sc) * u
        dz = [o / 2 * F(rng.randint(-1000, 1000), 1000) for _ in range(n)]
        if n >= 2 and u == 1:                                               # the tie: z_j - z_k2 = m - osc = 0
            k2 = max((k for k in range(n) if k != j), key=lambda k: zt[k])
            dz[j], dz[k2] = o / 2, -o / 2
        elif n >= 2:
            a, b = rng.sample(range(n), 2)
            dz[a], dz[b] = o / 2, -o / 2                                    # osc(dz) = o exactly
        od = osc(dz)
        z = [a - b for a, b in zip(zt, dz)]
        T.n_cases += 1
        jz = unique_argmax(z)
        if m is None or m > od:
            n_kept += 1
            T.holds("margin > osc => kept", jz == j, (zt[:4], dz[:4]))
            if m is not None:
                T.holds("margin(z) >= margin(z~) - osc", margin_of(z, j) >= m - od, (zt[:4], dz[:4]))
        if m is not None:
            if m == od:
                n_tie += 1
            T.false_stmt("margin >= osc => kept", not (m >= od) or jz == j)
    T.n_cases_kept, T.n_ties = n_kept, n_tie
    return T


# ---------------------------------------------------------------------------------------------
# O2 Hoeffding's lemma, both directions
# ---------------------------------------------------------------------------------------------

def hoeffding_sympy(T):
    n = 3
    z = sp.symbols(f"z0:{n}", real=True)
    d = sp.symbols(f"d0:{n}", real=True)
    Zs = sum(sp.exp(v) for v in z)
    p = [sp.exp(v) / Zs for v in z]
    Zt = sum(sp.exp(a + b) for a, b in zip(z, d))
    pt = [sp.exp(a + b) / Zt for a, b in zip(z, d)]
    S = sum(a * sp.exp(b) for a, b in zip(p, d))
    T.sympy_zero("sum p = 1", sum(p) - 1)
    for i in range(n):
        T.sympy_zero(f"p~_{i} = p_{i} e^dz_{i} / S, S = E_p e^dz", pt[i] - p[i] * sp.exp(d[i]) / S)
        T.sympy_zero(f"p_{i} / p~_{i} = S e^-dz_{i}", p[i] / pt[i] - S * sp.exp(-d[i]))
    Sp = sp.symbols("S", positive=True)
    for i in range(n):
        T.sympy_zero(f"log(S e^-dz_{i}) = log S - dz_{i} (S > 0)", sp.expand_log(sp.log(Sp * sp.exp(-d[i]))) - (sp.log(Sp) - d[i]))
    # KL(p||p~) = sum p_i (log S - dz_i) = log S - E_p dz, using sum p = 1
    T.sympy_zero("sum p_i (log S - dz_i) = log S - E_p dz",
                 sum(p[i] * (sp.log(Sp) - d[i]) for i in range(n)) - (sp.log(Sp) - sum(p[i] * d[i] for i in range(n))))
    # reverse: KL(p~||p) = sum p~_i (dz_i - log S) = E_p~ dz - log S, and E_p~ e^-dz = 1/S, so
    # KL(p~||p) = log E_p~ e^(-dz) - E_p~ (-dz): Hoeffding's form for (p~, -dz), osc(-dz) = osc(dz)
    T.sympy_zero("E_p~ e^-dz = 1/S", sum(pt[i] * sp.exp(-d[i]) for i in range(n)) - 1 / S)
    T.sympy_zero("sum p~ = 1", sum(pt) - 1)
    # psi on a general distribution (q_i > 0, sum q = 1 imposed by substitution)
    q = list(sp.symbols(f"q0:{n}", positive=True))
    lam = sp.symbols("l", real=True)
    qs = {q[-1]: 1 - sum(q[:-1])}
    Eq = sum(a * sp.exp(lam * b) for a, b in zip(q, d))
    psi = sp.log(Eq)
    ql = [a * sp.exp(lam * b) / Eq for a, b in zip(q, d)]                   # the tilted distribution p_l
    T.sympy_zero("psi(0) = log sum q = 0", psi.subs(lam, 0).subs(qs))
    T.sympy_zero("psi'(0) = E_q dz", (sp.diff(psi, lam).subs(lam, 0) - sum(a * b for a, b in zip(q, d))).subs(qs))
    m1 = sum(a * b for a, b in zip(ql, d))
    m2 = sum(a * b * b for a, b in zip(ql, d))
    T.sympy_zero("psi'(l) = E_{p_l} dz", sp.diff(psi, lam) - m1)
    T.sympy_zero("psi''(l) = E_{p_l} dz^2 - (E_{p_l} dz)^2 = Var_{p_l}(dz)", sp.diff(psi, lam, 2) - (m2 - m1 ** 2))
    T.sympy_zero("the tilted p_l sums to 1", sum(ql) - 1)
    T.sympy_zero("p_1 = p~ when q = softmax(z)",
                 (ql[0].subs(lam, 1).subs({a: b for a, b in zip(q, p)})) - pt[0])
    # Popoviciu: Var = E (x - c)^2 - (E x - c)^2 for every c
    c = sp.symbols("c", real=True)
    Ex = sum(a * b for a, b in zip(q, d))
    T.sympy_zero("Var = E(x - c)^2 - (E x - c)^2 (sum q = 1)",
                 (sum(a * b * b for a, b in zip(q, d)) - Ex ** 2
                  - (sum(a * (b - c) ** 2 for a, b in zip(q, d)) - (Ex - c) ** 2)).subs(qs))
    # Taylor with integral remainder: G(t) = f(t) - f(0) - t f'(0) - int_0^t (t - s) f''(s) ds has
    # G(0) = G'(0) = 0 and G'' = 0, so G = 0; and int_0^1 (1 - s) ds = 1/2
    t, s = sp.symbols("t s", real=True)
    f = sp.Function("f")
    Rm = sp.Integral((t - s) * sp.diff(f(s), s, 2), (s, 0, t))
    G = f(t) - f(0) - t * sp.Subs(sp.diff(f(t), t), t, 0) - Rm
    T.sympy_zero("Taylor: G'' = 0", sp.diff(G, t, 2).doit())
    T.sympy_zero("Taylor: G(0) = 0", G.subs(t, 0).doit())
    T.sympy_zero("Taylor: G'(0) = 0", sp.diff(G, t).doit().subs(t, 0).doit())
    T.sympy_true("int_0^1 (1 - s) ds = 1/2", sp.integrate(1 - s, (s, 0, 1)) == sp.Rational(1, 2))


def hoeffding_z3(T):
    for n in (2, 3):
        p, x = zreals("p", n), zreals("x", n)
        A, B = z3.Reals("A B")
        base = [v >= 0 for v in p] + [sum(p) == 1] + [z3.And(A <= v, v <= B) for v in x]
        Ex = sum(a * b for a, b in zip(p, x))
        var = sum(a * b * b for a, b in zip(p, x)) - Ex * Ex
        if n == 2:                                       # n = 3 in this form times out; the step form below
            T.z3_proves(f"n={n}: Popoviciu Var <= (b - a)^2/4 on [a, b]", base, var <= (B - A) ** 2 / 4)
        T.z3_proves(f"n={n}: Var <= osc(x)^2/4", [v >= 0 for v in p] + [sum(p) == 1], var <= sqr(zosc(x)) / 4)
        T.z3_proves(f"n={n}: Var >= 0", [v >= 0 for v in p] + [sum(p) == 1], var >= 0)
        T.z3_refutes(f"n={n}: Var <= osc^2/4.5", [v >= 0 for v in p] + [sum(p) == 1], var <= sqr(zosc(x)) / Q(F(9, 2)))
    # step form (the written proof): c = (a+b)/2, s_i = (x_i - c)^2 <= W = (b-a)^2/4 (next check),
    # D = (E x - c)^2 >= 0, Var = E (x - c)^2 - D (sympy above)
    for n in (2, 3, 5, 8):
        p, sqd = zreals("p", n), zreals("sq", n)
        W, D, V = z3.Reals("W D V")
        step = ([v >= 0 for v in p] + [sum(p) == 1] + [u <= W for u in sqd] + [D >= 0]
                + [V == sum(a * u for a, u in zip(p, sqd)) - D])
        T.z3_proves(f"n={n}: s_i <= W, Var = E s - D, D >= 0 => Var <= W", step, V <= W)
    xv, A, B = z3.Reals("x A B")
    T.z3_proves("a <= x <= b => (x - (a+b)/2)^2 <= (b-a)^2/4", [A <= xv, xv <= B], (xv - (A + B) / 2) ** 2 <= (B - A) ** 2 / 4)
    # the chain: KL = psi(1) - psi(0) - psi'(0) = int_0^1 (1-l) psi'' <= V/2 with 0 <= psi'' <= V <= osc^2/4;
    # osc <= Z  =>  osc^2/8 <= Z^2/8 <= round_up(Z^2/8)
    kl, rem, V, o, Zv, up, h = z3.Reals("kl rem V o Z up half")
    T.z3_proves("KL = rem <= V/2, V <= osc^2/4, 0 <= osc <= Z, up >= Z^2/8 => KL <= osc^2/8 <= up",
                [kl == rem, rem <= V / 2, V <= o * o / 4, o >= 0, o <= Zv, up >= Zv * Zv / 8],
                z3.And(kl <= o * o / 8, o * o / 8 <= up))
    T.z3_proves("0 <= g <= V on [0, 1]: int (1 - l) g <= V int (1 - l) (pointwise, 1 - l >= 0)",
                [h >= 0, h <= 1, V >= 0, rem >= 0, rem <= V], (1 - h) * rem <= (1 - h) * V)


def kl_pair(p, dz):
    """(KL(p || p~), KL(p~ || p), KL(p || p~) by its definition) with p~ = p e^dz / E_p e^dz.
    Shift-invariant, so dz is shifted to [0, osc]; log1p/expm1 keep the osc-sized terms accurate."""
    lo = min(dz)
    y = [M(v - lo) for v in dz]
    Em1 = mp.fsum(a * mp.expm1(b) for a, b in zip(p, y))                   # E_p e^y - 1
    logS = mp.log1p(Em1)
    Ey = mp.fsum(a * b for a, b in zip(p, y))
    S = 1 + Em1
    pt = [a * mp.exp(b) / S for a, b in zip(p, y)]
    Eyt = mp.fsum(a * b for a, b in zip(pt, y))
    fwd = logS - Ey
    rev = Eyt - logS
    direct = mp.fsum(a * (mp.log(a) - mp.log(b)) for a, b in zip(p, pt) if a > 0)
    return fwd, rev, direct


def softmax_mp(z):
    zs = [M(v) for v in z]
    top = max(zs)
    e = [mp.exp(v - top) for v in zs]
    s = mp.fsum(e)
    return [v / s for v in e]


def o3_cases(rng):
    """(p as rationals or None, z, dz): exact-rational instances; p = softmax(z) when p is None."""
    cases = []
    tiny = F(1, 10 ** 30)
    for n in (1, 2, 3, 50):                                                 # n = 1, all-equal, constant dz
        for c in (F(0), F(3, 7), F(200)):
            cases.append((None, [F(0)] * n, [c] * n))
            cases.append((None, [F(5, 3)] * n, [c + (tiny if i == 0 else 0) for i in range(n)]))
    for a in (F(1, 10), F(1, 1000), tiny, F(1), F(3), F(200), F(1, 10 ** 8)):   # two-point, p = 1/2: KL ~ a^2/8
        cases.append(([F(1, 2), F(1, 2)], None, [F(0), a]))
        cases.append(([F(1, 2), F(1, 2)], None, [-a / 2, a / 2]))
    for _ in range(150):                                                   # two-point extremal, nearly tight
        a = rng.choice((F(rng.randint(1, 1000), 10 ** rng.randint(3, 30)), F(rng.randint(1, 200), 100)))
        q = F(1, 2) + F(rng.randint(-100, 100), 10 ** rng.randint(3, 8))
        cases.append(([q, 1 - q], None, [F(0), a]))
        n = rng.choice((3, 50))                                             # the same with n - 2 idle logits
        w = [q, 1 - q] + [F(1, 10 ** 40)] * (n - 2)
        s = sum(w)
        cases.append(([v / s for v in w], None, [F(0), a] + [a * F(rng.randint(0, 1000), 1000) for _ in range(n - 2)]))
    while len(cases) < 2500:
        n = rng.choice((1, 2, 2, 3, 3, 5, 8, 50))
        zscale = rng.choice((F(1), F(10), F(1, 100)))
        z = [rand_frac(rng, zscale) for _ in range(n)]
        shape = rng.choice(("random", "dominant", "equal"))
        if shape == "dominant":
            z[rng.randrange(n)] = F(rng.choice((20, 50, 1000)))
        elif shape == "equal":
            z = [z[0]] * n
        osc_scale = rng.choice((tiny, F(1, 10 ** 6), F(1, 100), F(1, 2), F(1), F(3), F(10), F(200)))
        dmode = rng.choice(("random", "spike", "twolevel", "pm"))
        if dmode == "random":
            dz = [rand_frac(rng, osc_scale) for _ in range(n)]
        elif dmode == "spike":
            dz = [F(0)] * n
            dz[rng.randrange(n)] = osc_scale * rng.choice((1, -1))
        elif dmode == "twolevel":
            dz = [osc_scale if rng.random() < 0.5 else F(0) for _ in range(n)]
        else:
            dz = [osc_scale / 2 * rng.choice((1, -1)) for _ in range(n)]
        cases.append((None, z, dz))
    return cases


def digits_for(o):
    """Working precision: DIGITS significant digits of KL relative to osc^2/8 (KL's definition loses up to
    2 log10(1/osc) digits to cancellation when osc < 1), plus guard digits."""
    lost = 0 if o == 0 or o >= 1 else math.ceil(-math.log10(float(o)))
    return DIGITS + 2 * lost + 10


def check_O2_kl(rng):
    T = Tally()
    hoeffding_sympy(T)
    hoeffding_z3(T)
    worst = {"fwd": mp.mpf(0), "rev": mp.mpf(0)}
    gap = {"fwd": mp.mpf(1), "rev": mp.mpf(1)}                             # smallest 1 - KL/(osc^2/8) seen
    for p_rat, z, dz in o3_cases(rng):
        o = osc(dz)
        with mp.workdps(digits_for(o)):
            p = [M(v) for v in p_rat] if p_rat is not None else softmax_mp(z)
            fwd, rev, direct = kl_pair(p, dz)
            B = M(o) ** 2 / 8
            slack = TOL * B
            T.n_cases += 1
            T.holds("KL(p||p~) identity = definition", abs(fwd - direct) <= slack + TOL * abs(fwd), (p_rat, z, dz))
            T.holds("KL(p||p~) >= 0 and KL(p~||p) >= 0", fwd >= -slack and rev >= -slack, (z, dz))
            T.holds("KL(p||p~) <= osc^2/8", fwd <= B + slack, (p_rat, z, dz, fwd, B))
            T.holds("KL(p~||p) <= osc^2/8", rev <= B + slack, (p_rat, z, dz, rev, B))
            T.false_stmt("KL(p||p~) <= osc^2/8.5", fwd <= M(o) ** 2 / mp.mpf(8.5) + slack)
            T.false_stmt("KL(p~||p) <= osc^2/8.5", rev <= M(o) ** 2 / mp.mpf(8.5) + slack)
            if o > 0:
                worst["fwd"] = max(worst["fwd"], fwd / B)
                worst["rev"] = max(worst["rev"], rev / B)
                gap["fwd"] = min(gap["fwd"], 1 - fwd / B)
                gap["rev"] = min(gap["rev"], 1 - rev / B)
    # Taylor step and Popoviciu on the tilted distribution, numerically: psi(1) - psi'(0) = int_0^1 (1-l) psi''
    with mp.workdps(40):
        for _ in range(12):
            n = rng.choice((2, 3, 5))
            p = softmax_mp([rand_frac(rng, 3) for _ in range(n)])
            dz = [M(rand_frac(rng, rng.choice((1, 5)))) for _ in range(n)]
            o = max(dz) - min(dz)

            def moments(lv):
                w = [a * mp.exp(lv * b) for a, b in zip(p, dz)]
                s = mp.fsum(w)
                m1 = mp.fsum(a * b for a, b in zip(w, dz)) / s
                m2 = mp.fsum(a * b * b for a, b in zip(w, dz)) / s
                return s, m1, m2 - m1 * m1

            s1, _, _ = moments(mp.mpf(1))
            _, d0, _ = moments(mp.mpf(0))
            integral = mp.quad(lambda lv: (1 - lv) * moments(lv)[2], [0, 1])
            T.n_cases += 1
            T.holds("psi(1) - psi(0) - psi'(0) = int_0^1 (1-l) psi''(l) dl",
                    abs(mp.log(s1) - d0 - integral) <= mp.mpf(10) ** -30 * (1 + o * o), (p, dz))
            for lv in mp.linspace(-2, 2, 9):
                T.holds("psi''(l) = Var_{p_l} <= osc^2/4", moments(lv)[2] <= o * o / 4 * (1 + mp.mpf(10) ** -30), (p, dz, lv))
    T.worst, T.gap = worst, gap
    return T


# ---------------------------------------------------------------------------------------------
# O4 the suffix composition (scalar form)
# ---------------------------------------------------------------------------------------------

def check_O4_composition(rng):
    T = Tally()
    for L in (2, 3):
        ne, eps, S, a = zreals("n", L), zreals("eps", L), zreals("S", L), zreals("a", L)
        K, r, N, rho = z3.Reals("K r N rho")
        sq_e = sum(v * v for v in ne)                                        # ||e||^2 = sum ||e_l||^2
        hyps = ([v >= 0 for v in ne] + [u <= v for u, v in zip(ne, eps)] + [v >= 0 for v in S]
                + [z3.And(0 <= u, u <= s * v) for u, s, v in zip(a, S, ne)]
                + [K >= 0, r >= 0, r <= K / 2 * sq_e, N >= 0, N <= sum(a) + r])
        bound = sum(s * v for s, v in zip(S, eps)) + K / 2 * sum(v * v for v in eps)
        T.z3_proves(f"L={L}: ||sum J_l e_l + R|| <= sum S_l eps_l + (K/2) sum eps_l^2", hyps, N <= bound)
        T.z3_proves(f"L={L}: sum eps_l^2 <= rho^2 => ||e|| <= rho (e in the ball of K)",
                    [v >= 0 for v in ne] + [u <= v for u, v in zip(ne, eps)] + [rho >= 0, sum(v * v for v in eps) <= rho * rho],
                    sq_e <= rho * rho)
        T.z3_refutes(f"L={L}: ... + (K/4) sum eps^2", hyps, N <= sum(s * v for s, v in zip(S, eps)) + K / 4 * sum(v * v for v in eps))
        T.z3_refutes(f"L={L}: ... + (K/2) max eps^2", hyps,
                     N <= sum(s * v for s, v in zip(S, eps)) + K / 2 * zmax([v * v for v in eps]))
        T.z3_refutes(f"L={L}: 0.9 sum S_l eps_l + (K/2) sum eps^2", hyps,
                     N <= Q(F(9, 10)) * sum(s * v for s, v in zip(S, eps)) + K / 2 * sum(v * v for v in eps))
    # the triangle inequality in d = 2 (for two summands; more by induction) and the operator-norm step
    u, v = zreals("u", 2), zreals("v", 2)
    nu, nv, nw = z3.Reals("nu nv nw")
    T.z3_proves("d=2: ||u + v|| <= ||u|| + ||v||",
                [nu >= 0, nv >= 0, nw >= 0, nu * nu == u[0] ** 2 + u[1] ** 2, nv * nv == v[0] ** 2 + v[1] ** 2,
                 nw * nw == (u[0] + v[0]) ** 2 + (u[1] + v[1]) ** 2], nw <= nu + nv)
    # ||e_l||_F <= sqrt(T) b_l <= sq b_l <= eps_l = round_up(sq b_l), sq >= sqrt(T)
    for nt in (2, 3):
        rows = zreals("row", nt)
        Fr, b, sq, ep = z3.Reals("Fr b sq ep")
        T.z3_proves(f"T={nt}: rows <= b, sq^2 >= T, eps >= sq b => ||e_l||_F <= eps",
                    [z3.And(x >= 0, x <= b) for x in rows] + [Fr >= 0, Fr * Fr == sum(x * x for x in rows),
                                                               sq >= 0, sq * sq >= nt, ep >= sq * b], Fr <= ep)
        T.z3_refutes(f"T={nt}: ||e_l||_F <= b (without sqrt T)",
                     [z3.And(x >= 0, x <= b) for x in rows] + [Fr >= 0, Fr * Fr == sum(x * x for x in rows)], Fr <= b)
    # the code's rounding: Phi = up(sum up(S eps) + up(K ss/2)) with up(x) >= x
    L = 3
    S, eps, u1 = zreals("S", L), zreals("eps", L), zreals("u", L)
    K, u2, Phi = z3.Reals("K u2 Phi")
    ss = sum(x * x for x in eps)
    T.z3_proves("Phi = up(sum up(S_l eps_l) + up(K ss/2)) >= sum S_l eps_l + (K/2) ss",
                [x >= s * e for x, s, e in zip(u1, S, eps)] + [u2 >= K * ss / 2, Phi >= sum(u1) + u2],
                Phi >= sum(s * e for s, e in zip(S, eps)) + K / 2 * ss)
    # exact search in the scalar form, with planted equality (aligned J_l e_l and R)
    for i in range(2000):
        L = rng.choice((1, 2, 3, 30))
        eps_ = [F(rng.randint(0, 10 ** 4), 10 ** rng.randint(2, 8)) for _ in range(L)]
        S_ = [F(rng.randint(0, 10 ** 4), 10 ** rng.randint(1, 4)) for _ in range(L)]
        K_ = F(rng.randint(0, 10 ** 6), 10 ** rng.randint(0, 4))
        planted = i % 4 == 0
        ne = eps_ if planted else [e * F(rng.randint(0, 1000), 1000) for e in eps_]
        a_ = [s * v for s, v in zip(S_, ne)] if planted else [s * v * F(rng.randint(0, 1000), 1000) for s, v in zip(S_, ne)]
        r_ = K_ / 2 * sum(v * v for v in ne) * (1 if planted else F(rng.randint(0, 1000), 1000))
        N_ = sum(a_) + r_ if planted else (sum(a_) + r_) * F(rng.randint(0, 1000), 1000)
        bound = sum(s * e for s, e in zip(S_, eps_)) + K_ / 2 * sum(e * e for e in eps_)
        T.n_cases += 1
        T.holds("composition", N_ <= bound, (eps_, S_, K_))
        T.false_stmt("composition with K/4", N_ <= sum(s * e for s, e in zip(S_, eps_)) + K_ / 4 * sum(e * e for e in eps_))
    return T


def main() -> int:
    t0 = time.time()
    rng = random.Random(SEED)
    results = []
    T1 = check_O1_osc(random.Random(SEED + 1))
    print(T1.line("O1 osc(x) <= 2 max|x_i|, osc^2 <= 2 sum x^2, osc(W dH) <= Gamma Phi", "check_O1_osc"))
    results.append(T1)
    T2 = check_O2_kl(random.Random(SEED + 3))
    print(T2.line("O2 Hoeffding: KL(p||p~) <= osc^2/8 and KL(p~||p) <= osc^2/8", "check_O2_kl",
                  f"; max KL/(osc^2/8): forward {mp.nstr(T2.worst['fwd'], 6)} (1 - {mp.nstr(T2.gap['fwd'], 3)}), "
                  f"reverse {mp.nstr(T2.worst['rev'], 6)} (1 - {mp.nstr(T2.gap['rev'], 3)})"))
    results.append(T2)
    T3 = check_O3_greedy(random.Random(SEED + 2))
    print(T3.line("O3 greedy: margin(z~) > osc(dz) => same unique argmax (not with >=)", "check_O3_greedy",
                  f"; {T3.n_cases_kept} cases with margin > osc, {T3.n_ties} with margin == osc"))
    results.append(T3)
    T4 = check_O4_composition(rng)
    print(T4.line("O4 suffix composition ||sum J_l e_l + R|| <= sum S_l eps_l + (K/2) sum eps_l^2", "check_O4_composition"))
    results.append(T4)
    bad = [f for T in results for f in T.fails]
    for f in bad[:40]:
        print("FAIL:", f)
    ok = all(T.ok() for T in results)
    print(("output lemmas O1-O4: all checks passed and all strengthened statements refuted"
           if ok else "output lemmas: NOT all verified") + f" ({time.time() - t0:.1f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
