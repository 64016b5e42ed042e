"""Run the ScheduleMonitor once under `trainer.validate` with N CPU processes (gloo): argv = out_dir devices."""

import sys

import pytorch_lightning as pl
from conftest import TINY

from ddpm_schedules.lightning.callbacks import ScheduleMonitor
from ddpm_schedules.lightning.data import SyntheticDataModule
from ddpm_schedules.lightning.module import DiffusionModule

if __name__ == "__main__":
    out, devices = sys.argv[1], int(sys.argv[2])
    pl.seed_everything(0)
    module = DiffusionModule({**TINY, "diffusion_steps": 16}, loss="hybrid", levels=17)
    data = SyntheticDataModule(sizes=(8, 12, 4), batch_size=4)
    monitor = ScheduleMonitor(budgets=[2, 4], examples=12, batch_size=5, out_dir=out, progress=False)
    strategy = "ddp" if devices > 1 else "auto"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        callbacks=[monitor],
        enable_progress_bar=False,
    )
    trainer.validate(module, datamodule=data)
