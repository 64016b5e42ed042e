"""evaluate.py's job: settings from the config, then model, data and `run_evaluation`; results.json's dict back."""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning_fabric import Fabric
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from ddpm_schedules.app.build import build, build_logger, finish_wandb, hydra_job, provenance
from ddpm_schedules.app.evaluate_config import evaluate_settings
from ddpm_schedules.app.keys import config_keys
from ddpm_schedules.app.run import run_evaluation
from ddpm_schedules.app.settings import EvaluateSettings
from ddpm_schedules.lightning.data import ImageDataModule
from ddpm_schedules.models.conditioning import LabeledImages, check_labels
from ddpm_schedules.models.model import DiffusionModel
from ddpm_schedules.models.noise import Processes
from ddpm_schedules.reports import report
from ddpm_schedules.schedules.analytic import load_gamma

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Cost matrix -> DP schedules -> held-out bits/dim, samples and FID per (strategy, K) -> reports;
    results.json's dict.

    Every setting is checked before the model or the data is loaded; results.json is written last and atomically.
    """
    exit_code = 1  # a crash or a stop marks the W&B run failed, with what it had logged
    try:
        settings = evaluate_settings(cfg)
        procs = launch_processes(settings.fabric)
        model = build_model(cfg.model, settings).to(device_for(procs))
        settings = settings.resolve(model)
        cost_data, eval_data, reference = evaluation_data(cfg.data, settings, model, procs)
        model.set_precision(settings.model.precision).compile_network(settings.model.compile)
        logger = build_logger(cfg.get("logger"), "evaluate", cfg) if procs.rank == 0 else None
        result = run_evaluation(
            model,
            cost_data,
            eval_data,
            settings,
            reference=reference,
            procs=procs,
            logger=logger,
            provenance=provenance(),
        )
        exit_code = 0
        if procs.rank != 0:
            return {}
        print(report.results_table(result.to_json()))
        return result.to_json()
    finally:
        finish_wandb(exit_code)


def launch_processes(fabric: dict[str, Any]) -> Processes:
    """Lightning Fabric's processes (DDP) for ``fabric.devices`` or ``fabric.num_nodes`` > 1; one process otherwise."""
    if fabric.get("devices", 1) == 1 and fabric.get("num_nodes", 1) == 1:
        return Processes()
    launched = Fabric(**fabric)
    launched.launch()
    return Processes(launched.global_rank, launched.world_size)


def device_for(procs: Processes) -> torch.device:
    """This process's device: rank r of a DDP run takes visible GPU r mod n; otherwise job j of a Hydra multirun
    (joblib runs several at once on one machine) takes GPU j mod n. CUDA_VISIBLE_DEVICES chooses which are visible:
    one device there pins every job to it."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = procs.rank if procs.world > 1 else (hydra_job().get("num") or 0)
    return torch.device("cuda", index % torch.cuda.device_count())


def build_model(node: DictConfig, settings: EvaluateSettings) -> DiffusionModel:
    """The model from the model group's loader, with model.var_type (an override of the checkpoint's rule) and its
    Gamma file."""
    loader = OmegaConf.masked_copy(node, [k for k in node if k not in ("var_type", "gamma_file")])
    with config_keys("model"):  # the loader's arguments are the model group's keys
        model = build(loader)
        var_type, gamma_file = settings.model.var_type, settings.model.gamma_file
        if var_type is not None:
            model.use_variance(var_type, load_gamma(gamma_file, model) if gamma_file is not None else None)
    return model


def take(
    datamodule: ImageDataModule, split: str, examples: int | None, key: str, num_classes: int | None = None
) -> Tensor | LabeledImages:
    """The first ``examples`` images of a split, named by the config key that asked for them; with ``num_classes``
    (a class-conditional model) with their labels, checked against the model's classes."""
    sizes = datamodule.split_sizes
    if split in sizes and examples is not None and examples > sizes[split]:
        raise ValueError(
            f"{key} = {examples} asks for {examples} {split} examples but the split has {sizes[split]}; lower it"
        )
    images = datamodule.tensor(split, examples)
    if num_classes is None:
        return images
    labels = datamodule.labels(split, examples)
    if labels is None:
        raise ValueError(
            f"the model is class-conditional ({num_classes} classes) but data = {type(datamodule).__name__} has no "
            "labels; use a labelled data set (digits, cifar10, imagenet64, an npz with a labels member)"
        )
    with config_keys(y="data"):
        check_labels(labels, len(images), num_classes)
    return LabeledImages(images, labels)


def evaluation_data(
    node: DictConfig, settings: EvaluateSettings, model: DiffusionModel, procs: Processes
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The cost, held-out and FID reference tensors of the data module, checked against the model."""
    with config_keys("data"):  # the data module's arguments are the data group's keys; its files are read here
        datamodule: ImageDataModule = build(node)
        image_shape = datamodule.image_shape
    if tuple(image_shape) != tuple(model.image_shape) or datamodule.levels != model.levels:
        raise ValueError(
            f"the data ({tuple(datamodule.image_shape)}, levels={datamodule.levels}) does not match the model "
            f"({tuple(model.image_shape)}, levels={model.levels}); evaluate the model on the data it was trained for"
        )
    cost, held, fid = settings.cost, settings.held_out, settings.fid
    cost_data = take(datamodule, cost.split, cost.examples, "cost.examples", model.num_classes)
    eval_data = take(datamodule, held.split, held.examples, "eval.examples", model.num_classes)
    if min(len(cost_data), len(eval_data)) < procs.world:
        raise ValueError(
            f"{procs.world} processes need at least {procs.world} examples each in cost.examples ({len(cost_data)}) "
            f"and eval.examples ({len(eval_data)}); raise them or lower fabric.devices"
        )
    reference = (
        take(datamodule, fid.reference_split, fid.reference_examples, "fid.reference_examples")
        if fid and not fid.reference_stats
        else None
    )
    return cost_data, eval_data, reference
