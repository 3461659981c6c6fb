"""chunked_per_position over vocabulary shards (tensor parallel, 2 gloo processes, half the
vocabulary each) equals the full-vocabulary computation: the rows summed across ranks are the
full rows, and each rank's gradient is its slice of the full-vocabulary autograd gradient."""

import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_losses import away_from_tvd_kinks

from distill_llm.kd.losses import KINDS, chunked_per_position, per_position

WORLD = 2
VOCAB = 64  # 32 tokens a rank


def _close(got, want, what, rtol=1e-5):
    torch.testing.assert_close(
        got, want, rtol=rtol, atol=rtol * float(want.abs().max()), msg=lambda m: f"{what}: {m}"
    )


def _inputs():
    gen = torch.Generator().manual_seed(11)
    student = torch.randn(5, 3, VOCAB, generator=gen) * 3
    teacher = torch.randn(5, 3, VOCAB, generator=gen) * 3
    teacher[..., :6] = float("-inf")  # teacher zeros, on rank 0's shard
    teacher[0, 0, VOCAB // 2 :] = float("-inf")  # a position where rank 1's shard has no mass
    grad_rows = torch.rand(5, 3, generator=gen) * 3  # the same upstream weights on every rank
    grad_rows[torch.arange(15).reshape(5, 3) % 4 == 0] = 0.0  # masked positions
    return student, teacher, grad_rows


def _worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        group = dist.group.WORLD
        student, teacher, grad_rows = _inputs()
        shard = slice(rank * VOCAB // WORLD, (rank + 1) * VOCAB // WORLD)
        for kind in KINDS:
            for temperature in (0.5, 1.0, 4.0):
                t_full = teacher
                if kind == "tvd":  # see away_from_tvd_kinks: no sign(0) for rounding to flip
                    t_full = away_from_tvd_kinks(student, teacher, temperature)
                t_shard = t_full[..., shard].contiguous()
                s_full = student.clone().requires_grad_()
                full = per_position(kind, s_full, t_full, temperature, 0.3)
                (full * grad_rows).sum().backward()
                # what Megatron's path does today: autograd through per_position with the group
                s_auto = student[..., shard].clone().requires_grad_()
                auto = per_position(kind, s_auto, t_shard, temperature, 0.3, group)
                (auto * grad_rows).sum().backward()
                for chunk in (1, 4, 100):
                    what = f"rank {rank} {kind} T={temperature} chunk={chunk}"
                    s = student[..., shard].clone().requires_grad_()
                    rows = chunked_per_position(
                        kind, s, t_shard, temperature, 0.3, group, chunk_size=chunk
                    )
                    (rows * grad_rows).sum().backward()
                    summed = rows.detach().clone()
                    dist.all_reduce(summed, group=group)
                    _close(rows.detach(), auto.detach(), f"{what}: shard rows")
                    _close(summed, full.detach(), f"{what}: rows summed over ranks")
                    _close(s.grad, s_full.grad[..., shard], f"{what}: gradient")
                    _close(s.grad, s_auto.grad, f"{what}: gradient vs autograd with the group")
                    assert torch.count_nonzero(s.grad[grad_rows == 0]) == 0, what
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_chunked_per_position_over_two_vocabulary_shards():
    # a failing assertion in a rank re-raises here, with that rank's traceback
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)
