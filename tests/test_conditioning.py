"""Class-conditional models and classifier-free guidance (models/conditioning.py, docs/design.md §1), each against an
independent reference: per-example terms, the guidance formula written out, diffusers' own combination, per-example
sampler calls, the bad inputs of evaluate.py and label dropout in training."""

import math

import pytest
import torch
from conftest import (
    COND,
    SHAPE,
    TINY,
    cond_model,
    eval_cfg,
    evaluate_on_processes,
    quantized_data,
    run_on_gloo_processes,
    save_tiny_checkpoint,
)

from ddpm_schedules import CostMatrix, Schedule, estimate_cost_matrix
from ddpm_schedules.costs.terms import terms
from ddpm_schedules.models.conditioning import LabeledImages, balanced_labels, check_labels
from ddpm_schedules.models.flags import model_from_flags
from ddpm_schedules.models.model import DiffusionModel
from ddpm_schedules.models.noise import example_noise
from ddpm_schedules.sampling.samplers import sample_ancestral, sample_ddim, sample_dpmpp
from ddpm_schedules.schedules.schedule import even_schedule


def perturbed_state(flags: dict, seed: int = 0) -> dict:
    """A DiffusionModule state dict of ``flags`` with every weight perturbed (as `cond_model`), float32."""
    from ddpm_schedules.lightning.module import DiffusionModule

    torch.manual_seed(seed)
    module = DiffusionModule(flags, loss="hybrid", levels=17)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module.state_dict()


def raw(model: DiffusionModel, x: torch.Tensor, t: int, y: torch.Tensor) -> torch.Tensor:
    """The network's raw output at t with labels y (any label, the null one included), as `predict` feeds it."""
    ts = model.net_timesteps(torch.full((len(x),), t, dtype=torch.long))
    return model.net(x.to(model.input_dtype), ts, y).double()


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    valid = torch.isfinite(b)
    return float(((a[valid] - b[valid]).abs() / b[valid].abs().clamp_min(1e-300)).max())


# ---------------------------------------------------------------------------------------------------------------------
# 1. the cost matrix with labels is the mean of the per-example conditional terms


@torch.no_grad()
def test_conditional_cost_matrix_is_the_mean_of_per_example_terms():
    """Each example's terms at (example i, t) use its own label and the noise rule's draw for (seed, i, t), whatever
    batch it was in. The matrix's mean and the per-example reference differ only in the float64 network's rounding
    (one call of 4 examples, several timesteps per call, vs 1 example a call: about 1e-16 relative per output, up to
    ~1e-14 after the KL's sums of 64 dimensions) and in the order of the sums over 9 examples: rtol 1e-10 leaves four
    orders of magnitude (measured: 9e-16). The labels matter: with every label changed (a derangement) every entry
    moves by far more (measured: 2.5e-4 to 0.31 relative)."""
    model = cond_model()
    n, seed, grid = 9, 1, [2, 5, 11, 20]
    x0 = quantized_data(n, shape=SHAPE, seed=3)
    y = torch.tensor([3, 7, 0, 9, 1, 5, 2, 8, 4])
    cm = estimate_cost_matrix(model, LabeledImages(x0, y), grid, seed=seed, batch_size=4, progress=False)
    assert cm.grid.tolist() == [0, *grid] and cm.count == n
    for j, t in enumerate(cm.grid.tolist()):
        if t == 0:
            continue
        s = cm.grid[:j]
        per_example = torch.cat(
            [terms(model, x0[i : i + 1], t, s, example_noise(seed, i, 1, t, SHAPE), y[i : i + 1]) for i in range(n)]
        )
        torch.testing.assert_close(cm.mean[:j, j], per_example.mean(0), rtol=1e-10, atol=0)
        torch.testing.assert_close(cm.sem[:j, j], per_example.std(0) / 3, rtol=1e-6, atol=1e-12)
    deranged = y[torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 0])]
    assert (deranged != y).all()
    other = estimate_cost_matrix(model, LabeledImages(x0, deranged), grid, seed=seed, batch_size=4, progress=False)
    valid = torch.isfinite(cm.mean)
    assert other.prior == pytest.approx(cm.prior, rel=1e-12)  # the prior KL does not see labels
    moved = (other.mean[valid] - cm.mean[valid]).abs() / cm.mean[valid].abs()
    assert moved.max() > 1e-2 and moved.min() > 1e-6


