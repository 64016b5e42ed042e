"""Optimal schedules, held-out bits/dim and FID per budget and strategy: `python evaluate.py` (bundled digits model)."""

import hydra
from omegaconf import DictConfig

from ddpm_schedules.app.cli import run


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from ddpm_schedules.app.evaluate import evaluate

    run(evaluate, cfg)


if __name__ == "__main__":
    main()
