"""The expert load is summed across data-parallel ranks (gloo, two processes on this machine)."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gmoe import losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        local = torch.full((4,), float(rank + 1), requires_grad=True)
        total = losses.global_sums({"load": local})["load"]
        (total * torch.arange(4.0)).sum().backward()
        results[rank] = (total.detach().tolist(), local.grad.tolist())
    finally:
        dist.destroy_process_group()


def test_global_sums_sum_ranks_and_weight_local_gradient():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    for rank in range(2):
        total, grad = results[rank]
        assert total == [3.0] * 4                      # 1 + 2 on every rank
        assert grad == [0.0, 2.0, 4.0, 6.0]            # this rank's part, x world size (DDP averages)


def test_global_sums_are_identity_without_process_group():
    parts = {"load": torch.rand(4)}
    assert losses.global_sums(parts) is parts
