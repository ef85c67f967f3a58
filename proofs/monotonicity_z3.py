"""The monotonicity lemma the per-group Theorem 5.7 queries rely on, proved once by z3 (quantified):
for c, u > 0, 0 <= kappa <= kappa' and 0 <= D <= D':  c kappa D^2 u <= c kappa' D'^2 u.
Also: the certificate's SMT text for it (hnfverify.core.verify.smt.monotonicity_lemma) is what is proved here.
"""

import sys

import z3


def main() -> int:
    from hnfverify.core.verify.smt import monotonicity_lemma

    c, u, k, k2, d, d2 = z3.Reals("c u k k2 D D2")
    s = z3.Solver()
    s.add(z3.Not(z3.ForAll([c, u, k, k2, d, d2],
                           z3.Implies(z3.And(c > 0, u > 0, 0 <= k, k <= k2, 0 <= d, d <= d2),
                                      c * k * d * d * u <= c * k2 * d2 * d2 * u))))
    r1 = s.check()
    s2 = z3.Solver()
    s2.from_string(monotonicity_lemma(10000))
    r2 = s2.check()
    # sanity: the lemma is not vacuous -- dropping D <= D' makes it false
    s3 = z3.Solver()
    s3.add(c > 0, u > 0, 0 <= k, k <= k2, 0 <= d, c * k * d * d * u > c * k2 * d2 * d2 * u)
    r3 = s3.check()
    print(f"monotonicity (python API): {r1}; as the certificate states it: {r2}; without D <= D': {r3}")
    ok = r1 == z3.unsat and r2 == z3.unsat and r3 == z3.sat
    print("monotonicity lemma proved" if ok else "monotonicity lemma NOT proved")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
