"""Symbolic re-derivation of the attention curvature closed forms (docs/design.md §2.1), checked against
what the analyzer implements. Exits non-zero on any mismatch.

1. o = sum_t softmax(s)_t V_t:   d o/d s_t = alpha_t (V_t - o),
                                 d2 o/d s_t^2 = alpha_t (1 - 2 alpha_t) (V_t - o)          (T = 3 and 4)
2. s_t = tau q.K_t:              Hessian of every output component j in K_t equals
                                 tau^2 alpha_t (1 - 2 alpha_t) (V_t - o)_j q q^T            (rank one)
   hence kappa_t = 1/2 max_{|u|=1} ||D2 o [u, u]|| = 1/2 tau^2 |q|^2 alpha_t |1 - 2 alpha_t| ||V_t - o||.
3. o is linear in V_t: its Hessian in V_t is 0 (value curvature 0).
4. The analyzer (hnfverify.analysis.curvature.position_stats / kappa_single) agrees with the symbolic
   Hessian's norm on random rational instances to 1e-9 relative.
"""

import random
import sys

import sympy as sp


def softmax_checks(T: int) -> list[str]:
    fails = []
    s = sp.symbols(f"s0:{T}", real=True)
    V = sp.symbols(f"V0:{T}", real=True)          # one output component; o is linear in V per component
    Z = sum(sp.exp(x) for x in s)
    alpha = [sp.exp(x) / Z for x in s]
    o = sum(a * v for a, v in zip(alpha, V))
    for t in range(T):
        d1 = sp.diff(o, s[t])
        d2 = sp.diff(o, s[t], 2)
        if sp.simplify(d1 - alpha[t] * (V[t] - o)) != 0:
            fails.append(f"T={T}: d o/d s_{t} != alpha_t (V_t - o)")
        if sp.simplify(d2 - alpha[t] * (1 - 2 * alpha[t]) * (V[t] - o)) != 0:
            fails.append(f"T={T}: d2 o/d s_{t}^2 != alpha_t (1 - 2 alpha_t)(V_t - o)")
        if sp.diff(o, V[t], 2) != 0:
            fails.append(f"T={T}: o is not linear in V_{t}")
    return fails


def key_hessian_checks(T: int = 3, d: int = 2, dv: int = 2):
    fails = []
    tau = sp.symbols("tau", positive=True)
    q = sp.Matrix(sp.symbols(f"q0:{d}", real=True))
    K = [sp.Matrix(sp.symbols(f"K{t}_0:{d}", real=True)) for t in range(T)]
    V = [sp.Matrix(sp.symbols(f"V{t}_0:{dv}", real=True)) for t in range(T)]
    s = [tau * q.dot(k) for k in K]
    Z = sum(sp.exp(x) for x in s)
    alpha = [sp.exp(x) / Z for x in s]
    o = sum((a * v for a, v in zip(alpha, V)), sp.zeros(dv, 1))
    t = 1
    for j in range(dv):
        H = sp.hessian(o[j], list(K[t]))
        expected = tau ** 2 * alpha[t] * (1 - 2 * alpha[t]) * (V[t][j] - o[j]) * (q * q.T)
        diff = (H - expected).applyfunc(sp.simplify)
        if diff != sp.zeros(d, d):
            fails.append(f"key Hessian of o_{j} in K_{t} is not tau^2 a(1-2a)(V_t-o)_j q q^T")
    return fails, (tau, q, K, V, o, alpha, t)


def numeric_against_analyzer(sym, trials: int = 5):
    """Evaluate the symbolic Hessian at random rationals; compare 1/2 ||(u^T H_j u)_j|| at u=q/|q|."""
    tau, q, K, V, o, alpha, t = sym
    try:
        import torch

        from hnfverify.analysis.curvature import kappa_single, position_stats
    except ImportError as e:  # the analyzer needs torch; without it this part cannot run
        return [f"cannot import the analyzer: {e}"]
    fails = []
    rng = random.Random(7)
    d, T, dv = len(q), len(K), len(V[0])
    hess = [sp.hessian(o[j], list(K[t])) for j in range(dv)]
    for _ in range(trials):
        vals = {tau: sp.Rational(rng.randint(1, 8), 8)}
        vals.update({x: sp.Rational(rng.randint(-16, 16), 8) for x in q})
        for k in K:
            vals.update({x: sp.Rational(rng.randint(-16, 16), 8) for x in k})
        for v in V:
            vals.update({x: sp.Rational(rng.randint(-16, 16), 8) for x in v})
        qn = sp.Matrix([vals[x] for x in q])
        u = qn / sp.sqrt(qn.dot(qn)) if qn.dot(qn) != 0 else qn
        comp = [(u.T * h.subs(vals) * u)[0, 0] for h in hess]
        ref = sp.N(sp.sqrt(sum(c ** 2 for c in comp)) / 2, 30)
        qt = torch.tensor([float(vals[x]) for x in q], dtype=torch.float64)
        kt = torch.tensor([[float(vals[x]) for x in k] for k in K], dtype=torch.float64)
        vt = torch.tensor([[float(vals[x]) for x in v] for v in V], dtype=torch.float64)
        closed = kappa_single(qt, kt, vt, float(vals[tau]), t)
        st = position_stats(qt[None, None], kt[None], vt[None], float(vals[tau]), torch.ones(1, T, dtype=torch.bool))
        lo, hi = float(st.lo["kappa"][0, t]), float(st.hi["kappa"][0, t])
        r = float(ref)
        if abs(closed - r) > 1e-9 * max(abs(r), 1e-300) + 1e-12:
            fails.append(f"kappa_single {closed!r} != symbolic {r!r}")
        if not (lo <= r * (1 + 1e-12) + 1e-15 and r <= hi * (1 + 1e-12) + 1e-15):
            fails.append(f"analyzer enclosure [{lo!r}, {hi!r}] misses symbolic {r!r}")
    return fails


def main() -> int:
    fails = softmax_checks(3) + softmax_checks(4)
    f2, sym = key_hessian_checks()
    fails += f2
    fails += numeric_against_analyzer(sym)
    for f in fails:
        print("FAIL:", f)
    if fails:
        return 1
    print("curvature closed forms: d o/ds_t, d2 o/ds_t^2 (T=3,4), rank-one key Hessian, value linearity, "
          "and the analyzer's kappa on 5 rational instances: all verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
