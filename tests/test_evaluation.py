"""evaluate_schedules: one forward pass per example per distinct timestep, numbers that add up."""

import math

import pytest
import torch
from conftest import CountingNet, quantized_data, tiny_model

from ddpm_schedules import (
    Schedule,
    estimate_cost_matrix,
    evaluate_schedules,
    even_schedule,
    optimal_schedules,
    quadratic_schedule,
    respaced_schedule,
)
from ddpm_schedules.costs.terms import prior_nats, terms
from ddpm_schedules.models.noise import example_noise
from ddpm_schedules.schedules.schedule import full_schedule


def test_one_forward_pass_per_example_per_distinct_timestep():
    model = tiny_model("learned_range", T=30)
    counter = CountingNet(model.net)
    model.net = counter
    schedules = [
        even_schedule(30, 5),
        quadratic_schedule(30, 5),
        respaced_schedule(30, "3,3"),
        Schedule((2, 9, 30), 30),
    ]
    union = sorted({t for s in schedules for t in s.timesteps})
    assert len(union) < sum(s.K for s in schedules)  # schedules share timesteps
    n = 11
    results = evaluate_schedules(model, quantized_data(n), schedules, batch_size=4, progress=False)
    shown = {round(k * 30 / 1000) + 1: v for k, v in counter.calls.items()}
    assert shown == {t: n for t in union}
    assert [r.schedule for r in results] == schedules


def test_results_equal_the_cost_matrix_on_the_same_data_and_seed():
    """Same examples, same noise per (example, t): the held-out sums are the matrix's path sums."""
    model = tiny_model("learned_range", T=16)
    data = quantized_data(12)
    cm = estimate_cost_matrix(model, data, seed=5, progress=False)
    dp = optimal_schedules(cm, [2, 4, 8])
    schedules = [*dp.values(), even_schedule(16, 4), quadratic_schedule(16, 4), full_schedule(16)]
    results = evaluate_schedules(model, data, schedules, seed=5, batch_size=5, progress=False)
    for r in results:
        assert r.bpd == pytest.approx(cm.bpd(cm.schedule_nats(r.schedule)), rel=1e-10)
        assert sum(r.terms_bpd) + r.prior_bpd == pytest.approx(r.bpd, rel=1e-10)
        assert len(r.terms_bpd) == r.schedule.K and r.count == 12 and r.dims == 16
    for r in results[:3]:
        assert r.predicted_bpd == pytest.approx(r.bpd, rel=1e-10)
    # the DP's schedule is never worse than the baselines with the same budget on the data it saw
    assert results[1].bpd <= min(results[3].bpd, results[4].bpd) + 1e-12


def test_sem_is_that_of_the_per_example_totals():
    model = tiny_model("fixed_large", T=10)
    data = quantized_data(7)
    sch = Schedule((1, 4, 10), 10)
    (r,) = evaluate_schedules(model, data, [sch], seed=2, progress=False)
    per_example = torch.zeros(7, dtype=torch.float64)
    for i in range(7):
        x = data[i : i + 1]
        for s, t in sch.pairs():
            per_example[i] += terms(model, x, t, [s], example_noise(2, i, 1, t, (1, 4, 4)))[0, 0]
        per_example[i] += prior_nats(model, x)[0]
    to_bpd = 1 / (16 * math.log(2))
    assert r.bpd == pytest.approx(per_example.mean().item() * to_bpd, rel=1e-10)
    assert r.bpd_sem == pytest.approx(per_example.std().item() / math.sqrt(7) * to_bpd, rel=1e-6)


def test_bad_input():
    model = tiny_model("fixed_large", T=10)
    data = quantized_data(3)
    with pytest.raises(ValueError, match="ends at T = 12 but the model has T = 10"):
        evaluate_schedules(model, data, [even_schedule(12, 3)], progress=False)
    with pytest.raises(ValueError, match="no schedules"):
        evaluate_schedules(model, data, [], progress=False)
    with pytest.raises(ValueError, match="expected Schedule objects"):
        evaluate_schedules(model, data, [(1, 5, 10)], progress=False)
