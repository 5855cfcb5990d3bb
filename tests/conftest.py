import os

from calm_dist.distributed.accelerator import choose_deepspeed_accelerator

choose_deepspeed_accelerator()
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def project(tmp_path_factory):
    """A user's saved models (BPE tokenizer without BOS or pad, a chat template) and data files."""
    from tests.user_project import make_project

    return make_project(tmp_path_factory.mktemp("project"))
