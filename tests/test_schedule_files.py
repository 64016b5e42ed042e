"""Schedule files that know their model: sigmas and alpha_bar against the betas, the exported file driven by
diffusers' and k-diffusion's own samplers against ours, and the fingerprint check."""

import hashlib
import importlib
import importlib.util
import json
import math
import re
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from conftest import CountingNet, tiny_model

from ddpm_schedules import DiffusionModel, NoiseSchedule, Schedule, even_schedule, save_schedules
from ddpm_schedules.sampling.samplers import quantize, sample_ddim, sample_dpmpp
from ddpm_schedules.schedules.files import (
    check_schedule_for,
    load_schedule_file,
    noise_fingerprint,
    schedule_record,
    strategy_target,
    write_schedule_files,
)
from ddpm_schedules.schedules.strategies import parse_strategies
from ddpm_schedules.storage.files import network_digest

T = 50
TIMESTEPS = (1, 3, 8, 20, 33, 41, 50)  # not evenly spaced: what DDIMScheduler's own stepping cannot follow


@pytest.fixture(scope="module")
def model():
    return tiny_model("learned_range", T=T, schedule="linear", levels=256)


@pytest.fixture(scope="module")
def x_T():
    return torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def exported(model, tmp_path, strategy, timesteps=TIMESTEPS):
    """A record as a run writes it, read back from its JSON file."""
    objective, sampler = strategy_target(strategy)
    record = schedule_record(Schedule(timesteps, model.T, strategy), model, objective=objective, sampler=sampler)
    write_schedule_files(tmp_path, [record])
    return json.loads((tmp_path / f"{strategy}_K{len(timesteps)}.json").read_text())


def ours(sampler, model, timesteps, x_T):
    """Our sampler's quantized samples and its final unquantized x0_hat."""
    trajectory = []
    return sampler(model, Schedule(tuple(timesteps), model.T), x_T, trajectory=trajectory), trajectory[-1]


def assert_same_samples(theirs, our_samples, our_x0, levels, atol):
    """Their final x within ``atol`` of our unquantized x0_hat, and the same quantized samples wherever our value is
    farther than ``atol`` from a rounding boundary (there the two roundings cannot differ)."""
    torch.testing.assert_close(theirs.double(), our_x0, rtol=0, atol=atol)
    u = (our_x0.clamp(-1, 1) + 1) / 2 * (levels - 1)
    clear = (u - u.floor() - 0.5).abs() * 2 / (levels - 1) > atol
    assert clear.float().mean() > 0.99  # the exclusion is a few values at most, not the comparison
    assert torch.equal(quantize(theirs.double(), levels).float()[clear], our_samples[clear])


def test_sigmas_and_alphas_cumprod_follow_the_betas(model, tmp_path):
    record = exported(model, tmp_path, "dp_dpmpp")
    ab = np.cumprod(1 - model.schedule.betas.numpy().astype(np.float64))  # ab[i]: alpha_bar of 1-based t = i + 1
    down = [t - 1 for t in reversed(TIMESTEPS)]
    # both are sequential float64 products of the same factors: equal but for the order of rounding, a few ulps;
    # 1 - alpha_bar magnifies a relative error of alpha_bar by alpha_bar / (1 - alpha_bar) (500 at t = 1 here)
    np.testing.assert_allclose(record["alphas_cumprod"], ab[down], rtol=4 * 2**-52, atol=0)
    magnified = 4 * 2**-52 * float((ab[down] / (1 - ab[down])).max())
    np.testing.assert_allclose(record["sigmas"][:-1], np.sqrt((1 - ab[down]) / ab[down]), rtol=magnified, atol=0)
    assert record["sigmas"][-1] == 0.0 and len(record["sigmas"]) == len(TIMESTEPS) + 1
    assert all(a > b for a, b in zip(record["sigmas"], record["sigmas"][1:]))
    assert record["diffusers_timesteps"] == down
    diffusers = pytest.importorskip("diffusers")
    table = diffusers.DDPMScheduler(num_train_timesteps=T, trained_betas=model.schedule.betas.numpy()).alphas_cumprod
    # diffusers' own table at the exported indices: the same alpha_bar, in its float32 (2^-24 relative)
    np.testing.assert_allclose(record["alphas_cumprod"], table[down].double().numpy(), rtol=T * 2**-24, atol=0)
    betas = model.schedule.betas.numpy().astype(np.float64).tobytes()
    assert record["fingerprint"] == {
        "T": T,
        "betas_sha256": hashlib.sha256(betas).hexdigest(),
        "weights_sha256": network_digest(model),
    }
    assert (record["objective"], record["sampler"], record["guidance"]) == ("dpmpp", "dpmpp", 1.0)
    assert {k: record[k] for k in Schedule(TIMESTEPS, T).to_dict()} == Schedule(TIMESTEPS, T, "dp_dpmpp").to_dict()


