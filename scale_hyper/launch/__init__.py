"""Who is rank what: the launcher environment (torchrun, the deepspeed launcher, srun, one plain
process) mapped onto RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, and the device a rank uses.

Below ``engine`` and ``doctor`` in the import layers, so both form their process groups from the
same mapping (``engine/distributed.py`` initialises DeepSpeed's; ``doctor`` a plain torch one).
"""

from scale_hyper.launch.launcher import first_slurm_host, free_port, map_launcher_env, pick_device

__all__ = ["first_slurm_host", "free_port", "map_launcher_env", "pick_device"]
