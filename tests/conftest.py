"""Shared fixtures: offline mode, the shared ALMA data, a small demo corpus and tiny models.

Everything is built once per test session in a temporary folder; nothing is downloaded.
"""

import os
import sys
from pathlib import Path

import pytest

# Nothing may reach the Hugging Face Hub from a test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_ALMA = REPO_ROOT.parent / "shared" / "data" / "alma"
sys.path.insert(0, str(REPO_ROOT))

# Sizes of the test models: big enough to be real Llamas, small enough for seconds on one core.
TINY_TEACHER = ("--teacher-layers", "2", "--teacher-hidden", "64", "--teacher-heads", "2")
TINY_STUDENT = ("--student-layers", "1", "--student-hidden", "32", "--student-heads", "2")


# .ci/run runs the suite once per stack (KD_STACK=pinned, KD_STACK=latest). A test marked
# one_stack("pinned") or one_stack("latest") does not depend on the stack (bash pipeline logic over
# scripts that every other test runs on both stacks; torch-only code): CI runs it on one stack only,
# to keep CI short. Without KD_STACK every test runs.
def pytest_collection_modifyitems(config, items):
    stack = os.environ.get("KD_STACK")
    if not stack:
        return
    for item in items:
        marker = item.get_closest_marker("one_stack")
        if marker and marker.args[0] != stack:
            why = marker.kwargs.get("why", "bash pipeline logic over scripts tested on both stacks")
            item.add_marker(pytest.mark.skip(reason=f"one stack is enough ({why}): .ci/run runs it on the "
                                                    f"{marker.args[0]} stack (KD_STACK={stack})"))


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_alma():
    """../shared/data/alma, or a clean skip where it is not there."""
    if not (SHARED_ALMA / "deen" / "train.de-en.json").is_file():
        pytest.skip(f"shared ALMA data not found at {SHARED_ALMA}")
    return SHARED_ALMA


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small demo corpus made by prepare_data.py --demo: train/valid/test files of the real schema."""
    import prepare_data

    out = tmp_path_factory.mktemp("demo_data")
    prepare_data.main(["--demo", "--out", str(out), "--demo-train-pairs", "300", "--seed", "1"])
    return out


@pytest.fixture(scope="session")
def tiny_models(demo_data, tmp_path_factory):
    """{"teacher": folder, "student": folder}: tiny Llamas sharing one tokenizer trained on demo_data."""
    import make_tiny_models

    out = tmp_path_factory.mktemp("tiny_models")
    folders = make_tiny_models.main(
        ["--data", str(demo_data), "--out", str(out), "--vocab-size", "600", *TINY_TEACHER, *TINY_STUDENT]
    )
    return {role: str(folder) for role, folder in folders.items()}


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One torch thread for the tiny models: on a busy 2-core machine two threads spin against other
    processes (measured up to 40x slower), and one thread is plenty for 64-wide layers."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process main() builds its own Accelerator; accelerate keeps process-wide singletons."""
    yield
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A folder on its own 1 MiB tmpfs, to run out of disk space for real; skipped where mounting is not
    allowed (it needs root, or CAP_SYS_ADMIN in a container)."""
    import subprocess

    folder = tmp_path / "small_disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or 'mount failed'})")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)