def test_write_schedule_files_writes_one_file_per_record_and_a_list(model, tmp_path):
    records = [
        schedule_record(Schedule(TIMESTEPS, T, "dp_ode_s2"), model, objective="ode", sampler="ddim", guidance=2.0),
        schedule_record(even_schedule(T, 4), model),
        schedule_record(Schedule((9, T), T, "file:mine"), model),
    ]
    paths = write_schedule_files(tmp_path / "schedules", records)
    assert [p.name for p in paths] == ["dp_ode_s2_K7.json", "even_K4.json", "file_mine_K2.json", "schedules.json"]
    assert [json.loads(p.read_text()) for p in paths[:-1]] == records
    assert json.loads(paths[-1].read_text()) == records
    assert records[0]["guidance"] == 2.0 and records[1]["objective"] is None and records[1]["sampler"] is None
    assert not list((tmp_path / "schedules").glob(".*tmp"))
    clash = schedule_record(Schedule((5, T), T, "file_mine"), model)
    with pytest.raises(ValueError, match=r"^schedules 'file:mine' and 'file_mine' \(K = 2\) would both be written"):
        write_schedule_files(tmp_path / "other", [records[2], clash])
    assert not (tmp_path / "other").exists()  # refused before anything was written


def test_an_exported_schedule_drives_diffusers_dpm_solver_as_our_dpmpp(model, x_T, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    record = exported(model, tmp_path, "dp_dpmpp")
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T,
        trained_betas=model.schedule.betas.numpy(),
        prediction_type="sample",
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(timesteps=record["diffusers_timesteps"])
    assert scheduler.timesteps.tolist() == record["diffusers_timesteps"]
    x = x_T
    for index in scheduler.timesteps.tolist():
        x = scheduler.step(model.predict(x, index + 1).x0_hat, index, x).prev_sample
    # diffusers keeps alpha_bar, its sigmas and x in float32 inside a step: each of the K steps rounds x (|x| < 5 in
    # this space) and its coefficients to 2^-24 relative, K * 5 * 6e-8 < 3e-6; 1e-5 is that with room
    assert_same_samples(x, *ours(sample_dpmpp, model, record["timesteps"], x_T), 256, atol=1e-5)


def test_ddim_is_dpm_solver_of_order_one_on_ddim_schedulers_config(model, x_T, tmp_path):
    """DDIMScheduler takes no timesteps= (it steps to t - T // K); DDIM with eta 0 is DPM-Solver++(1), which does."""
    diffusers = pytest.importorskip("diffusers")
    record = exported(model, tmp_path, "dp_ode")
    ddim = diffusers.DDIMScheduler(num_train_timesteps=T, trained_betas=model.schedule.betas.numpy())
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        ddim.config, algorithm_type="dpmsolver++", solver_order=1, final_sigmas_type="zero", prediction_type="sample"
    )
    scheduler.set_timesteps(timesteps=record["diffusers_timesteps"])
    x = x_T
    for index in scheduler.timesteps.tolist():
        x = scheduler.step(model.predict(x, index + 1).x0_hat, index, x).prev_sample
    samples, x0 = ours(sample_ddim, model, record["timesteps"], x_T)
    assert_same_samples(x, samples, x0, 256, atol=1e-5)  # float32 steps, as the DPM-Solver++(2M) test above
    assert not torch.equal(samples, ours(sample_dpmpp, model, record["timesteps"], x_T)[0])  # order 1 is not 2M


def test_euler_discrete_on_the_files_sigmas_is_our_ddim(model, x_T, tmp_path):
    """Euler in k-diffusion's sigma space is DDIM with eta 0. EulerDiscreteScheduler's x is x_vp / sqrt(alpha_bar):
    it starts at x_T * init_noise_sigma and scale_model_input divides by sqrt(1 + sigma^2) back to x_vp."""
    diffusers = pytest.importorskip("diffusers")
    record = exported(model, tmp_path, "dp_ode")
    scheduler = diffusers.EulerDiscreteScheduler(
        num_train_timesteps=T, trained_betas=model.schedule.betas.numpy(), prediction_type="sample"
    )
    scheduler.set_timesteps(sigmas=record["sigmas"])  # all K + 1, the final 0 included
    # its timesteps are interpolated from the sigmas in float32: the file's indices up to rounding
    assert [round(float(t)) for t in scheduler.timesteps] == record["diffusers_timesteps"]
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x0_hat = model.predict(scheduler.scale_model_input(x, t), round(float(t)) + 1).x0_hat
        x = scheduler.step(x0_hat, t, x).prev_sample
    # Euler steps x in float32 at |x| up to |x_T| sigma_max (~3.6 * 359): 2^-24 of that is 8e-5, which the next
    # level's sqrt(1 + sigma^2) (46) divides to 2e-6 in x_vp; over K = 7 steps 5e-5 bounds it
    assert_same_samples(x, *ours(sample_ddim, model, record["timesteps"], x_T), 256, atol=5e-5)


