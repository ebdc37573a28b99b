"""TEST-ONLY SHIM: run train_kd.py on accelerate's real FSDP path with CPU ranks (gloo).

accelerate selects FSDP for accelerator devices only (CUDA, XPU, ...): on a CPU, fsdp.yaml either stops
("no available devices") or would run DDP. For the tests only, this launcher script, started by
`accelerate launch --config_file <an FSDP config> tests/fsdp_cpu_shim.py <train_kd.py arguments>`:
  - starts the gloo process group itself and pins accelerate's device to the CPU
    (ACCELERATE_TORCH_DEVICE=cpu);
  - makes accelerate's backend choice answer (gloo, MULTI_GPU), the device family from which it
    enters FSDP;
  - lifts train_kd.py's own refusal of FSDP without GPUs;
then runs train_kd.main. Nothing else is changed: the FSDP plugin, the sharding, the checkpoints and
the state dicts are accelerate's and PyTorch's. The tests assert that the run was FSDP (config.json's
distributed_type), so a run that fell back to DDP fails instead of passing as FSDP.
"""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main():
    import torch.distributed as dist

    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    def gloo_as_a_device_family(self, cpu=False, sagemaker_dp=False, backend=None):
        return "gloo", DistributedType.MULTI_GPU

    PartialState._prepare_backend = gloo_as_a_device_family
    import train_kd

    train_kd.fsdp_without_its_devices = lambda: False
    train_kd.main(sys.argv[1:])


if __name__ == "__main__":
    main()
