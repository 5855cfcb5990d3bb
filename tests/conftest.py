import atexit
import os
import sys

from calm_dist.distributed.accelerator import choose_deepspeed_accelerator

choose_deepspeed_accelerator()
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    atexit.register(_exit_before_interpreter_teardown, int(exitstatus))


def _exit_before_interpreter_teardown(status: int) -> None:
    """After the session (reports printed, pytest's own clean-up done), leave without the interpreter's
    finalisation: this process starts and shuts down several Ray sessions, and Ray's core worker can leave
    threads that touch its freed state when C extensions are torn down (ray-project/ray#31145); CI saw the
    suite pass, then the process end in a segmentation fault. Registered last, this runs before Ray's own
    atexit hook, so it shuts down what is still running itself."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@pytest.fixture(scope="session")
def project(tmp_path_factory):
    """A user's saved models (BPE tokenizer without BOS or pad, a chat template) and data files."""
    from tests.user_project import make_project

    return make_project(tmp_path_factory.mktemp("project"))
