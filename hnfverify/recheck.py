"""``python -m hnfverify.recheck CERT [--plan PLAN]``: the independent re-checker, which lives in
``hnfverify/core/recheck/`` (standard library only)."""

import sys

from hnfverify.core.recheck import main

if __name__ == "__main__":
    sys.exit(main())
