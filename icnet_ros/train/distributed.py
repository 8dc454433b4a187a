"""DDP under torchrun: joining the process group, and the collective helpers the trainer uses (barrier, buffer
broadcast, gathering, a parameter digest to check that replicas agree). With one process every helper is a no-op,
so the single-process run is the plain case of the same code."""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _training_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``, ``cuda``, ``cuda:N`` (CUDA must be available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name!r}: training runs on cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def setup_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    try:
        device = _training_device(device_name)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"train.device: {e}") from e
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank if world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = _dt.timedelta(minutes=30)
        try:  # binding the device up front (torch >= 2.3) avoids NCCL guessing it
            dist.init_process_group(backend=backend, timeout=timeout,
                                    **({"device_id": device} if device.type == "cuda" else {}))
        except TypeError:
            dist.init_process_group(backend=backend, timeout=timeout)
    return info, device


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_buffers(module: nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's buffers (BN running statistics), so that all replicas evaluate and save the same
    model (without SyncBN each rank updates its statistics from its own batches)."""
    if info.distributed:
        for b in module.buffers():
            dist.broadcast(b, 0)


def parameter_digest(module: nn.Module) -> str:
    """SHA-256 over all parameters (CPU float32 bytes): identical replicas give identical digests."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
