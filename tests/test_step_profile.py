"""bench/step_profile's ceilings: the most a KD step could gain over a peer, from the least
matrix-product-and-attention time among the KD columns (the pretrain and teacher-forward columns
are halves of a step, never a floor)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import step_profile  # noqa: E402


def column(name, gemm, attention, total):
    groups = dict.fromkeys(step_profile.GROUPS, 0.0) | {"gemm": gemm, "attention": attention}
    return {"variant": name, "ms_per_step": groups, "total_ms_per_step": total}


def test_ceiling_is_each_peers_step_over_the_least_kd_gemm_and_attention():
    results = [
        column("distill", 1066.1, 146.8, 1409.6),
        column("plain_kd", 1054.1, 136.7, 1369.1),
        column("modelopt_hf", 1067.7, 135.3, 1419.0),
        column("pretrain", 382.6, 61.9, 555.6),  # a half step: lower, but not a floor
    ]
    kd, ceiling = step_profile.ceilings(results)
    assert kd == ["distill", "modelopt_hf", "plain_kd"]
    floor = 1054.1 + 136.7  # plain_kd's, the least of the three KD columns
    assert ceiling == {"modelopt_hf": pytest.approx(1419.0 / floor),
                       "plain_kd": pytest.approx(1369.1 / floor)}  # fmt: skip


def test_no_ceiling_without_our_step_and_a_peer():
    assert step_profile.ceilings([column("distill", 1.0, 1.0, 3.0)])[1] == {}
    peers = [column("plain_kd", 1.0, 1.0, 3.0), column("modelopt_hf", 1.0, 1.0, 3.0)]
    assert step_profile.ceilings(peers)[1] == {}
