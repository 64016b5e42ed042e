"""Baseline schedules, the Schedule value and its exports."""

import json

import pytest

from ddpm_schedules import (
    Schedule,
    even_schedule,
    quadratic_schedule,
    respaced_schedule,
)
from ddpm_schedules.schedules.schedule import (
    full_schedule,
    load_schedules,
    save_schedules,
    space_timesteps,
)


@pytest.mark.parametrize("T", [2, 10, 100, 1000, 4000])
def test_even_is_within_half_a_step_of_the_ideal_stride(T):
    for K in sorted({1, 2, 3, 7, 8, 16, 32, 64, 128, 256, T // 2, T} - {0}):
        if K > T:
            continue
        sch = even_schedule(T, K)
        assert sch.K == K and sch.timesteps[-1] == T and sch.strategy == "even"
        if K > 1:
            assert sch.timesteps[0] == 1
            for i, tau in enumerate(sch.timesteps, start=1):
                assert abs(tau - (1 + (T - 1) * (i - 1) / (K - 1))) <= 0.5 + 1e-9


def test_even_matches_improved_diffusion_respacing():
    # improved-diffusion's space_timesteps(1000, "10") keeps every 111th index
    assert even_schedule(1000, 10).timesteps == tuple(range(1, 1001, 111))
    # and rounds half to even as Python does: stride 4.5 over 0..9 keeps {0, 4, 9}
    assert space_timesteps(10, "3") == {0, 4, 9}
    assert even_schedule(10, 3).timesteps == (1, 5, 10)


@pytest.mark.parametrize("T", [10, 100, 1000, 4000])
def test_quadratic(T):
    # hand-computed from tau_i = round(T (i/K)^2) with a step of at least 1: (0.4, 1.6, 3.6, 6.4) -> 1, 2, 4, 6
    assert quadratic_schedule(10, 5).timesteps == (1, 2, 4, 6, 10)
    assert quadratic_schedule(1000, 8).timesteps == (16, 62, 141, 250, 391, 562, 766, 1000)
    assert quadratic_schedule(T, T).timesteps == tuple(range(1, T + 1))  # every step when K = T
    for K in range(1, min(T, 64) + 1):
        gaps = [b - a for a, b in zip((0,) + quadratic_schedule(T, K).timesteps, quadratic_schedule(T, K).timesteps)]
        assert len(gaps) == K and min(gaps) >= 1 and sum(gaps) == T
        # a quadratic spends its steps early: gaps grow (rounding may take one back)
        assert all(g2 >= g1 - 1 for g1, g2 in zip(gaps, gaps[1:-1]))


def test_respaced():
    ddim = respaced_schedule(1000, "ddim50")
    assert ddim.timesteps[:3] == (1, 21, 41) and ddim.timesteps[-2:] == (981, 1000) and ddim.K == 51
    sections = respaced_schedule(300, "10,15,20")
    first = [t for t in sections.timesteps if t <= 100]
    assert len(first) == 10 and first[0] == 1 and first[-1] == 100
    assert sum(100 < t <= 200 for t in sections.timesteps) == 15
    assert sections.timesteps[-1] == 300 and sections.strategy == "respace:10,15,20"
    for bad, msg in [
        ("ddimx", "ddimN"),
        ("ddim251", "no integer stride"),
        ("a,b", "neither"),
        ("200,1", "fewer than"),
        ("0", ">= 1"),
    ]:
        with pytest.raises(ValueError, match=msg):
            respaced_schedule(300, bad)


def test_exports_and_round_trip(tmp_path):
    sch = Schedule((3, 7, 10), 10, "dp", predicted_nats=12.5)
    assert sch.to_model_indices() == [2, 6, 9]
    assert sch.to_diffusers_timesteps() == [9, 6, 2]
    assert sch.pairs() == [(0, 3), (3, 7), (7, 10)]
    again = Schedule.from_json(sch.to_json())
    assert again == sch and again.predicted_nats == 12.5 and again.strategy == "dp"
    d = json.loads(sch.to_json())
    assert d["diffusers_timesteps"] == [9, 6, 2] and d["model_indices"] == [2, 6, 9]
    path = tmp_path / "s" / "schedules.json"
    save_schedules([sch, full_schedule(10)], path)
    assert load_schedules(path) == [sch, full_schedule(10)]
    assert not list(path.parent.glob(".*tmp"))


def test_bad_schedules(tmp_path):
    with pytest.raises(ValueError, match="not strictly increasing"):
        Schedule((3, 3, 10), 10)
    with pytest.raises(ValueError, match="not strictly increasing"):
        Schedule((0, 5, 10), 10)
    with pytest.raises(ValueError, match="ends at 9, not at T = 10"):
        Schedule((3, 9), 10)
    with pytest.raises(ValueError, match="at least one"):
        Schedule((), 10)
    with pytest.raises(ValueError, match="K = 0"):
        even_schedule(10, 0)
    with pytest.raises(ValueError, match="K = 11"):
        quadratic_schedule(10, 11)
    with pytest.raises(ValueError, match="does not exist"):
        load_schedules(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_schedules(tmp_path / "bad.json")
    (tmp_path / "nokey.json").write_text('{"T": 10}')
    with pytest.raises(ValueError, match="'timesteps' is missing"):
        load_schedules(tmp_path / "nokey.json")
