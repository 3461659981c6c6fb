"""NeMo-Run executor factories for distill_llm (installed as `distill_llm.executors`).

    run.executor=local  run.executor.ntasks_per_node=2
    run.executor=slurm  run.executor.account=ACC run.executor.partition=batch run.executor.nodes=2
    run.executor=docker run.executor.gpus=8

Executors only decide where an entry point runs; they know nothing about models.
"""

from distill_llm.executors.factories import docker, local, slurm

__all__ = ["docker", "local", "slurm"]
