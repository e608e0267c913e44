"""Keeping processes in step: shares padded to the longest, objects gathered (one process here), tensors reduced
without a barrier (two processes)."""

import torch

from lit_mistral.distributed import gather_objects, in_step, reduce_queued


def test_shares_are_padded_to_the_longest_with_the_filler():
    shares = [[0, 2, 4], [1, 3], []]
    assert in_step(shares, 0, "f") == [0, 2, 4]
    assert in_step(shares, 1, "f") == [1, 3, "f"]
    assert in_step(shares, 2, "f") == ["f", "f", "f"]


def test_gathering_on_one_process_is_the_object_itself():
    state = {"a": 1}
    assert gather_objects(state, 1) == [state]


def _reduce_on(rank: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    try:
        total, largest = reduce_queued(torch.tensor(rank + 1.0), "sum"), reduce_queued(torch.tensor(rank * 5.0), "max")
        torch.save((float(total), float(largest)), f"{out}/{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_reduce_queued_sums_and_takes_the_largest_over_processes(tmp_path):
    import socket

    assert float(reduce_queued(torch.tensor(3.0), "max")) == 3.0  # one process: the tensor as it is
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_reduce_on, args=(port, str(tmp_path)), nprocs=2)
    assert [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)] == [(3.0, 5.0)] * 2
