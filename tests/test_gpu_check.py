"""benchmarks/gpu_check.sh: its --smoke run (the same steps at tiny sizes on the CPU) and its refusal without CUDA."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
ENV = {**os.environ, "PYTHON": sys.executable}  # this interpreter, whatever python3 is on PATH


@pytest.mark.slow
def test_the_smoke_run_measures_every_step_and_writes_its_json(tmp_path):
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["smoke"] and set(doc["passes_per_second"]) == {"fp32", "bf16", "bf16_compiled"}
    assert all(v > 0 for v in doc["passes_per_second"].values())
    assert doc["cost_matrix"]["finite"] and doc["cost_matrix"]["columns"] > 0 and doc["refined"]["columns"] > 0
    hours = doc["gpu_hours"]["hours"]
    per_pass = doc["cost_matrix"]["seconds_per_pass"]
    assert hours["full grid (4,000 columns)"] == pytest.approx(16384 * 4000 * per_pass / 3600, rel=1e-3)
    assert "pytest -m gpu exit 0" in proc.stdout and (tmp_path / "pytest_gpu.log").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_and_without_smoke_it_says_so_in_one_line():
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120, check=False, env=ENV)
    assert proc.returncode == 2 and proc.stdout == ""
    assert (
        proc.stderr.strip().count("\n") == 0 and "no CUDA device is visible" in proc.stderr and "--smoke" in proc.stderr
    )
