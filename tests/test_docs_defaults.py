"""Every default that the settings tables of docs/evaluate.md and docs/training.md state is what conf/ composes to.

A settings table is a markdown table with a `key` and a `default` column (and optionally a `with` column of Hydra
overrides to compose with). The rules of the default column are written above docs/evaluate.md's table: one default
per key, comma-separated, in YAML (`null`, `true`, numbers, `[lists]`, `{}`, strings bare or in backticks); a config
group's row names the option chosen; a `key.*` row gives `name: value` for every key of that block; `required` is a
`???` value; `—` states no default, and is allowed only for the keys in NO_SINGLE_DEFAULT.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import Container, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

ROOT = Path(__file__).resolve().parents[1]
DOCS = {"docs/evaluate.md": "evaluate", "docs/training.md": "train"}  # each doc's tables against this config
MIN_KEYS = {"docs/evaluate.md": 56, "docs/training.md": 25}  # the keys the tables state now: a dropped row fails
NO_SINGLE_DEFAULT = {"cache_dir"}  # $DDPM_SCHEDULES_CACHE, else a folder under $HOME: said in words
# evaluate.yaml's keys that the table need not list: Hydra's own, the run directory, the groups' internals (their
# choice is a row) and the top-level `seed`, which evaluate.py does not read (its seeds are cost.seed, eval.seed,
# sample.seed)
UNLISTED = ("hydra", "paths", "data.", "logger.", "seed")

ABSENT, MISSING, NONE_STATED = object(), object(), object()
KEY = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*(\.\*)?")


def cells(line: str) -> list[str]:
    """The cells of a table row, split at `|` but not at the escaped `\\|`."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def settings_rows(text: str) -> list[dict]:
    """Every row of every settings table: {"line", "with", "keys", "defaults"} (the cells as written)."""
    rows, lines = [], text.splitlines()
    for i, line in enumerate(lines[:-1]):
        if not (line.startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip())):
            continue
        header = [h.lower() for h in cells(line)]
        col = {
            name: next((j for j, h in enumerate(header) if h.startswith(name)), None)
            for name in ("with", "key", "default")
        }
        if col["key"] is None or col["default"] is None:
            continue
        for n, row in enumerate(lines[i + 2 :], start=i + 3):
            if not row.startswith("|"):
                break
            c = cells(row)
            rows.append(
                {
                    "line": n,
                    "with": re.findall(r"`([^`]+)`", c[col["with"]]) if col["with"] is not None else [],
                    "keys": re.findall(r"`([^`]+)`", c[col["key"]]),
                    "defaults": c[col["default"]],
                }
            )
    return rows


def split_top(cell: str) -> list[str]:
    """Comma-separated items, not splitting inside backticks, brackets or braces."""
    items, depth, quoted, cur = [], 0, False, ""
    for ch in cell:
        if ch == "`":
            quoted = not quoted
        elif not quoted and ch in "[{":
            depth += 1
        elif not quoted and ch in "]}":
            depth -= 1
        if ch == "," and depth == 0 and not quoted:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [*items, cur.strip()] if cur.strip() or items else []


def parse_value(item: str):
    """One stated default: `—`, `required` or a YAML value (backticks around it dropped)."""
    if item == "—":
        return NONE_STATED
    if item == "required":
        return MISSING
    if len(item) > 1 and item[0] == item[-1] == "`":
        item = item[1:-1]
    return yaml.safe_load(item)


def same(a, b) -> bool:
    """Equal and of the same type all the way down (1 is not 1.0, nor true)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@lru_cache(maxsize=None)
def composed(config: str, overrides: tuple[str, ...] = ()) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose(config, overrides=list(overrides), return_hydra_config=True)


def config_value(cfg: DictConfig, key: str):
    """A config group's chosen option, a `key.*` block without its `_`-keys, MISSING for `???`, or the plain value."""
    choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra/")}
    if key in choices:
        return choices[key]
    try:
        value = OmegaConf.select(cfg, key.removesuffix(".*"), default=ABSENT, throw_on_missing=True)
    except MissingMandatoryValue:
        return MISSING
    if key.endswith(".*") and not isinstance(value, DictConfig):
        return ABSENT
    value = OmegaConf.to_container(value) if isinstance(value, Container) else value
    return {k: v for k, v in value.items() if not str(k).startswith("_")} if key.endswith(".*") else value