@pytest.fixture
def k_sampling():
    """k-diffusion's sampling.py alone: its package __init__ imports torchvision, kornia and clip for unrelated
    parts, so a bare package module stands in for it (and a stub for torchvision, which utils.py imports for image
    helpers only); sys.modules is restored afterwards."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed: python -m pip install --no-deps k-diffusion==0.1.1.post1")
    for needed in ("torchsde", "torchdiffeq", "scipy"):
        pytest.importorskip(needed, reason=f"k-diffusion's sampling.py imports {needed} (the dev extra has it)")
    names = ["k_diffusion", "k_diffusion.sampling", "k_diffusion.utils"]
    stubs = [] if importlib.util.find_spec("torchvision") else ["torchvision", "torchvision.transforms",
                                                                  "torchvision.transforms.functional"]  # fmt: skip
    saved = {name: sys.modules.get(name) for name in names + stubs}
    try:
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = package
        for name in stubs:
            sys.modules[name] = types.ModuleType(name)
        for parent, child in zip(stubs, stubs[1:]):
            setattr(sys.modules[parent], child.rsplit(".", 1)[1], sys.modules[child])
        yield importlib.import_module("k_diffusion.sampling")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class KDenoiser:
    """k-diffusion's D(x, sigma) from our model: x = x_vp / sqrt(alpha_bar), so the network sees x sqrt(alpha_bar),
    at the file's timestep of that sigma; x0_hat is the same in both spaces."""

    def __init__(self, model: DiffusionModel, record: dict):
        self.model, self.record = model, record
        self.steps = list(reversed(record["timesteps"]))

    def __call__(self, x, sigma):
        i = self.record["sigmas"].index(float(sigma[0]))  # the samplers pass the file's own values, exactly
        assert torch.all(sigma == sigma[0]) and i < len(self.steps)
        return self.model.predict(x * math.sqrt(self.record["alphas_cumprod"][i]), self.steps[i]).x0_hat


@pytest.mark.parametrize("name,sampler,strategy", [("sample_dpmpp_2m", sample_dpmpp, "dp_dpmpp"),
                                                   ("sample_euler", sample_ddim, "dp_ode")])  # fmt: skip
def test_k_diffusion_on_the_files_sigmas_gives_our_samples(k_sampling, model, x_T, tmp_path, name, sampler, strategy):
    record = exported(model, tmp_path, strategy)
    sigmas = torch.tensor(record["sigmas"], dtype=torch.float64)
    x = x_T / math.sqrt(record["alphas_cumprod"][0])  # x_T in k-diffusion's space, sigma_max = sigmas[0]
    theirs = getattr(k_sampling, name)(KDenoiser(model, record), x, sigmas, disable=True)
    # float64 on both sides and the same network calls; only the order of the float64 operations differs: 2^-52
    # relative of |x| (up to |x_T| sigma_max ~ 1.3e3 here) is 3e-13 at the first step and less after; 1e-12 bounds it
    assert_same_samples(theirs, *ours(sampler, model, record["timesteps"], x_T), 256, atol=1e-12)


