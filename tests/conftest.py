import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hypothesis import settings  # noqa: E402

from nitrofusion.testing import save_tiny_sd15, save_tiny_sdxl  # noqa: E402

# Fuzzing: a few deterministic examples per test in `make test`, many random ones in `make soak`.
settings.register_profile("ci", max_examples=40, derandomize=True, database=None)
settings.register_profile("soak", max_examples=int(os.environ.get("SOAK_EXAMPLES", "1000")), database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    return save_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15"))


@pytest.fixture
def bf16_accelerator():
    """accelerate keeps one state per process and refuses a second mixed precision in it: a test
    that trains in bf16 starts and leaves a fresh one, so the fp32 tests around it keep theirs."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
