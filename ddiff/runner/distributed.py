"""Joining JAX's multi-controller runtime (``jax.distributed``) before training."""

import os

import jax

from ddiff._errors import DdiffError

ENV_COORDINATOR = "DDIFF_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "DDIFF_NUM_PROCESSES"
ENV_PROCESS_ID = "DDIFF_PROCESS_ID"


def initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto: bool = False,
) -> None:
    """Start ``jax.distributed`` from explicit values, the ``DDIFF_*`` environment
    variables, or (``auto``) the cluster environment JAX detects itself (TPU pods, SLURM,
    Open MPI, Kubernetes). Does nothing for a single process. On CPU, collectives go
    through gloo."""
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    if num_processes is None and ENV_NUM_PROCESSES in os.environ:
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and ENV_PROCESS_ID in os.environ:
        process_id = int(os.environ[ENV_PROCESS_ID])
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if not explicit and not auto:
        return
    if explicit and None in (coordinator_address, num_processes, process_id):
        raise DdiffError(
            "multi-process runs need all of --coordinator-address, --num-processes and "
            f"--process-id (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); "
            "or --distributed to detect them from the cluster"
        )
    if num_processes == 1:
        return
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not _has_accelerator():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    except (RuntimeError, ValueError) as error:
        raise DdiffError(f"could not join the distributed run: {str(error).splitlines()[0]}") from None


def _has_accelerator() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    return bool(platforms) and not platforms.startswith("cpu")
