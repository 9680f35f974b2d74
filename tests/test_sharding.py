""":func:`bsnn.distributed.map_shards` deals chunks to ranks and gathers them in order (one process standing in for
each rank of a 3-rank job: the process group's gather is replaced by the other ranks' shares)."""

import torch

import bsnn.distributed as dist_mod
from bsnn.distributed import DistEnv, map_shards


def test_each_rank_computes_its_chunks_and_all_get_the_whole(monkeypatch):
    x = torch.arange(10.0).view(10, 1)
    shares = {}
    for rank in range(3):  # what each rank computes alone
        monkeypatch.setattr(dist_mod, "current_env", lambda r=rank: DistEnv(r, 1))
        shares[rank] = [(i, t) for i, t in enumerate((x * 2).split(3)) if i % 3 == rank]
    for rank in range(3):
        seen = []

        def fn(c, seen=seen):
            seen.append(c[:, 0].tolist())
            return c * 2

        monkeypatch.setattr(dist_mod, "current_env", lambda r=rank: DistEnv(r, 3))
        monkeypatch.setattr(dist_mod, "all_gather_objects", lambda mine: [shares[r] if r != rank else mine
                                                                          for r in range(3)])
        out = map_shards(fn, x, 3)
        assert torch.equal(out, x * 2)  # every rank: the whole result, in chunk order
        assert seen == [c[:, 0].tolist() for i, c in enumerate(x.split(3)) if i % 3 == rank]


def test_single_process_is_the_plain_map():
    x = torch.randn(7, 2)
    assert torch.equal(map_shards(lambda c: c.sum(1, keepdim=True), x, 2), x.sum(1, keepdim=True))
