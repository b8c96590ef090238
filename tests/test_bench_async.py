"""scripts/bench_async.py's summaries: the finals it reports and the reach verdict the issue is judged by."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import bench_async  # noqa: E402


def rows(rewards: list[float]) -> list[dict[str, object]]:
    return [{"step": i, "reward_mean": r, "step_s": 10.0, "verify_s": 0.5 * (i + 1), "staleness_max": 1.0} for i, r in enumerate(rewards)]


def test_summarize_finals_and_verify_shares():
    got = bench_async.summarize(rows([0.2, 0.4, 0.6, 0.8, 1.0, 0.9]))
    assert got["reward_last3"] == pytest.approx((0.8 + 1.0 + 0.9) / 3)
    assert got["reward_last_half"] == pytest.approx((0.8 + 1.0 + 0.9) / 3)  # 6 steps: the second half is the last 3
    assert bench_async.summarize(rows([0.0, 0.5, 1.0, 1.0, 0.5]))["reward_last_half"] == pytest.approx((1.0 + 1.0 + 0.5) / 3)
    # timings skip step 0 (warm-up): verify 1.0..3.0 s over 10 s steps
    assert got["verify_total_share"] == pytest.approx(sum(0.5 * i for i in range(2, 7)) / 50)
    assert got["staleness_max"] == 1.0


def test_reach_table_holds_each_k_to_the_synchronous_seeds_range():
    results = {
        "full-k0-s0": {"reward_last3": 0.91, "reward_last_half": 0.94},
        "full-k0-s1": {"reward_last3": 0.86, "reward_last_half": 0.81},
        "full-k1-s0": {"reward_last3": 0.90, "reward_last_half": 0.86},
        "full-k1-s1": {"reward_last3": 0.88, "reward_last_half": 0.94},
        "full-k2-s0": {"reward_last3": 0.90, "reward_last_half": 0.89},
        "full-k2-s1": {"reward_last3": 0.69, "reward_last_half": 0.85},
    }
    table = bench_async.reach_table(results, ["full"], [0, 1, 2], [0, 1])
    lines = {tuple(c.strip() for c in line.strip("|").split("|")[:3]): line for line in table.splitlines()[2:]}
    assert lines[("full", "1", "last 3")].endswith("| 0.860-0.910 | yes |")
    assert lines[("full", "2", "last 3")].endswith("| 0.795 | 0.860-0.910 | no |")  # mean 0.795 below the k = 0 range
    assert lines[("full", "2", "second half")].endswith("| 0.870 | 0.810-0.940 | yes |")
    one_seed = bench_async.reach_table(results, ["full"], [0, 1], [0])
    assert "n/a (one k = 0 seed)" in one_seed
