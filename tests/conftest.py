import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))
# Child processes (scripts, 2-process runs) get one thread each: on 2 cores, several 2-thread processes
# oversubscribe the CPU and run many times slower. (This process's torch is already initialised.)
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MNIST_DIR = SHARED / "datasets" / "mnist"


@pytest.fixture
def tiny_parts():
    from dp_diffusers.models.configs import TINY, build_class_conditional_ldm

    torch.manual_seed(0)
    return build_class_conditional_ldm(
        TINY,
        id2label={
            i: name
            for i, name in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
        },
    )


@pytest.fixture
def tiny_pipe(tiny_parts):
    from dp_diffusers import DPLDMPipeline

    pipe = DPLDMPipeline(**tiny_parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def mnist_dir():
    if not (MNIST_DIR / "train.parquet").exists():
        pytest.skip("../shared/datasets/mnist is not available on this machine")
    return MNIST_DIR


# ---------------------------------------------------------------- train_dp_ldm.py end to end (shared by its tests)

TRAIN_SCRIPT = REPO / "train_dp_ldm.py"
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def load_script(path: Path):
    """A script (train_dp_ldm.py, examples/*.py) imported as a module, to call its functions in-process."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def script():
    return load_script(TRAIN_SCRIPT)


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> Path:
    from dp_diffusers import DPLDMPipeline
    from dp_diffusers.models.configs import TINY, build_class_conditional_ldm

    torch.manual_seed(0)
    parts = build_class_conditional_ldm(TINY, id2label=dict(enumerate(DIGIT_NAMES)))
    path = tmp_path_factory.mktemp("tiny-base") / "model"
    DPLDMPipeline(**parts).save_pretrained(path)
    return path
