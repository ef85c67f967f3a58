"""SMT-LIB2 text for the solver queries, and running them with a hard wall-clock limit.

Queries are plain SMT-LIB 2.6 (QF_NRA / NRA / QF_LRA) with ``(set-info :status unsat)``, so any
solver can replay them. ``run_queries`` solves them in a *subprocess* (``python -m
hnfverify.core.verify.smt``) so a hung solver is killed at the deadline: every query without an
answer is then ``unknown``, which fails closed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction

SEED = 0


def lit(x: Fraction) -> str:
    """An exact SMT-LIB real literal."""
    x = Fraction(x)
    if x < 0:
        return f"(- {lit(-x)})"
    if x.denominator == 1:
        return f"{x.numerator}.0"
    return f"(/ {x.numerator}.0 {x.denominator}.0)"


def header(logic: str, comment: str, timeout_ms: int) -> str:
    return (f"(set-info :status unsat)\n(set-info :source |hnfverify: {comment}|)\n"
            f"(set-option :random-seed {SEED})\n(set-logic {logic})\n")


def precision_query(eps: Fraction, c: Fraction, kappa_hi: Fraction, d_hi: Fraction, u: Fraction, comment: str,
                    timeout_ms: int) -> str:
    """UNSAT iff c kappa D^2 u <= eps for every kappa in [0, kappa_hi] and D in [0, D_hi]."""
    return (header("QF_NRA", comment, timeout_ms)
            + "(declare-const kappa Real)\n(declare-const D Real)\n"
            + f"(assert (and (<= 0.0 kappa) (<= kappa {lit(kappa_hi)})))\n"
            + f"(assert (and (<= 0.0 D) (<= D {lit(d_hi)})))\n"
            + f"(assert (> (* {lit(c)} kappa D D {lit(u)}) {lit(eps)}))\n(check-sat)\n")


def precision_chain_query(eps: Fraction, c: Fraction, kappa_hi: Fraction, stages: list, comment: str,
                          timeout_ms: int) -> str:
    """One stage: :func:`precision_query`. Several (u_k, D_k_hi): UNSAT iff c kappa sum_k u_k D_k^2 <= eps
    for every kappa in [0, kappa_hi] and D_k in [0, D_k_hi] (docs/design.md §2.2)."""
    if len(stages) == 1:
        return precision_query(eps, c, kappa_hi, stages[0][1], stages[0][0], comment, timeout_ms)
    decl = "(declare-const kappa Real)\n" + "".join(f"(declare-const D{k} Real)\n" for k in range(len(stages)))
    box = f"(assert (and (<= 0.0 kappa) (<= kappa {lit(kappa_hi)})))\n" + "".join(
        f"(assert (and (<= 0.0 D{k}) (<= D{k} {lit(d)})))\n" for k, (_, d) in enumerate(stages))
    terms = " ".join(f"(* {lit(u)} D{k} D{k})" for k, (u, _) in enumerate(stages))
    return (header("QF_NRA", comment, timeout_ms) + decl + box
            + f"(assert (> (* {lit(c)} kappa (+ {terms})) {lit(eps)}))\n(check-sat)\n")


def monotonicity_lemma(timeout_ms: int) -> str:
    """For c, u > 0: 0 <= kappa <= kappa', 0 <= D <= D' imply c kappa D^2 u <= c kappa' D'^2 u."""
    return (header("NRA", "monotonicity of c kappa D^2 u in kappa and D", timeout_ms)
            + "(assert (not (forall ((c Real) (u Real) (k Real) (k2 Real) (D Real) (D2 Real))\n"
            + "  (=> (and (> c 0.0) (> u 0.0) (<= 0.0 k) (<= k k2) (<= 0.0 D) (<= D D2))\n"
            + "      (<= (* c k D D u) (* c k2 D2 D2 u))))))\n(check-sat)\n")


def composition_query(layer_bounds: list, lipschitz: list, sqrt_t: Fraction, eps_target: Fraction,
                      timeout_ms: int) -> str:
    """e_0 = 0, e_l <= L_l e_{l-1} + sqrt(T) b'_l for every layer, and e_L > eps_target: UNSAT
    (``layer_bounds`` are the injected b'_l = L'_l b_l of docs/design.md §2.5)."""
    n = len(layer_bounds)
    lines = [header("QF_LRA", "composition law across layers (docs/design.md 2.5)", timeout_ms)]
    lines += [f"(declare-const e{i} Real)\n" for i in range(n + 1)]
    lines.append("(assert (= e0 0.0))\n")
    for i in range(n):
        lines.append(f"(assert (and (<= 0.0 e{i + 1}) (<= e{i + 1} (+ (* {lit(lipschitz[i])} e{i}) "
                     f"(* {lit(sqrt_t)} {lit(layer_bounds[i])})))))\n")
    lines.append(f"(assert (> e{n} {lit(eps_target)}))\n(check-sat)\n")
    return "".join(lines)


def suffix_composition_query(eps: list, suffix: list, half_k: Fraction, sum_sq: Fraction, radius: Fraction,
                             eps_target: Fraction, timeout_ms: int) -> str:
    """The suffix form (docs/design.md §2.5): z_0 = 0, z_l <= z_(l-1) + S_l eps_l, sum eps_l^2 <= rho^2 and
    phi <= z_L + (K/2) sum eps_l^2, phi > eps_target: UNSAT."""
    n = len(eps)
    lines = [header("QF_LRA", "suffix composition across layers (docs/design.md 2.5)", timeout_ms)]
    lines += [f"(declare-const z{i} Real)\n" for i in range(n + 1)] + ["(declare-const phi Real)\n"]
    lines.append("(assert (= z0 0.0))\n")
    for i in range(n):
        lines.append(f"(assert (<= z{i + 1} (+ z{i} (* {lit(suffix[i])} {lit(eps[i])}))))\n")
    lines.append(f"(assert (<= {lit(sum_sq)} (* {lit(radius)} {lit(radius)})))\n")
    lines.append(f"(assert (<= phi (+ z{n} (* {lit(half_k)} {lit(sum_sq)}))))\n")
    lines.append(f"(assert (> phi {lit(eps_target)}))\n(check-sat)\n")
    return "".join(lines)


def kl_query(phi: Fraction, gain: Fraction, max_kl: Fraction, timeout_ms: int) -> str:
    """docs/design.md §2.6: ||dH_t|| <= Phi, osc(dz_t) <= Gamma ||dH_t|| and KL <= osc^2 / 8 > max_kl: UNSAT."""
    return (header("QF_NRA", "KL budget of every token (docs/design.md 2.6)", timeout_ms)
            + "(declare-const h Real)\n(declare-const z Real)\n"
            + f"(assert (and (<= 0.0 h) (<= h {lit(phi)})))\n"
            + f"(assert (and (<= 0.0 z) (<= z (* {lit(gain)} h))))\n"
            + f"(assert (> (/ (* z z) 8.0) {lit(max_kl)}))\n(check-sat)\n")


# ---------------------------------------------------------------------------- solving
def _solve_z3(text: str, timeout_ms: int) -> str:
    import z3

    z3.set_param("smt.random_seed", SEED)
    s = z3.Solver()
    s.set("timeout", int(timeout_ms))
    s.from_string(text)
    r = s.check()
    return "unsat" if r == z3.unsat else "sat" if r == z3.sat else "unknown"


def _solve_cvc5(text: str, timeout_ms: int) -> str:
    import cvc5

    tm = cvc5.TermManager()
    s = cvc5.Solver(tm)
    s.setOption("tlimit-per", str(int(timeout_ms)))
    p = cvc5.InputParser(s)
    p.setStringInput(cvc5.InputLanguage.SMT_LIB_2_6, text, "query")
    sm = p.getSymbolManager()
    answer = "unknown"
    while True:
        cmd = p.nextCommand()
        if cmd.isNull():
            break
        out = cmd.invoke(s, sm)
        if out and out.strip() in ("sat", "unsat", "unknown"):
            answer = out.strip()
    return answer


SOLVERS = {"z3": _solve_z3, "cvc5": _solve_cvc5}


def solver_version(name: str) -> str | None:
    try:
        if name == "z3":
            import z3

            return z3.get_version_string()
        import cvc5

        return getattr(cvc5, "__version__", None)
    except ImportError:
        return None


def run_queries(queries: list[str], solver: str = "z3", timeout_ms: int = 10000,
                wall_timeout_s: float = 120.0) -> list[dict]:
    """Solve each query in one worker subprocess. Returns [{"result": sat|unsat|unknown, "reason": ...}].

    The worker is killed at ``wall_timeout_s``; queries it did not answer are ``unknown``.
    """
    if not queries:
        return []
    payload = json.dumps({"solver": solver, "timeout_ms": timeout_ms, "queries": queries})
    env = dict(os.environ)
    try:
        proc = subprocess.run([sys.executable, "-m", "hnfverify.core.verify.smt"], input=payload, capture_output=True,
                              text=True, timeout=wall_timeout_s, env=env)
    except subprocess.TimeoutExpired as e:
        done = _parse_partial(e.stdout)
        return done + [{"result": "unknown", "reason": f"wall-clock limit of {wall_timeout_s:g} s reached"}] * \
            (len(queries) - len(done))
    done = _parse_partial(proc.stdout)
    if proc.returncode != 0 or len(done) != len(queries):
        why = (proc.stderr or "").strip().splitlines()[-1:] or [f"worker exited with {proc.returncode}"]
        return done + [{"result": "unknown", "reason": f"solver worker failed: {why[0][:200]}"}] * \
            (len(queries) - len(done))
    return done


def _parse_partial(stdout) -> list[dict]:
    if not stdout:
        return []
    if isinstance(stdout, bytes):
        stdout = stdout.decode(errors="replace")
    out = []
    for line in stdout.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def _worker() -> int:
    job = json.loads(sys.stdin.read())
    solve = SOLVERS[job["solver"]]
    for q in job["queries"]:
        try:
            r = solve(q, job["timeout_ms"])
            rec = {"result": r, "reason": "" if r != "unknown" else "solver returned unknown"}
        except Exception as e:  # a query the solver rejects is undecided, never proved
            rec = {"result": "unknown", "reason": f"{type(e).__name__}: {str(e)[:200]}"}
        sys.stdout.write(json.dumps(rec) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
