"""What differs between the two supported stacks, and the noise of CPU runs, in one place.

The stacks: requirements.txt (transformers 4.57, numpy 1.26, unbabel-comet) and requirements-latest.txt
(transformers 5, numpy 2, no unbabel-comet; COMET through evaluate.py --comet-python).
"""

import os


def quiet_cpu_runs():
    """Name DeepSpeed's CPU accelerator on a machine without a GPU (DS_ACCELERATOR=cpu) instead of
    letting it guess: its guess logs "Setting accelerator to CPU. If you have GPU ..., we were unable
    to detect it" on every import. Child processes (accelerate launch) inherit the setting; a value
    the user set is kept."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
