import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", derandomize=True, max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

try:
    import torch

    torch.set_num_threads(int(os.environ.get("HNFVERIFY_TEST_THREADS", "2")))
except ImportError:  # the trusted core's tests run without torch
    pass


# ---------------------------------------------------------------- shared fixtures
import pytest  # noqa: E402


@pytest.fixture
def run_cli():
    """``run_cli(argv) -> (exit code, stdout, stderr)``: the CLI in-process."""
    import io

    from hnfverify.cli import run

    def run_in_process(argv):
        out, err = io.StringIO(), io.StringIO()
        code = run(argv, out, err)
        return code, out.getvalue(), err.getvalue()
    return run_in_process


@pytest.fixture
def no_traceback():
    """``no_traceback(err)``: the CLI's error output is one named error, never a traceback."""
    def check(err):
        assert "Traceback" not in err
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert lines and lines[-1].startswith(("hnfverify: error:", "usage:", "hnfverify analyze: error:")) \
            or "error:" in err, err
    return check