def test_a_schedule_for_another_noise_schedule_is_refused_in_one_line(model, tmp_path):
    record = exported(model, tmp_path, "dp_ode")
    path = tmp_path / "dp_ode_K7.json"
    ours_digest = hashlib.sha256(model.schedule.betas.numpy().astype(np.float64).tobytes()).hexdigest()
    for other in (tiny_model("learned_range", T=40, schedule="linear"), tiny_model("learned_range", T=T)):  # cosine
        counting = DiffusionModel(
            CountingNet(other.net), other.schedule, var_type="learned_range", image_shape=(1, 4, 4)
        )
        theirs = hashlib.sha256(other.schedule.betas.numpy().astype(np.float64).tobytes()).hexdigest()
        message = (
            rf"^schedule file '{re.escape(str(path))}' was made for a noise schedule with T = {T}, "
            rf"betas sha256 {ours_digest[:8]}\.\.\.; this model has T = {other.T}, betas {theirs[:8]}\.\.\.; "
            r"find schedules for this model's noise schedule "
            r"\(evaluate\.py writes them\)$"
        )
        for check in (load_schedule_file, check_schedule_for):
            with pytest.raises(ValueError, match=message) as e:
                check(path, counting)
            assert "\n" not in str(e.value)
        with pytest.raises(
            ValueError, match=r"^schedule 'dp_ode' \(K = 7\) was made for" + message.split("made for")[1]
        ):
            check_schedule_for(record, counting)  # a record in memory
        with pytest.raises(ValueError, match=rf"^strategies has 'file:{re.escape(str(path))}': " + message[1:]):
            parse_strategies(["dp", f"file:{path}"], other.T, noise=other.schedule)  # settings.resolve's call
        assert counting.net.calls == {}  # refused before any network pass


