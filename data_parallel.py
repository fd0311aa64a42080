"""--evaluate split across processes: `torchrun --nproc_per_node N inference_example.py --evaluate ...`.

Each process loads the model once (on its own GPU, or the CPU with gloo), answers every N-th question of each
row of the report, and hands its records to the others (all_gather_object), so every process holds the whole
row in question order and the report is the one a single process writes: same records, same statistics
(tested record by record on 2 CPU processes). Only the first process prints and writes the report and the
journal; the journal's records reach the others from it, so a rerun after a kill asks only for what is missing.
torch.distributed is the engine: torchrun starts the processes and says who is who (RANK, WORLD_SIZE,
LOCAL_RANK). Until start() has joined the group (without torchrun, and inside training, whose ranks must each
score all of its validation questions in step: FSDP's forward passes are collectives) shard, gather and
from_main are the single-process identity. Generation through a --server is not split here: the server
already spreads it over its own GPUs.
"""
import os

_joined = False  # start() ran under torchrun: this evaluation is split across the processes


def size():
    """How many processes share the evaluation (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank():
    return int(os.environ.get("RANK", "0"))


def is_main():
    return rank() == 0


def start():
    """Join torchrun's process group (nccl on GPUs, gloo on CPUs); the device this process answers on."""
    import torch
    import torch.distributed as dist

    global _joined
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    if size() > 1 and not dist.is_initialized():
        if device != "cpu":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device != "cpu" else "gloo")
    _joined = size() > 1
    return device


def shard(items):
    """This process's share: every size()-th item, from its rank on."""
    return items[rank()::size()] if _joined else items


def gather(value):
    """Every process's value, in rank order ([value] alone without torchrun)."""
    if not _joined:
        return [value]
    import torch.distributed as dist

    gathered = [None] * size()
    dist.all_gather_object(gathered, value)
    return gathered


def from_main(value):
    """The first process's value, on every process."""
    if not _joined:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def finish():
    """Leave the process group (left to interpreter exit, a rank can abort and torchrun then fails the run)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
