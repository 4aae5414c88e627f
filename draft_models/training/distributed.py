"""Several training processes under torchrun: process group, device, DDP and rank-0 duties.

    torchrun --nproc_per_node=2 -m server.cli train-draft --data train.json --out runs/draft

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE. With them (and WORLD_SIZE > 1) the
process joins a process group, NCCL on CUDA and gloo on CPU, and the draft is wrapped in
DistributedDataParallel. Without them training runs as a single process and every
helper here is a no-op. Only rank 0 logs progress, writes checkpoints and metrics, and
runs the evaluation.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from server.engine.target import resolve_device

logger = logging.getLogger(__name__)

# Test hook: when set, every rank writes the SHA-256 of its final draft weights to
# `<folder>/rank<r>.sha256`, so a test can check that the ranks stayed identical.
WEIGHTS_DIGEST_ENV = "SPECVLM_TRAIN_WEIGHTS_DIGEST_DIR"


@dataclass
class ProcessContext:
    """Rank, world size and device of this training process."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Return the element-wise sum of `values` over all processes."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value) -> list:
        """Return every process's `value` (any picklable object), in rank order."""
        if not self.distributed:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


def start_processes(device_setting: str) -> ProcessContext:
    """Join the torchrun process group if there is one, and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessContext(device=resolve_device(device_setting))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = resolve_device(device_setting)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # NOTE: only the gloo (CPU) path is covered by a test; the NCCL path has not been run yet.
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    logger.info("process %d of %d joined the %s process group on %s", rank, world_size, backend, device)
    return ProcessContext(rank, local_rank, world_size, device)


def stop_processes(context: ProcessContext) -> None:
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_for_training(module: nn.Module, context: ProcessContext) -> nn.Module:
    """Wrap the module in DistributedDataParallel when several processes train together."""
    if not context.distributed:
        return module
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def weights_digest(module: nn.Module) -> str:
    """Return the SHA-256 of a module's state dict, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_weights_digest(module: nn.Module, context: ProcessContext) -> None:
    """Write this rank's weight digest when the test hook's environment variable is set."""
    folder = os.environ.get(WEIGHTS_DIGEST_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"rank{context.rank}.sha256").write_text(weights_digest(module) + "\n")
