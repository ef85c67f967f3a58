"""The bookkeeping the lemma scripts share (proofs/attention_lemmas.py, proofs/output_lemmas.py): true
statements that must hold (sympy identities, z3 steps whose negation is unsat, exact or mpmath cases) and
strengthened false ones that must be refuted. Not a check itself: `make proofs` runs it as a no-op."""

import sympy as sp
import z3

Z3_TIMEOUT_MS = 30000


class Tally:
    """Failures of true statements, and refutation counts of the false (strengthened) ones."""

    def __init__(self):
        self.fails: list[str] = []
        self.n_sympy = self.n_z3 = self.n_cases = self.n_mp = self.n_counter = 0
        self.refuted: dict[str, int] = {}     # false-statement name -> number of counterexamples found
        self.z3_refuted: dict[str, bool] = {}

    def sympy_zero(self, name, expr):
        self.n_sympy += 1
        if sp.simplify(expr) != 0:
            self.fails.append(f"sympy: {name}")

    def sympy_true(self, name, cond):
        self.n_sympy += 1
        if not cond:
            self.fails.append(f"sympy: {name}")

    def z3_proves(self, name, hyps, claim):
        self.n_z3 += 1
        s = z3.Solver()
        s.set("timeout", Z3_TIMEOUT_MS)
        s.add(*hyps)
        s.add(z3.Not(claim))
        r = s.check()
        if r != z3.unsat:
            self.fails.append(f"z3: {name} ({r})")

    def z3_refutes(self, name, hyps, false_claim):
        s = z3.Solver()
        s.set("timeout", Z3_TIMEOUT_MS)
        s.add(*hyps)
        s.add(z3.Not(false_claim))
        self.z3_refuted[name] = s.check() == z3.sat

    def holds(self, name, ok, detail=""):
        if not ok:
            self.n_counter += 1
            if self.n_counter <= 20:
                self.fails.append(f"counterexample to {name}: {str(detail)[:400]}")

    def false_stmt(self, name, holds_here):
        self.refuted.setdefault(name, 0)
        if not holds_here:
            self.refuted[name] += 1

    def ok(self):
        return (not self.fails and all(v > 0 for v in self.refuted.values())
                and all(self.z3_refuted.values()))

    def line(self, title, fname, extra="", mpmath_cases=False):
        ref = ", ".join(f"{k}: {v}" for k, v in self.refuted.items())
        zr = ", ".join(f"{k}: {'sat' if v else 'NOT refuted'}" for k, v in self.z3_refuted.items())
        status = "PROVED/CHECKED" if self.ok() else "FAILED"
        cases = f"{self.n_cases} exact cases + {self.n_mp} mpmath cases" if mpmath_cases else f"{self.n_cases} cases"
        return (f"{title} [{fname}]: {status}; sympy {self.n_sympy}, z3 {self.n_z3} (unsat), "
                f"{cases}, {len(self.fails)} failures ({self.n_counter} counterexamples); "
                f"strengthened false statements refuted -- z3 {{{zr}}}, counterexamples {{{ref}}}{extra}")


def zabs(x):
    return z3.If(x >= 0, x, -x)


def zreals(prefix, n):
    return list(z3.Reals(" ".join(f"{prefix}{i}" for i in range(n))))
