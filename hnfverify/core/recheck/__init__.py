"""Independent re-checker of hnfverify certificates (docs/design.md §6): standard library only, and
no import of any other hnfverify module, by design. Its modules import only each other and the
standard library, so the directory can be copied out and run on its own (``python -m recheck``):

    base          constants, ``Reject``, canonical JSON
    numbers       exact numbers: reading, writing, upward rounding (§2.1)
    formats       the storage formats and their error models (§2.2, §2.3)
    validate      strict JSON reading and plan validity (§3)
    semantics     the run-time semantics of a rule plan (§4), SMT-LIB2 text
    derive        every obligation a plan implies (§5)
    certificate   the certificate body, re-derived and compared (§6); ``recheck``, ``decide``
    main          the command line: ``python -m hnfverify.recheck CERT [--plan PLAN]``
"""

from .base import Reject, canonical
from .certificate import decide, recheck
from .main import main

__all__ = ["Reject", "canonical", "decide", "recheck", "main"]
