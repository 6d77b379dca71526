"""Process-group setup and the few collective helpers the trainer needs.

One code path serves a single CPU, one GPU and DDP: with a world size of 1 every helper is a no-op.
Ranks come from torchrun's variables or, for the tasks of a SLURM job step (what submitit starts
with ``tasks_per_node`` > 1), from SLURM's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compact host list as host names: ``"node[01-03,07],gpu5"`` -> node01 node02 node03 node07 gpu5.

    Ranges keep their zero padding; several bracket groups in one name (``rack[1-2]-n[1-2]``) expand
    as a product, in SLURM's order.
    """
    hosts: list[str] = []
    for item in _split_top_level(hostlist.strip()):
        hosts.extend(_expand_one(item))
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on the commas that are not inside brackets."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    items.append(text[start:])
    return [item for item in (i.strip() for i in items) if item]


def _expand_one(name: str) -> list[str]:
    open_at = name.find("[")
    if open_at < 0:
        return [name]
    close_at = name.index("]", open_at)
    prefix, body, rest = name[:open_at], name[open_at + 1 : close_at], name[close_at + 1 :]
    tails = _expand_one(rest)
    hosts = []
    for part in body.split(","):
        part = part.strip()
        if "-" in part:
            first, last = part.split("-", 1)
            if not (first.isdigit() and last.isdigit()) or int(last) < int(first):
                raise ValueError(f"bad range {part!r} in host list {name!r}")
            numbers = [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]
        elif part.isdigit():
            numbers = [part]
        else:
            raise ValueError(f"bad entry {part!r} in host list {name!r}")
        hosts.extend(prefix + number + tail for number in numbers for tail in tails)
    return hosts


def master_port_for_job(job_id: str | int) -> int:
    """A rendezvous port every task of one SLURM job derives alike, and a requeued job again."""
    return 20000 + int(str(job_id).split("_")[0]) % 20000


def slurm_rendezvous(env: Mapping[str, str]) -> dict | None:
    """Rank, world size and rendezvous address of a task in a multi-task SLURM job step.

    None unless the process is one of several tasks that ``srun`` started (submitit starts the
    tasks with srun) and no torchrun variables are set. The batch script itself also carries
    SLURM_PROCID and SLURM_NTASKS but no SLURM_STEP_ID, so a program started there trains alone.
    MASTER_ADDR/MASTER_PORT already in the environment win over the derived ones.
    """
    if "RANK" in env or "WORLD_SIZE" in env or "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return None
    world_size = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if world_size <= 1:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if "MASTER_ADDR" in env:
        master_addr = env["MASTER_ADDR"]
    elif nodelist:
        master_addr = expand_hostlist(nodelist)[0]  # task 0 runs on the first node of the step
    else:
        raise RuntimeError("a multi-task SLURM step without SLURM_STEP_NODELIST/SLURM_JOB_NODELIST")
    if "MASTER_PORT" in env:
        master_port = int(env["MASTER_PORT"])
    else:
        master_port = master_port_for_job(env.get("SLURM_JOB_ID") or env["SLURM_JOBID"])
    return {
        "rank": int(env["SLURM_PROCID"]),
        "local_rank": int(env.get("SLURM_LOCALID", 0)),
        "world_size": world_size,
        "master_addr": master_addr,
        "master_port": master_port,
    }


def submitit_local_rendezvous(env: Mapping[str, str]) -> dict | None:
    """The same for the tasks of one job of submitit's local executor (``hydra/launcher=local``)."""
    if "RANK" in env or "WORLD_SIZE" in env or "SUBMITIT_LOCAL_GLOBALID" not in env:
        return None
    world_size = int(env.get("SUBMITIT_LOCAL_NTASKS") or 1)
    if world_size <= 1:
        return None
    return {
        "rank": int(env["SUBMITIT_LOCAL_GLOBALID"]),
        "local_rank": int(env.get("SUBMITIT_LOCAL_LOCALID", 0)),
        "world_size": world_size,
        "master_addr": env.get("MASTER_ADDR", "127.0.0.1"),
        # the job id is the pid of the job's controller process, shared by its tasks
        "master_port": int(env.get("MASTER_PORT") or master_port_for_job(env["SUBMITIT_LOCAL_JOB_ID"])),
    }


def process_rank(env: Mapping[str, str] = os.environ) -> int:
    """The global rank this process will have, known before the process group forms (torchrun's,
    a SLURM step's or a local submitit job's variables; 0 for a single process)."""
    tasks = slurm_rendezvous(env) or submitit_local_rendezvous(env)
    return tasks["rank"] if tasks is not None else int(env.get("RANK", 0))


def init_distributed(device: str = "auto") -> DistInfo:
    """Read rank and world size from torchrun's variables, or else from a SLURM step's (or a local
    submitit job's), and join the process group (gloo on the CPU, NCCL on GPUs)."""
    env = os.environ
    init_method = "env://"
    world_size = int(env.get("WORLD_SIZE", 1))
    rank = int(env.get("RANK", 0))
    local_rank = int(env.get("LOCAL_RANK", 0))
    tasks = slurm_rendezvous(env) or submitit_local_rendezvous(env)
    if tasks is not None:
        rank, local_rank, world_size = tasks["rank"], tasks["local_rank"], tasks["world_size"]
        init_method = f"tcp://{tasks['master_addr']}:{tasks['master_port']}"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        # a cluster that binds one GPU per task shows each task a single device
        device = f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}"
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=torch_device)


def make_control_group():
    """A gloo group for small CPU messages (stop and checkpoint decisions): agreeing on them costs
    no GPU synchronisation. None when not distributed. Every rank must call it, in the same order."""
    if dist.is_available() and dist.is_initialized():
        return dist.new_group(backend="gloo")
    return None


def agree_flags(flags: Sequence[bool | int], group) -> list[int]:
    """Element-wise maximum of ``flags`` over all ranks: one rank's ``True`` becomes everyone's.

    ``group`` is the one from ``make_control_group``; without a process group the flags come back
    unchanged (as ints).
    """
    values = [int(flag) for flag in flags]
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor.tolist()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