def test_conditional_cost_matrix_needs_labels_in_range():
    model = cond_model()
    x0 = quantized_data(4, shape=SHAPE)
    with pytest.raises(
        ValueError, match=r"class-conditional \(10 classes\) but the data has no labels: pass LabeledImages"
    ):
        estimate_cost_matrix(model, x0, [5, 20], progress=False)
    with pytest.raises(ValueError, match="label 10 is out of range for a model with 10 classes"):
        estimate_cost_matrix(model, LabeledImages(x0, torch.tensor([0, 1, 10, 2])), [5, 20], progress=False)
    with pytest.raises(ValueError, match="labels must be 4 integers"):
        LabeledImages(x0, torch.zeros(4))


def test_labeled_images_slice_with_their_labels_and_balanced_labels():
    x0, y = quantized_data(7, shape=SHAPE), torch.arange(7) * 3 % 10
    part = LabeledImages(x0, y)[2:5]
    assert torch.equal(part.images, x0[2:5]) and torch.equal(part.labels, y[2:5]) and len(part) == 3
    assert [len(b[0]) for b in LabeledImages(x0, y).split(3)] == [3, 3, 1]
    assert balanced_labels(torch.arange(23), 10).tolist() == [i % 10 for i in range(23)]
    assert balanced_labels(torch.arange(3), None) is None
    assert check_labels(None, 3, None) is None
    with pytest.raises(ValueError, match="unconditional model; pass y=None"):
        check_labels(torch.zeros(3, dtype=torch.long), 3, None)
    with pytest.raises(ValueError, match="label -1 is out of range"):
        check_labels(torch.tensor([0, -1, 2]), 3, 10)


# ---------------------------------------------------------------------------------------------------------------------
# 2. guided prediction is the formula eps_u + s (eps_c - eps_u), from the raw outputs of separate calls