def test_other_weights_warn_and_load_and_old_files_load_unchecked(model, tmp_path):
    record = exported(model, tmp_path, "dp_ode")
    path = tmp_path / "dp_ode_K7.json"
    retrained = tiny_model("learned_range", T=T, schedule="linear", seed=1)  # the same betas, other weights
    assert network_digest(retrained) != network_digest(model)
    assert noise_fingerprint(retrained) == noise_fingerprint(model) == noise_fingerprint(model.schedule)
    with pytest.warns(
        UserWarning, match=r"^schedule file '.*' was made with other weights \(sha256 [0-9a-f]{8}\.\.\.\)"
    ):
        (loaded,) = load_schedule_file(path, retrained)
    assert loaded == Schedule(TIMESTEPS, T, "dp_ode") and loaded.fingerprint == record["fingerprint"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model it was made for: silent
        assert load_schedule_file(path, model) == [loaded]
        check_schedule_for(loaded, model)
        (strategy,) = parse_strategies([f"file:{path}"], T, noise=retrained.schedule)  # the noise agrees
        assert strategy.schedules == (loaded,)
        old = tmp_path / "old.json"  # a file from before fingerprints: what Schedule.to_dict writes
        save_schedules([Schedule(TIMESTEPS, T, "dp")], old)
        other_noise = tiny_model("learned_range", T=T)  # cosine betas: no fingerprint, no check
        assert load_schedule_file(old, other_noise) == [Schedule(TIMESTEPS, T, "dp")]
        assert parse_strategies([f"file:{old}"], T, noise=other_noise.schedule)[0].schedules[0].fingerprint is None
    (tmp_path / "bad.json").write_text(json.dumps({**record, "fingerprint": {"T": T, "betas_sha256": "abc"}}))
    with pytest.raises(ValueError, match=r"^schedule 'dp_ode' has a malformed fingerprint .*; it needs T \(an int\)"):
        load_schedule_file(tmp_path / "bad.json")


def test_network_digest_follows_the_weights_only(model):
    again = tiny_model("learned_range", T=T, schedule="linear", levels=256)
    assert network_digest(again) == network_digest(model)
    again.clip_denoised = False  # a convention, not a weight
    assert network_digest(again) == network_digest(model)
    # tiny_model draws float32 weights and casts them: float32 -> float64 is exact, so the same weights, one digest
    single = tiny_model("learned_range", T=T, schedule="linear", dtype=torch.float32)
    assert network_digest(single) == network_digest(single.double()) == network_digest(model)
    with torch.no_grad():
        next(again.net.parameters()).view(-1)[0] += 1e-12
    assert network_digest(again) != network_digest(model)
    plain = DiffusionModel(lambda x, t: torch.zeros_like(x), NoiseSchedule.named("linear", T), image_shape=(1, 4, 4))
    assert network_digest(plain) is None
    assert schedule_record(even_schedule(T, 3), plain)["fingerprint"]["weights_sha256"] is None


@pytest.mark.parametrize(
    "name,target",
    [
        ("dp", ("elbo", "ancestral")),
        ("dp_mse", ("mse", "ancestral")),
        ("dp_ode", ("ode", "ddim")),
        ("dp_dpmpp", ("dpmpp", "dpmpp")),
        ("dp_ode_oss", ("oss", "ddim")),
        ("analytic_ot", ("elbo", "ancestral")),  # Analytic-DPM's trajectory minimises the ELBO of ancestral steps
        ("dp_ode_s2", ("ode", "ddim")),
        ("dp_dpmpp_s4", ("dpmpp", "dpmpp")),
        ("dp_ode_oss_s1.5", ("oss", "ddim")),
        *[(n, (None, None)) for n in ["even", "quadratic", "karras", "logsnr", "exponential", "beta", "ays"]],
        *[(n, (None, None)) for n in ["respace:ddim50", "file:mine", "file:dp_s2", "full", "custom", "even_s2"]],
    ],
)
def test_strategy_target(name, target):
    assert strategy_target(name) == target


def test_strategy_target_and_record_arguments_are_checked(model):
    assert strategy_target("dp_ode_oss", propagate="dpmpp") == ("oss", "dpmpp")
    assert strategy_target("dp_ode", propagate="dpmpp") == ("ode", "ddim")  # only OSS carries a sampler's states
    with pytest.raises(ValueError, match="^propagate = 'euler'; use ddim or dpmpp"):
        strategy_target("dp_ode_oss", propagate="euler")
    with pytest.raises(ValueError, match="^strategy name '' must be a non-empty string"):
        strategy_target("")
    sch = even_schedule(T, 3)
    with pytest.raises(
        ValueError, match="^objective = 'bpd'; use one of elbo, mse, ode, dpmpp, oss, end_to_end or None"
    ):
        schedule_record(sch, model, objective="bpd")
    with pytest.raises(ValueError, match="^sampler = 'euler'; use one of ancestral, ddim, dpmpp, ipndm, unipc or None"):
        schedule_record(sch, model, sampler="euler")
    with pytest.raises(ValueError, match="^guidance = nan; use the classifier-free guidance scale"):
        schedule_record(sch, model, guidance=float("nan"))
    with pytest.raises(ValueError, match=r"^schedule 'even' \(K = 3\) ends at T = 20 but the model has T = 50"):
        schedule_record(even_schedule(20, 3), model)
    with pytest.raises(ValueError, match=r"^weights = 'not-a-digest'; pass the network's sha256 hex digest"):
        schedule_record(sch, model, weights="not-a-digest")
    digest = network_digest(model)  # computed once, written as given
    other_weights = tiny_model("learned_range", T=T, schedule="linear", seed=1)
    assert schedule_record(sch, other_weights, weights=digest)["fingerprint"]["weights_sha256"] == digest


@pytest.mark.slow
def test_evaluate_writes_files_that_know_their_model_and_reads_them_back(tmp_path, tiny_ckpt):
    from conftest import TINY, eval_cfg, save_tiny_checkpoint

    from ddpm_schedules.app.evaluate import evaluate
    from ddpm_schedules.models.checkpoints import load_checkpoint

    first = evaluate(eval_cfg(tmp_path / "a", tiny_ckpt, "logger=none", "eval.strategies=[dp,dp_ode,even]"))
    files = tmp_path / "a" / "run" / "schedules"
    listed = json.loads((files / "schedules.json").read_text())
    model = load_checkpoint(tiny_ckpt)
    by_name = {(r["strategy"], r["K"]): r for r in listed}
    for r in first["results"]:
        record = by_name[(r["strategy"], r["K"])]
        assert record["timesteps"] == r["schedule"] and record == json.loads(
            (files / f"{r['strategy']}_K{r['K']}.json").read_text()
        )
        ab = model.schedule.ab[list(reversed(r["schedule"]))]
        assert record["alphas_cumprod"] == pytest.approx(ab.tolist(), rel=1e-15)
        assert record["sigmas"] == pytest.approx((((1 - ab) / ab).sqrt().tolist()) + [0.0], rel=1e-15)
        assert record["fingerprint"] == {**noise_fingerprint(model), "weights_sha256": network_digest(model)}
    assert (by_name[("dp", 4)]["objective"], by_name[("dp", 4)]["sampler"]) == ("elbo", "ancestral")
    assert (by_name[("dp_ode", 2)]["objective"], by_name[("dp_ode", 2)]["sampler"]) == ("ode", "ddim")
    assert (by_name[("even", 4)]["objective"], by_name[("even", 4)]["sampler"]) == (None, None)
    strategy = f"eval.strategies=[even,file:{files / 'dp_K4.json'}]"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the model it was made for: silent
        again = evaluate(eval_cfg(tmp_path / "b", tiny_ckpt, "logger=none", strategy))
    assert [r["schedule"] for r in again["results"] if r["strategy"] == "dp"] == [by_name[("dp", 4)]["timesteps"]]
    retrained = save_tiny_checkpoint(tmp_path / "retrained.ckpt", TINY, seed=1)  # the same betas, other weights
    with pytest.warns(UserWarning, match=r"was made with other weights"):
        evaluate(eval_cfg(tmp_path / "c", retrained, "logger=none", strategy))
