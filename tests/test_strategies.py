"""Strategies: parsed once, before heavy work; the same objects build the schedules; one class adds one."""

import json
from dataclasses import dataclass

import pytest
from conftest import quantized_data, tiny_model

from ddpm_schedules import (
    estimate_cost_matrix,
    even_schedule,
    optimal_schedules,
    quadratic_schedule,
    respaced_schedule,
)
from ddpm_schedules.schedules import strategies as st
from ddpm_schedules.schedules.schedule import Schedule


@pytest.fixture(scope="module")
def cm():
    return estimate_cost_matrix(tiny_model("fixed_large", T=20), quantized_data(6), progress=False)


def test_each_name_builds_the_schedule_of_its_function(cm, tmp_path):
    (tmp_path / "mine.json").write_text(
        json.dumps([{"timesteps": [3, 20], "T": 20}, {"timesteps": [1, 7, 20], "T": 20, "strategy": "mine"}])
    )
    parsed = st.parse_strategies(["dp", "even", "quadratic", "respace:5", f"file:{tmp_path / 'mine.json'}"], 20)
    got = st.build_schedules(parsed, cm, [2, 4])
    dp = optimal_schedules(cm, [2, 4])
    want = [
        dp[2],
        dp[4],
        even_schedule(20, 2),
        even_schedule(20, 4),
        quadratic_schedule(20, 2),
        quadratic_schedule(20, 4),
        respaced_schedule(20, "5"),
        Schedule((3, 20), 20, "file:mine"),
        Schedule((1, 7, 20), 20, "mine"),
    ]
    assert got == want and [s.strategy for s in got] == [s.strategy for s in want]
    assert [s.predicted_nats for s in got[:2]] == [dp[2].predicted_nats, dp[4].predicted_nats]


def test_file_schedules_are_read_once(cm, tmp_path, monkeypatch):
    (tmp_path / "s.json").write_text(json.dumps({"timesteps": [4, 20], "T": 20}))
    reads = []
    real = st.load_schedules
    monkeypatch.setattr(st, "load_schedules", lambda path: reads.append(path) or real(path))
    strategy = st.parse_strategy(f"file:{tmp_path / 's.json'}", 20)
    (tmp_path / "s.json").unlink()  # building needs the file no more
    assert (
        st.build_schedules([strategy], cm, [2, 4])
        == st.build_schedules([strategy], cm, [8])
        == [Schedule((4, 20), 20, "file:s")]
    )
    assert len(reads) == 1


def test_one_dp_pass_serves_every_budget(cm, monkeypatch):
    calls = []
    from ddpm_schedules.schedules import strategy_types

    real = strategy_types.optimal_schedules
    monkeypatch.setattr(
        strategy_types, "optimal_schedules", lambda c, budgets: calls.append(list(budgets)) or real(c, budgets)
    )
    out = st.parse_strategy("dp", 20).build_all(cm, [2, 4, 8])
    assert calls == [[2, 4, 8]] and [s.K for s in out] == [2, 4, 8]


def test_a_new_strategy_is_one_class_and_one_registry_line(cm, monkeypatch):
    @dataclass(frozen=True)
    class LastSteps(st.Strategy):
        """The K last timesteps (a deliberately bad schedule)."""

        def build(self, cost_matrix, K):
            return Schedule(tuple(range(cost_matrix.T - K + 1, cost_matrix.T + 1)), cost_matrix.T, self.name)

    monkeypatch.setitem(st.STRATEGIES, "last", LastSteps)
    (sch,) = st.build_schedules(st.parse_strategies(["last"], 20), cm, [3])
    assert sch.timesteps == (18, 19, 20) and sch.strategy == "last"
    assert cm.schedule_nats(sch) > optimal_schedules(cm, [3])[3].predicted_nats


@pytest.mark.parametrize(
    "name,message",
    [
        (
            "optimal",
            "unknown strategy 'optimal' in strategies; use dp, dp_mse, dp_ode, dp_dpmpp, dp_ode_oss, analytic_ot, "
            "even, quadratic, opt_ddim, opt_dpmpp, opt_ipndm, opt_unipc, karras, logsnr, exponential, beta, ays, respace:<spec>, file:<path>",
        ),
        ("respace:every7", "respacing 'every7'"),
        ("file:/nope/s.json", "does not exist"),
        ("fancy:3", "unknown strategy 'fancy:3'"),
    ],
)
def test_bad_names_fail_at_parse_time(name, message):
    with pytest.raises(ValueError, match=message):
        st.parse_strategies(["dp", name], 20)


def test_empty_list_is_refused():
    with pytest.raises(ValueError, match="^strategies is empty"):
        st.parse_strategies([], 20)