def check_rows(rows: list[dict], config: str, where: str) -> tuple[list[str], set[str]]:
    """The mismatches (one line each) and the keys checked."""
    errors, checked = [], set()
    for row in rows:
        at = f"{where}:{row['line']}"
        if not row["keys"] or any(not KEY.fullmatch(k) for k in row["keys"]):
            errors.append(f"{at}: the key cell must hold config keys in backticks, not {row['keys']}")
            continue
        cfg = composed(config, tuple(row["with"]))
        block = any(k.endswith(".*") for k in row["keys"])
        if block and len(row["keys"]) > 1:
            errors.append(f"{at}: a `key.*` row holds that one key only, not {row['keys']}")
            continue
        stated = [row["defaults"]] if block else split_top(row["defaults"])
        if len(stated) != len(row["keys"]):
            errors.append(f"{at}: {len(row['keys'])} keys {row['keys']} but {len(stated)} defaults {stated}")
            continue
        for key, item in zip(row["keys"], stated):
            actual = config_value(cfg, key)
            try:
                doc = (
                    {k: v for pair in split_top(item) for k, v in parse_value(pair).items()}
                    if key.endswith(".*")
                    else parse_value(item)
                )
            except (yaml.YAMLError, AttributeError, TypeError) as e:
                errors.append(f"{at}: {key}: cannot read the default {item!r} ({e.__class__.__name__})")
                continue
            if actual is ABSENT:
                errors.append(f"{at}: {key} is not a key of conf/{config}.yaml (with {row['with']})")
            elif doc is NONE_STATED:
                if key not in NO_SINGLE_DEFAULT:
                    errors.append(f"{at}: {key} states no default (—) but conf/{config}.yaml has {actual!r}; state it")
            elif doc is MISSING or actual is MISSING:
                if doc is not actual:
                    errors.append(
                        f"{at}: {key}: the doc says {item!r}, the config {'???' if actual is MISSING else repr(actual)}"
                    )
            elif not same(doc, actual):
                errors.append(f"{at}: {key}: the doc says {doc!r}, conf/{config}.yaml has {actual!r}")
            if doc is not NONE_STATED:
                checked.add(" ".join([*row["with"], key]))
    return errors, checked


def leaf_keys(node, prefix: str = "") -> list[str]:
    """Dotted keys of a config's leaves (lists and empty blocks are leaves)."""
    if isinstance(node, DictConfig) and len(node):
        return [k for name in node for k in leaf_keys(node._get_node(name), f"{prefix}{name}.")]
    return [prefix[:-1]]


def test_every_stated_default_matches_the_config():
    for doc, config in DOCS.items():
        rows = settings_rows((ROOT / doc).read_text())
        errors, checked = check_rows(rows, config, doc)
        assert not errors, "\n".join(errors)
        assert len(checked) >= MIN_KEYS[doc], (
            f"{doc}: {len(checked)} keys checked, fewer than the {MIN_KEYS[doc]} it states"
        )


def test_evaluate_table_lists_every_setting():
    rows = settings_rows((ROOT / "docs/evaluate.md").read_text())
    listed = {k for r in rows if not r["with"] for k in r["keys"]}
    cfg = composed("evaluate")
    keys = [
        k
        for k in leaf_keys(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
        if not k.startswith(UNLISTED) and not any(part.startswith("_") for part in k.split("."))
    ]
    missing = [k for k in keys if k not in listed and not any(k.startswith(p[:-1]) for p in listed if p.endswith(".*"))]
    assert not missing, f"conf/evaluate.yaml has keys docs/evaluate.md's table does not list: {missing}"


def test_a_wrong_default_is_reported():
    table = """| key | default | meaning |
|---|---|---|
| `cost.split`, `cost.examples` | val, 129 | x |
| `cost.refine.*` | `enabled: false`, `window: 1` | x |
| `eval.budgets` | [8, 16, 32] | x |
| `fid.enabled` | 1 | x |
| `model.path` | — | x |
| `no.such.key` | 3 | x |
| `logger` | csv | x |
| `fid.samples`, `fid.bootstrap` | 500 | x |
"""
    errors, checked = check_rows(settings_rows(table), "evaluate", "table")
    flagged = {int(e.split(":")[1]) for e in errors}
    assert flagged == {3, 4, 5, 6, 7, 8, 9, 10}, "\n".join(errors)
    assert "cost.split" in checked and "cost.examples" in checked
