"""The verifier: ``hnfverify check``. Never imports torch or transformers (a test checks).

Obligations (``obligations.py``):
  precision-lower-bound   Theorem 5.7 at every cached position (fast filter + exact fallback,
                          one SMT query per (layer, head, K|V, segment) group)
  attention-error-budget  the first-order attention-output error of every (layer, head) <= eps
                          (plans made with --eps)
  composition-law         the layers' errors composed through the blocks stay <= eps_target (z3)
Verdicts are three-valued (PROVED / REFUTED / UNKNOWN); UNKNOWN fails the gate.
"""

from ..vocabulary import Verdict

PROVED, UNKNOWN, REFUTED = Verdict.PROVED, Verdict.UNKNOWN, Verdict.REFUTED