class CountingCalls(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.batches = net, []

    def forward(self, x, timesteps, y):
        self.batches.append(len(x))
        return self.net(x, timesteps, y)


@pytest.mark.parametrize("predict_xstart", [False, True], ids=["eps", "x0"])
@torch.no_grad()
def test_guided_prediction_is_the_guidance_formula(predict_xstart):
    """x0_hat at s = 3 from eps_u + 3 (eps_c - eps_u) (eps from separate calls with y and with the null label, the
    variance fraction the conditional call's), unclipped; for an x0 network the same affine combination of x0_hat.
    The guided call is one call of 2B examples vs two of B: float64 rounding, about 1e-16 relative per output;
    x0_hat divides by sqrt(ab_t), tiny at t = T, so its unclipped values are large there (measured: 4e-12 absolute,
    about 1e-15 relative, eps networks; 1e-14 absolute, x0 networks; the fraction 2e-15): rtol 1e-12, atol 1e-12."""
    model = cond_model({**COND, "predict_xstart": predict_xstart}, clip=False)
    assert model.mean_type == ("x0" if predict_xstart else "eps")
    x = torch.randn(5, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y, null = torch.tensor([0, 4, 9, 2, 7]), torch.full((5,), 10)
    for t in (1, 8, 20):
        cond, uncond = model.prediction(x, t, raw(model, x, t, y)), model.prediction(x, t, raw(model, x, t, null))
        ab = model.schedule.ab[t]
        if predict_xstart:
            want = uncond.x0_hat + 3 * (cond.x0_hat - uncond.x0_hat)
        else:
            eps = uncond.eps + 3 * (cond.eps - uncond.eps)
            want = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        model.net = counter = CountingCalls(model.net)
        guided = model.set_guidance(3).predict(x, t, y)
        model.net = counter.net
        assert counter.batches == [10]  # one call of [x; x] with labels [y; null]
        torch.testing.assert_close(guided.x0_hat, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(guided.frac, cond.frac, rtol=1e-12, atol=1e-12)  # variance: the conditional pass's
        assert (guided.x0_hat - cond.x0_hat).abs().max() > 1e-3  # guidance changed something
        # s = 1 is the unguided conditional model, exactly (the same single call); s = 0 the null-label one
        assert torch.equal(model.set_guidance(1).predict(x, t, y).x0_hat, cond.x0_hat)
        torch.testing.assert_close(model.set_guidance(0).predict(x, t, y).x0_hat, uncond.x0_hat, rtol=1e-12, atol=1e-12)
    model.set_guidance(1)


@torch.no_grad()
def test_guided_x0_hat_is_clipped_after_combining():
    model = cond_model()
    x = 3 * torch.randn(6, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y = torch.arange(6)
    t = 12
    cond, uncond = (model.prediction(x, t, raw(model, x, t, v), clip=False) for v in (y, torch.full((6,), 10)))
    want = (uncond.x0_hat + 4 * (cond.x0_hat - uncond.x0_hat)).clamp(-1, 1)
    got = model.set_guidance(4).predict(x, t, y).x0_hat
    assert got.abs().max() <= 1 and (want.abs() == 1).any()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_guidance_needs_a_conditional_model_with_a_null_class():
    with pytest.raises(ValueError, match="needs a class-conditional model; this one is unconditional"):
        model_from_flags(TINY, levels=17).set_guidance(2)
    no_null = model_from_flags({**COND, "null_class": False}, levels=17)
    assert no_null.null_class is None and no_null.num_classes == 10
    with pytest.raises(ValueError, match="needs a model trained with label dropout"):
        no_null.set_guidance(2)
    no_null.set_guidance(1)  # s = 1 is always fine
    for bad in (-1, math.inf, math.nan):
        with pytest.raises(ValueError, match="must be a finite number >= 0"):
            cond_model().set_guidance(bad)


# ---------------------------------------------------------------------------------------------------------------------
# 3. guided prediction equals diffusers' classifier-free guidance on a class-conditional UNet2DModel


def diffusers_folder(path, num_class_embeds=11):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=num_class_embeds,
    )
    unet.save_pretrained(path / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=20).save_pretrained(path / "scheduler")
    return unet.eval()


@torch.no_grad()
def test_guided_prediction_equals_diffusers_cfg(tmp_path):
    """diffusers' pipelines (DiT's) guide as noise_uncond + s (noise_cond - noise_uncond) from unet(x, t,
    class_labels) on the doubled batch. Both sides here use the same float32 UNet call; they differ in where the
    combination is formed (float32 there, float64 here): a float32 rounding of outputs of size up to 2 (measured:
    1.2e-7 on eps, 7e-8 on x0_hat): atol 1e-5."""
    from ddpm_schedules.models.diffusers_bridge import load_diffusers

    unet = diffusers_folder(tmp_path)
    model = load_diffusers(tmp_path, levels=17, null_class=10)
    assert (model.num_classes, model.null_class, model.mean_type, model.T) == (10, 10, "eps", 20)
    model.set_guidance(2.5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(6, *SHAPE, generator=g)
    y = torch.tensor([0, 3, 9, 1, 5, 7])
    for t in (1, 7, 20):
        pred = model.predict(x, t, y)
        ts = torch.full((12,), t - 1)  # diffusers feeds the 0-based index
        noise_cond, noise_uncond = unet(
            torch.cat([x, x]), ts, class_labels=torch.cat([y, torch.full((6,), 10)])
        ).sample.chunk(2)
        want = noise_uncond + 2.5 * (noise_cond - noise_uncond)
        torch.testing.assert_close(pred.eps.float(), want, rtol=0, atol=1e-5)
        assert (want - noise_cond).abs().max() > 1e-3  # the labels matter to this UNet
        # ... and x0_hat is diffusers' pred_original_sample of that eps (before the clip)
        ab = model.schedule.ab[t]
        ref = ((x.double() - (1 - ab).sqrt() * want.double()) / ab.sqrt()).clamp(-1, 1)
        torch.testing.assert_close(pred.x0_hat, ref, rtol=0, atol=1e-5)


def test_load_diffusers_refuses_a_null_class_that_is_not_the_last_row(tmp_path):
    from ddpm_schedules.models.diffusers_bridge import load_diffusers

    diffusers_folder(tmp_path / "cond")
    with pytest.raises(ValueError, match=r"model.null_class = 9 must be the label lookup's last row, 10"):
        load_diffusers(tmp_path / "cond", levels=17, null_class=9)
    no_null = load_diffusers(tmp_path / "cond", levels=17)  # every row a class, no guidance
    assert (no_null.num_classes, no_null.null_class) == (11, None)
    with pytest.raises(ValueError, match="label dropout"):
        no_null.set_guidance(2)
    diffusers_folder(tmp_path / "uncond", num_class_embeds=None)
    with pytest.raises(ValueError, match=r"model.null_class = 10 but the UNet is unconditional"):
        load_diffusers(tmp_path / "uncond", levels=17, null_class=10)
    assert load_diffusers(tmp_path / "uncond", levels=17).num_classes is None


# ---------------------------------------------------------------------------------------------------------------------
# 4. samplers with labels: a batch is its examples' own runs


@pytest.mark.parametrize("scale", [1, 2])
@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "dpmpp"])
@torch.no_grad()
def test_labelled_batch_sample_is_the_per_example_samples(sampler, scale):
    """A batch of 6 with labels equals 6 one-example runs, each with its own label (and, for ancestral, its slice of
    the step noise): examples do not interact. The float64 network rounds a batch of 6 (12 when guided) and of 1 (2)
    differently, about 1e-16 relative per output, carried through 3 steps: atol 1e-10 on every trajectory point
    (measured: at most 1e-14); the quantized samples are equal."""
    model = cond_model().set_guidance(scale)
    sample = {"ancestral": sample_ancestral, "ddim": sample_ddim, "dpmpp": sample_dpmpp}[sampler]
    schedule = Schedule((4, 11, 20), 20)
    g = torch.Generator().manual_seed(7)
    x_T = torch.randn(6, *SHAPE, dtype=torch.float64, generator=g)
    y = torch.tensor([9, 0, 3, 3, 6, 1])
    noise = [torch.randn(6, *SHAPE, dtype=torch.float64, generator=g) for _ in range(2)]
    kw = (lambda sl: {"noise": [z[sl] for z in noise]}) if sampler == "ancestral" else (lambda sl: {})
    whole_traj: list = []
    whole = sample(model, schedule, x_T, y=y, trajectory=whole_traj, **kw(slice(None)))
    for i in range(6):
        traj: list = []
        one = sample(model, schedule, x_T[i : i + 1], y=y[i : i + 1], trajectory=traj, **kw(slice(i, i + 1)))
        assert torch.equal(one, whole[i : i + 1])
        for a, b in zip(traj, whole_traj, strict=True):
            torch.testing.assert_close(a, b[i : i + 1], rtol=0, atol=1e-10)
    # the labels change the samples
    other = sample(model, schedule, x_T, y=(y + 1) % 10, **kw(slice(None)))
    assert not torch.equal(other, whole)


def test_samplers_check_labels():
    model = cond_model()
    schedule = Schedule((5, 20), 20)
    x_T = torch.randn(3, *SHAPE, dtype=torch.float64)
    for sample in (sample_ancestral, sample_ddim, sample_dpmpp):
        with pytest.raises(ValueError, match=r"class-conditional \(10 classes\): pass y") as e:
            sample(model, schedule, x_T, generator=torch.Generator().manual_seed(0))
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError, match="label 12 is out of range for a model with 10 classes"):
            sample(model, schedule, x_T, generator=torch.Generator().manual_seed(0), y=torch.tensor([0, 12, 3]))
        with pytest.raises(ValueError, match="label -2 is out of range"):
            sample(model, schedule, x_T, generator=torch.Generator().manual_seed(0), y=torch.tensor([-2, 1, 3]))
        with pytest.raises(ValueError, match="y must be 3 integer labels"):
            sample(model, schedule, x_T, generator=torch.Generator().manual_seed(0), y=torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------------------------------
# 5. bad inputs of evaluate.py: one-line errors before any model pass, nothing written


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("cond_ckpts")
    cases = {
        "cond": COND,
        "cond_no_null": {**COND, "null_class": False},
        "cond5": {**COND, "num_classes": 5},
    }
    return {
        name: save_tiny_checkpoint(d / f"{name}.ckpt", flags, perturbed_state(flags)) for name, flags in cases.items()
    }


BAD_EVALUATE = [
    ("unconditional", ["eval.guidance=[2]"], r"eval\.guidance = 2\.0 needs a class-conditional model"),
    (
        "cond_no_null",
        ["data=digits", "eval.guidance=[1,2]"],
        r"eval\.guidance = 2\.0 needs a model trained with label ",
    ),
    (
        "cond",
        ["data=digits", "eval.strategies=[dp,even]", "eval.guidance=[2]"],
        r"eval\.strategies has dp.*eval\.guidance = \[2\.0\] has no 1",
    ),
    ("cond", ["data=synthetic"], r"class-conditional \(10 classes\) but data = SyntheticDataModule has no labels"),
    ("cond5", ["data=digits"], r"^label [5-9] is out of range for a model with 5 classes \(0\.\.4\)"),
]


@pytest.mark.parametrize(
    "ckpt,overrides,message", BAD_EVALUATE, ids=[" ".join(c[1]) + f" ({c[0]})" for c in BAD_EVALUATE]
)
def test_bad_conditional_inputs_of_evaluate(tmp_path, tiny_ckpt, ckpts, monkeypatch, ckpt, overrides, message):
    from ddpm_schedules.app.evaluate import evaluate

    calls = []
    monkeypatch.setattr(DiffusionModel, "predict", lambda *a, **k: calls.append(1))
    path = tiny_ckpt if ckpt == "unconditional" else ckpts[ckpt]
    with pytest.raises(ValueError, match=message) as e:
        evaluate(eval_cfg(tmp_path, path, "logger=none", *overrides))
    assert "\n" not in str(e.value)
    assert calls == []  # refused before any model pass
    assert not (tmp_path / "run" / "results.json").exists()


def test_guidance_errors_start_with_the_config_key(tmp_path, tiny_ckpt):
    from ddpm_schedules.app.evaluate import evaluate

    with pytest.raises(ValueError, match=r"^eval\.guidance = 2\.0 needs a class-conditional model"):
        evaluate(eval_cfg(tmp_path, tiny_ckpt, "logger=none", "eval.guidance=[2]"))


# ---------------------------------------------------------------------------------------------------------------------
# 6. training: label dropout, and a few steps of a conditional model


def test_label_dropout_replaces_about_p_of_the_labels_by_the_null_class():
    """10,000 labels at p = 0.2: the count of null labels is Binomial(10,000, 0.2), mean 2,000 and SD 40; 4 SDs is a
    bound a correct implementation fails with probability 6e-5 (and the seed is fixed)."""
    from ddpm_schedules.lightning.module import DiffusionModule

    module = DiffusionModule(COND, levels=17, label_dropout=0.2)
    n = 10_000
    y = torch.arange(n) % 10
    x = torch.zeros(n, *SHAPE)
    torch.manual_seed(11)
    out = module.labels((x, y), 0.2)
    dropped = out == 10
    assert abs(int(dropped.sum()) - 0.2 * n) <= 4 * math.sqrt(n * 0.2 * 0.8)
    assert torch.equal(out[~dropped], y[~dropped])  # a label is kept or dropped, never changed otherwise
    # every class is dropped at the same rate (each 1,000 labels: 4 SDs of Binomial(1,000, 0.2) = 50.6)
    per_class = torch.bincount(y[dropped], minlength=10)
    assert (per_class - 200).abs().max() <= 4 * math.sqrt(1000 * 0.2 * 0.8)
    assert torch.equal(module.labels((x, y)), y)  # validation: no dropout
    with pytest.raises(ValueError, match="label 10 is out of range"):
        module.labels((x[:3], torch.tensor([1, 10, 2])))  # the null class is not a data label
    assert DiffusionModule(TINY, levels=17).labels((x, y)) is None  # an unconditional model ignores labels


@pytest.mark.parametrize("flags", [{**COND, "null_class": False}, TINY], ids=["no null class", "unconditional"])
def test_label_dropout_needs_a_null_class(flags):
    from ddpm_schedules.lightning.module import DiffusionModule

    with pytest.raises(
        ValueError, match=r"^label_dropout = 0\.2 needs a class-conditional UNet with a null class"
    ) as e:
        DiffusionModule(flags, levels=17, label_dropout=0.2)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"label_dropout = 1\.0 must be in \[0, 1\)"):
        DiffusionModule(COND, levels=17, label_dropout=1.0)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_a_few_training_steps_of_a_conditional_model():
    """`training_step` with label dropout on the conditional tiny UNet: finite losses, the weights move, and the null
    class's embedding row is trained (it is the unconditional model guidance needs); without dropout it is not."""
    from ddpm_schedules.lightning.module import DiffusionModule

    x = torch.randint(0, 17, (16, *SHAPE), dtype=torch.uint8)
    y = torch.arange(16) % 10
    rows = {}
    for dropout in (0.5, 0.0):
        torch.manual_seed(0)
        module = DiffusionModule(COND, loss="hybrid", levels=17, lr=1e-3, label_dropout=dropout)
        before = {k: v.clone() for k, v in module.state_dict().items()}
        opt = module.configure_optimizers()
        for step in range(4):
            loss = module.training_step((x, y), step)
            assert math.isfinite(float(loss))
            opt.zero_grad()
            loss.backward()
            opt.step()
        after = module.state_dict()
        emb = next(k for k in after if k.endswith("label_emb.weight"))
        assert after[emb].shape[0] == 11
        assert sum(not torch.equal(after[k], before[k]) for k in after) > len(after) // 2
        rows[dropout] = not torch.equal(after[emb][10], before[emb][10])
    assert rows == {0.5: True, 0.0: False}  # the null row is trained by dropped labels only


@pytest.mark.slow
def test_lightning_trains_a_conditional_model_with_label_dropout():
    """The same through a Lightning Trainer (about 10 s: the Trainer's start-up)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from ddpm_schedules.lightning.module import DiffusionModule

    torch.manual_seed(0)
    module = DiffusionModule(COND, loss="hybrid", levels=17, lr=1e-3, label_dropout=0.5)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randint(0, 17, (32, *SHAPE), dtype=torch.uint8)
    y = torch.arange(32) % 10
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
    )
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    after = module.state_dict()
    emb = next(k for k in after if k.endswith("label_emb.weight"))
    assert not torch.equal(after[emb][10], before[emb][10])


# ---------------------------------------------------------------------------------------------------------------------
# 7. processes: 1 and 2 gloo processes give the same guided ODE matrix, the same guided samples and the same evaluation

GUIDED_BODY = """
from conftest import cond_model
from ddpm_schedules.costs.ode import estimate_ode_matrix
from ddpm_schedules.models.noise import Processes
from ddpm_schedules.sampling.quality import QualitySettings, draw_samples, gather_chunks
from ddpm_schedules.schedules.schedule import even_schedule
model = cond_model().set_guidance(2.0)
lo, hi = shard(10, fabric.global_rank, fabric.world_size)
cm = estimate_ode_matrix(model, hi - lo, seed=5, batch_size=3, progress=False, start_index=lo, multistep=True)
procs, settings = Processes(fabric.global_rank, fabric.world_size), QualitySettings(samples=10, chunk=3, seed=4)
samples = {s: gather_chunks(draw_samples(model, s, even_schedule(20, 4), settings, procs, 6), 64)
           for s in ("ancestral", "ddim", "dpmpp")}
if fabric.global_rank == 0:
    torch.save({"mean": cm.mean, "two_step": cm.two_step, "count": cm.count, **samples}, out)
"""


@pytest.mark.slow
def test_two_gloo_processes_give_the_one_process_guided_matrix_and_samples(tmp_path):
    # The network is float64; the two runs differ only in which examples share a batch and in the order the sums
    # are added, so they differ by a few float64 roundings (measured: matrices 1e-15 relative, samples 1e-15).
    # rtol 1e-9 / atol 1e-10 leave six orders of margin and still catch one mislabelled example (>= 1e-4, §1).
    one, two = (torch.load(f, weights_only=True) for f in run_on_gloo_processes(tmp_path, "guided", GUIDED_BODY, ".pt"))
    assert one["count"] == two["count"] == 10
    upper = torch.ones_like(one["mean"], dtype=torch.bool).triu(1)
    torch.testing.assert_close(two["mean"][upper], one["mean"][upper], rtol=1e-9, atol=0)
    torch.testing.assert_close(two["two_step"], one["two_step"], rtol=1e-9, atol=1e-12)
    for sampler in ("ancestral", "ddim", "dpmpp"):
        assert one[sampler].shape == (10, 64)
        torch.testing.assert_close(two[sampler], one[sampler], rtol=0, atol=1e-10)
    unguided = cond_model()
    x_T = torch.randn(3, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.arange(3)
    assert not torch.allclose(  # guidance moves the samples by far more than the tolerance
        sample_ddim(unguided, even_schedule(20, 4), x_T, y=y),
        sample_ddim(cond_model().set_guidance(2.0), even_schedule(20, 4), x_T, y=y),
        atol=1e-4,
    )


@pytest.mark.slow
def test_two_process_guided_evaluation_equals_one_process(tmp_path, ckpts):
    # A float32 network: with the same batches under 1 and 2 processes, only the order of the float64 sums differs
    # (measured 2e-16 relative), hence rtol 1e-9. With batch_size=8 the guided call (2B rows) ran as 8 rows under
    # one process and 4 under two, and this CPU's float32 kernels rounded them apart by 4e-6 relative: a kernel
    # property, not a sharding one, so the test holds the batches equal.
    docs = evaluate_on_processes(
        tmp_path,
        ckpts["cond"],
        "batch_size=2",  # the same batches under 1 and 2 processes: float32 kernels round other batch sizes otherwise
        "data=digits",
        "eval.guidance=[1,2]",
        "eval.samplers=[ddim,dpmpp]",
        "eval.strategies=[dp,dp_ode,even]",
        "eval.sample_budgets=[4]",
        "eval.teacher_samples=8",
    )
    caches = [sorted((tmp_path / f"cache{d}").glob("cost_matrix_*.pt")) for d in (1, 2)]
    assert [p.name for p in caches[0]] == [p.name for p in caches[1]] and len(caches[0]) == 3  # elbo, ode s=1, s=2
    for a, b in zip(*caches):
        one, two = CostMatrix.load(a), CostMatrix.load(b)
        valid = torch.isfinite(one.mean)
        torch.testing.assert_close(two.mean[valid], one.mean[valid], rtol=1e-9, atol=0)
    for a, b in zip(docs[1]["results"], docs[2]["results"], strict=True):
        assert a["schedule"] == b["schedule"] and a["bpd"] == pytest.approx(b["bpd"], rel=1e-9)
    rows = list(zip(docs[1]["sample_quality"], docs[2]["sample_quality"], strict=True))
    assert {a["guidance"] for a, _ in rows} == {1.0, 2.0}
    for a, b in rows:
        assert (a["strategy"], a["K"], a["sampler"], a["guidance"]) == (
            b["strategy"],
            b["K"],
            b["sampler"],
            b["guidance"],
        )
        assert a["schedule"] == b["schedule"]
        for key in ("fid", "fid_sem", "teacher_distance"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), (key, a[key], b[key])
