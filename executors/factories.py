"""`local`, `slurm` and `docker`: one factory per place a job can run.

Every launcher is torchrun with one process per GPU (or per requested device on a CPU).
Defaults suit NVIDIA's NeMo containers: `NEMO_IMAGE`, the environment below, host IPC and a
large shared-memory segment for the data loader and NCCL.
"""

from typing import Dict, List, Optional

import nemo_run as run

from distill_llm.executors.safety import check_value

NEMO_IMAGE = "nvcr.io/nvidia/nemo:25.09"
# What megatron-core expects on GPUs; user env_vars are added on top (and win).
GPU_ENV = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # keeps TP communication ordered with compute
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",  # frees NCCL buffers promptly
    "NCCL_NVLS_ENABLE": "0",  # NVLS needs more memory than KD leaves free
}
PACKAGERS = ("git", "none")


def _packager(kind: str, job: str):
    """'git': the committed repository, shipped as an archive, REFUSING to run when there are
    uncommitted or untracked changes (nemo_run's default would drop them silently).
    'none': nothing shipped; the job imports the installed distill_llm (shared filesystem or a
    container that has it)."""
    if kind == "git":
        return run.Config(
            run.GitArchivePackager, check_uncommitted_changes=True, check_untracked_files=True
        )
    if kind == "none":
        return run.Config(run.Packager)
    raise ValueError(f"{job}: packager {kind!r} is not one of {', '.join(PACKAGERS)}")


@run.cli.factory
def local(devices: int = 1, env_vars: Optional[Dict[str, str]] = None) -> run.Config[run.Executor]:
    """This machine: `devices` processes under torchrun (one per GPU; on a CPU, gloo)."""
    if devices < 1:
        raise ValueError(f"local: devices must be at least 1, got {devices}")
    return run.Config(
        run.LocalExecutor,
        ntasks_per_node=devices,
        launcher="torchrun",
        env_vars=dict(env_vars or {}),
    )


@run.cli.factory
def slurm(
    account: str = "",
    partition: Optional[str] = None,
    nodes: int = 1,
    gpus_per_node: int = 8,
    tasks_per_node: Optional[int] = None,
    time: str = "04:00:00",
    container_image: Optional[str] = NEMO_IMAGE,
    container_mounts: Optional[List[str]] = None,
    env_vars: Optional[Dict[str, str]] = None,
    host: Optional[str] = None,
    user: Optional[str] = None,
    remote_job_dir: str = "",
    packager: str = "git",
    exclusive: bool = True,
) -> run.Config[run.Executor]:
    """A Slurm cluster: `nodes` x `tasks_per_node` torchrun processes (default: one per GPU).

    `host`/`user` submit through SSH (jobs staged in `remote_job_dir` on the cluster); without
    a host, `sbatch` runs on this machine. `container_image` needs pyxis/enroot on the cluster;
    None runs on the nodes' own software. `gpus_per_node=0` asks for no GPUs (CPU clusters).
    """
    if nodes < 1:
        raise ValueError(f"slurm: nodes must be at least 1, got {nodes}")
    fields = {
        "account": account,
        "partition": partition,
        "time": time,
        "host": host,
        "user": user,
        "remote_job_dir": remote_job_dir,
        "container_image": container_image,
    }
    for name, value in fields.items():
        if value:
            check_value(value, f"slurm {name}")
    for item in container_mounts or []:
        check_value(item, "slurm container_mounts entry")
    tasks = tasks_per_node or max(gpus_per_node, 1)
    if host:
        tunnel = run.Config(run.SSHTunnel, host=host, user=user or "", job_dir=remote_job_dir)
    else:
        tunnel = run.Config(run.LocalTunnel, job_dir=remote_job_dir)
    return run.Config(
        run.SlurmExecutor,
        account=account,
        partition=partition,
        nodes=nodes,
        ntasks_per_node=tasks,
        gpus_per_node=gpus_per_node or None,
        time=time,
        container_image=container_image,
        container_mounts=list(container_mounts or []),
        env_vars={**(GPU_ENV if gpus_per_node else {}), **(env_vars or {})},
        exclusive=exclusive or None,
        tunnel=tunnel,
        packager=_packager(packager, "slurm"),
        launcher="torchrun",
    )


@run.cli.factory
def docker(
    image: str = NEMO_IMAGE,
    gpus: int = 8,
    volumes: Optional[List[str]] = None,
    shm_size: str = "64g",
    env_vars: Optional[Dict[str, str]] = None,
    packager: str = "git",
) -> run.Config[run.Executor]:
    """A local Docker container (NVIDIA runtime): `gpus` torchrun processes, host IPC, the
    memlock/stack limits NCCL wants, `volumes` as "host:container" mounts."""
    for value, where in [(image, "docker image"), (shm_size, "docker shm_size")] + [
        (v, "docker volumes entry") for v in volumes or []
    ]:
        check_value(value, where)
    return run.Config(
        run.DockerExecutor,
        container_image=image,
        num_gpus=gpus,
        ntasks_per_node=max(gpus, 1),
        runtime="nvidia" if gpus else None,
        shm_size=shm_size,
        ipc_mode="host",
        ulimits=["memlock:-1", "stack:67108864"],
        volumes=list(volumes or []),
        env_vars={**(GPU_ENV if gpus else {}), **(env_vars or {})},
        packager=_packager(packager, "docker"),
        launcher="torchrun",
    )
