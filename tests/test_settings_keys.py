"""Every key the settings read is in the composed default config: conf/ is the one place the defaults are written.

The readers have no fallback values (app/keys.py), so a key removed from the YAML must fail here, loudly, and not only
on the branch of evaluate.py that happens to read it. The keys are taken from the readers' source: every literal key
passed to `get`, `count`, `seed`, `positive`, `flag` or `budgets` (a `get` with a fallback marks an optional key).
"""

import ast
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "src" / "ddpm_schedules" / "app"
READERS = {"get", "count", "seed", "positive", "flag", "budgets"}
SOURCES = {"evaluate": ["evaluate_config.py", "settings.py"], "train": ["train.py"]}


def keys_read(files: list[str]) -> set[str]:
    """The literal keys the readers of ``files`` read, less the optional ones."""
    keys, optional = set(), set()
    for name in files:
        for node in ast.walk(ast.parse((APP / name).read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in READERS):
                continue
            key = node.args[1] if len(node.args) >= 2 else None
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                (optional if node.func.id == "get" and len(node.args) > 2 else keys).add(key.value)
    return keys - optional


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


def composed(config: str, overrides: list[str]) -> dict:
    return OmegaConf.to_container(compose(config, overrides=overrides), resolve=False)  # "???" and ${...} stay as text


def has(tree: dict, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


@pytest.mark.parametrize("config", sorted(SOURCES))
def test_every_key_the_settings_read_is_in_the_default_config(config):
    keys = keys_read(SOURCES[config])
    assert len(keys) > (40 if config == "evaluate" else 4), sorted(keys)  # the parse found the readers
    # a key under a group holds for every option of the group (a data module's batch_size, a model loader's path)
    groups = {"data": group_options("data")} | ({"model": group_options("model")} if config == "evaluate" else {})
    runs = [[]] + [[f"{group}={option}"] for group, options in groups.items() for option in options]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        trees = {" ".join(run) or "defaults": composed(config, run) for run in runs}
    missing = {(run, key) for run, tree in trees.items() for key in keys if not has(tree, key)}
    assert not missing, f"conf/{config}.yaml does not define: {sorted(missing)}"
