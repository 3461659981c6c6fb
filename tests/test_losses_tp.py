"""chunked_per_position and both chunked cross entropies over vocabulary shards (tensor
parallel, 2 gloo processes, half the vocabulary each) equal the full-vocabulary computation:
the rows summed across ranks are the full rows, and each rank's gradient is its slice of the
full-vocabulary autograd gradient."""

import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_losses import away_from_tvd_kinks

from distill_llm.kd.losses import (
    KINDS,
    chunked_cross_entropy,
    chunked_per_position,
    logits_cross_entropy,
    per_position,
)

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
        _cross_entropies(rank, group, student, shard)
        # both ranks done before either tears its connections down: a gloo rank whose peer has
        # already gone can abort ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _cross_entropies(rank: int, group, logits, shard) -> None:
    """Both chunked CEs on this rank's vocabulary shard equal the full-vocabulary CE, labels
    on either rank's shard and ids from 60 on (padding) excluded; the logits stay untouched."""
    labels = torch.arange(15).reshape(5, 3) * 4 % 60
    real = logits[..., :60]
    want = F.cross_entropy(real.double().flatten(0, 1), labels.flatten(), reduction="none")
    local = logits[..., shard].clone()
    before = local.clone()
    for chunk in (1, 4, 100):
        got = logits_cross_entropy(local, labels, group, chunk, vocab_limit=60)
        _close(got.double(), want.view(5, 3), f"rank {rank} logits CE chunk={chunk}")
        assert torch.equal(local, before), "logits_cross_entropy modified its input"
    hidden = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(5))
    weight = torch.randn(VOCAB, 8, generator=torch.Generator().manual_seed(6))
    full = (hidden @ weight.T)[..., :60].double()
    want = F.cross_entropy(full.flatten(0, 1), labels.flatten(), reduction="none")
    got = chunked_cross_entropy(hidden, weight[shard], labels, group, 4, vocab_limit=60)
    _close(got.double(), want.view(5, 3), f"rank {rank} fused CE")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_chunked_per_position_and_cross_entropy_over_two_vocabulary_shards():
    # a failing assertion in a rank re-raises here, with that rank's traceback
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)
