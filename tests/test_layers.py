"""The package's layout is a rule, not a description: stages import only the stages below them, no module
imports itself back through its siblings, and no module grows past 300 lines (pyproject.toml's contracts)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "ddpm_schedules"
LINT_IMPORTS = [
    sys.executable,
    "-c",
    "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
]


def lint_imports(src: Path) -> subprocess.CompletedProcess:
    """lint-imports with pyproject.toml's contracts on the package under ``src``."""
    env = {"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [*LINT_IMPORTS, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def planted(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of the package with ``line`` added at the top of ``module`` (a path inside the package)."""
    src = tmp_path / "src"
    shutil.copytree(PACKAGE, src / "ddpm_schedules", ignore=shutil.ignore_patterns("__pycache__"))
    target = src / "ddpm_schedules" / module
    target.write_text(line + "\n" + target.read_text())
    return src


def test_the_package_keeps_its_contracts():
    run = lint_imports(PACKAGE.parent)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 kept, 0 broken" in run.stdout


@pytest.mark.parametrize(
    "module, line, broken",
    [
        ("storage/files.py", "from ddpm_schedules.app import cli  # noqa", "stages import only the stages below them"),
        (
            "models/model.py",
            "from ddpm_schedules.sampling import samplers  # noqa",
            "stages import only the stages below them",
        ),
        (
            "models/model.py",
            "from ddpm_schedules.models import pairs  # noqa",
            "no import cycle between the modules of a folder",
        ),
    ],
)
def test_an_upward_import_or_a_cycle_breaks_a_contract(tmp_path, module, line, broken):
    run = lint_imports(planted(tmp_path, module, line))
    assert run.returncode != 0
    assert f"{broken} BROKEN" in run.stdout, run.stdout + run.stderr


def test_no_module_is_over_300_lines():
    long = {
        str(f.relative_to(PACKAGE)): n for f in PACKAGE.rglob("*.py") if (n := len(f.read_text().splitlines())) > 300
    }
    assert not long, f"split these modules: {long}"
