"""Train an improved-DDPM model while monitoring its optimal schedules: `python train.py experiment=digits`."""

import hydra
from omegaconf import DictConfig

from ddpm_schedules.app.cli import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from ddpm_schedules.app.train import train

    metrics = run(train, cfg)
    return metrics.get("val/bpd")


if __name__ == "__main__":
    main()
