"""The process group of a run, set up once at the top and handed down as a value.

A program launched by ``torchrun`` calls :func:`init` once, at its entry point (``maskattn train``
does), and passes the returned :class:`Context` (its ``rank`` and ``world_size``) to what runs below
it: the :class:`~maskattn.training.Trainer`, the tokenizer of a run. Nothing below the entry point
joins a process group itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    """Which process of how many this is; ``Context()`` is a single process."""

    rank: int = 0  # this process, 0 <= rank < world_size
    world_size: int = 1  # processes training together

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank ({self.rank}) must be in [0, world_size ({self.world_size}))")

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, logs and the exported model."""
        return self.rank == 0


def _launched_world_size() -> int:
    """WORLD_SIZE as set by ``torchrun`` (1 when not launched by it)."""
    return environment_int("WORLD_SIZE", 1, 1)


def environment_int(name: str, default: int, least: int) -> int:
    """The int in the environment variable ``name`` (``default`` when unset); ValueError naming it when it is not
    an int >= ``least`` (a variable set by hand, not by torchrun)."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < least:
        raise ValueError(f"environment variable {name}={value!r}: expected an int >= {least} (torchrun sets it); "
                         f"unset it to run as a single process")
    return number


def init(device: str | torch.device | None = None) -> Context:
    """Join the process group when launched by ``torchrun`` (NCCL when this process trains on a GPU, else
    gloo); return the context. ``device``: where this process will train (default :func:`local_device`);
    a CPU run on a machine with GPUs must say so, since NCCL reduces only GPU tensors.

    Call once at the program's entry point; calling it again returns the same context.
    """
    if _launched_world_size() > 1 and not dist.is_initialized():
        device = torch.device(device) if device is not None else local_device()
        if device.type == "cuda" and device.index is None:
            device = local_device()  # "cuda": this process's GPU
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL needs one GPU per process, not all on cuda:0
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return current()


def local_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when CUDA is available (torchrun sets LOCAL_RANK), else CPU.

    Raises:
        ValueError: when LOCAL_RANK names a GPU this machine does not have (torchrun started more processes
            than there are GPUs), rather than mixing GPU and CPU processes in one group.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    rank, count = environment_int("LOCAL_RANK", 0, 0), torch.cuda.device_count()
    if rank >= count:
        raise ValueError(f"LOCAL_RANK={rank} but this machine has {count} GPU(s): start at most {count} processes "
                         "per node (torchrun --nproc_per_node), or train every process on the CPU "
                         "(CUDA_VISIBLE_DEVICES= hides the GPUs)")
    return torch.device("cuda", rank)


def current() -> Context:
    """The context of the process group already joined (a single process when there is none).

    Raises:
        ValueError: when launched by ``torchrun`` with several processes but no group was joined, so
            that the processes do not silently train the same model side by side.
    """
    if dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size())
    if _launched_world_size() > 1:
        raise ValueError(f"launched by torchrun with WORLD_SIZE={_launched_world_size()} but no process group "
                         "was joined: call maskattn.distributed.init() at the entry point and pass its context down")
    return Context()


def check(context: Context) -> None:
    """ValueError when ``context`` is not the process group this process has joined (see :func:`current`)."""
    actual = current()
    if context != actual:
        raise ValueError(f"rank={context.rank}, world_size={context.world_size} do not match the process group "
                         f"(rank {actual.rank} of {actual.world_size}); pass what maskattn.distributed.init() returns")


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def all_sum(x: float) -> float:
    """The sum of ``x`` over all processes (``x`` itself in a single process)."""
    return all_sums([x])[0]


def all_sums(values: list[float]) -> list[float]:
    """The sums of ``values`` over all processes, element by element, in one collective call (``values`` themselves
    in a single process)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def from_main(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every process; ``value`` itself in a single process.

    For a decision every process must take alike (stop, keep a checkpoint) from something each computes itself, on
    a GPU not always to the last bit the same: rank 0's copy decides everywhere.
    """
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def _collective_device() -> torch.device:
    # NCCL reduces only CUDA tensors (on the GPU init() set for this process); gloo only CPU ones.
    return _nccl_device() if dist.get_backend() == "nccl" else torch.device("cpu")


def _nccl_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())
