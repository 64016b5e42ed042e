"""One table across a Hydra multirun: every job's results.json (or a train job's last monitor record), grouped by the
overrides that differ between jobs, averaged over the seed overrides, with the best mean and its ties per K marked."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files and loggers only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: E402
from hydra.errors import OverrideParseException  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ddpm_schedules.reports.marks import TIE_RULE, best_and_ties, marked  # noqa: E402
from ddpm_schedules.reports.plots import _log_y_if_wide, sampler_label  # noqa: E402

STEP_FILE = re.compile(r"step_(\d+)\.json")  # ScheduleMonitor's <run dir>/schedules/step_<global_step>.json
METRICS = ("bpd", "fid", "teacher_distance")  # table order; a train sweep's predicted_<unit> comes after
NAMES = {"bpd": "held-out bits/dim", "fid": "Fréchet distance", "teacher_distance": "distance to the teacher"}
CAPTION = "mean ± standard error over seeds (n jobs): the std of the jobs' values (ddof = 1) / sqrt(n)"


def is_seed_key(key: str) -> bool:
    """``seed``, ``<x>.seed`` and ``<x>_seed`` overrides are replicates to average over, not groups."""
    return key == "seed" or key.endswith((".seed", "_seed"))


@dataclass
class Job:
    """One job of the sweep: its folder (relative to the sweep dir), its overrides and what it wrote."""

    dir: str
    overrides: dict[str, str]
    kind: str | None  # "evaluate" (results.json), "train" (the monitor's step files) or None: missing
    step: int | None = None  # train: the global step of the monitor record read


@dataclass
class SweepRecord:
    """One cell: a metric's mean and standard error over the seeds of a (group, strategy, K[, sampler, guidance])."""

    group: dict[str, str | None]
    strategy: str
    K: int
    metric: str
    sampler: str | None
    guidance: float | None
    mean: float
    sem: float | None
    n: int
    sem_source: str  # "seeds" (std over the n jobs, ddof = 1, / sqrt(n)) or "within-run" (n = 1: the job's own SE)
    best: bool = False
    tie: bool = False

    @property
    def table(self) -> tuple[str, str | None, float | None]:
        """The table the cell is in: (metric, sampler, guidance)."""
        return self.metric, self.sampler, self.guidance


@dataclass
class SweepResult:
    """What `aggregate` finds: the jobs, how their overrides split, and the records."""

    sweep_dir: Path
    jobs: list[Job]
    common: dict[str, str | None]
    grouping: list[str]
    seed_keys: list[str]
    records: list[SweepRecord]

    @property
    def missing(self) -> list[Job]:
        return [j for j in self.jobs if j.kind is None]

    def config(self) -> dict[str, Any]:
        """The sweep's description (the W&B run's config)."""
        return dict(sweep_dir=str(self.sweep_dir), grouping=self.grouping, seed_keys=self.seed_keys, common=self.common)

    def to_json(self) -> dict[str, Any]:
        """sweep.json: the description, every job and every record."""
        return {**self.config(), "jobs": [asdict(j) for j in self.jobs], "records": [asdict(r) for r in self.records]}

    def tables(self) -> dict[tuple, list[SweepRecord]]:
        """The records by table, (metric, sampler, guidance) -> its cells."""
        out: dict[tuple, list[SweepRecord]] = {}
        for r in self.records:
            out.setdefault(r.table, []).append(r)
        return out


def read_overrides(job_dir: Path) -> dict[str, str]:
    """A job's overrides from Hydra's ``.hydra/overrides.yaml``, key -> value as written on the command line."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    try:
        parsed = OverridesParser.create().parse_overrides([str(i) for i in yaml.safe_load(path.read_text()) or []])
    except (yaml.YAMLError, OverrideParseException, TypeError) as e:
        first = (str(e) or type(e).__name__).splitlines()[0]
        raise ValueError(f"{path} is not Hydra's list of overrides ({first}); rerun that job or delete it") from None
    # a package-qualified group (m@pkg=v) is its own key: it sets another node than m=v
    return {o.key_or_group + (f"@{o.package}" if o.package else ""): o.get_value_element_as_str() for o in parsed}


def _step_files(folder: Path, pattern: str = "schedules") -> list[Path]:
    return [p for p in folder.glob(f"{pattern}/step_*.json") if STEP_FILE.fullmatch(p.name)]


def find_jobs(sweep_dir: Path) -> dict[Path, str | None]:
    """Every job folder under ``sweep_dir`` (itself included) -> its kind; one with only Hydra's files is None."""
    found: dict[Path, str | None] = {p.parent.parent: None for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    found |= {p.parent.parent: "train" for p in _step_files(sweep_dir, "**/schedules")}
    # evaluate.py writes results.json last: present means the job finished (and its schedules/ is not a monitor's)
    return found | {p.parent: "evaluate" for p in sweep_dir.rglob("results.json")}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rerun that job or delete its folder") from None


def job_rows(job_dir: Path, kind: str) -> tuple[list[tuple[tuple, float, float | None]], int | None]:
    """A finished job's ((metric, sampler, guidance, strategy, K), value, within-run SE) and a train job's step."""
    if kind == "train":  # the monitor's last validation: the schedules of the model as trained
        step, path = max((int(STEP_FILE.fullmatch(p.name)[1]), p) for p in _step_files(job_dir))
        record = _read_json(path)
        metric = f"predicted_{record['unit']}"
        return [((metric, None, None, r["strategy"], r["K"]), r[metric], None) for r in record["results"]], step
    doc = _read_json(path := job_dir / "results.json")
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise ValueError(f"{path} holds no 'results' list: it is not evaluate.py's; move it out of the sweep dir")
    rows = [(("bpd", None, None, r["strategy"], r["K"]), r["bpd"], r.get("bpd_sem")) for r in doc["results"]]
    for q in doc.get("sample_quality") or []:
        where = (q["sampler"], float(q.get("guidance", 1.0)), q["strategy"], q["K"])
        rows += [((m, *where), q[m], q.get(f"{m}_sem")) for m in ("fid", "teacher_distance") if q.get(m) is not None]
    return [row for row in rows if row[1] is not None], None


def split_overrides(jobs: list[Job]) -> tuple[dict[str, str | None], list[str], list[str]]:
    """(common overrides, grouping keys, seed keys): a key is common when every job sets it to the same value, and
    otherwise a seed key or a grouping key (a key some jobs do not set differs: its value there is None)."""
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    values = {k: [j.overrides.get(k) for j in jobs] for k in keys}
    varying = [k for k in keys if len(set(values[k])) > 1]
    common = {k: values[k][0] for k in keys if k not in varying}
    return common, [k for k in varying if not is_seed_key(k)], [k for k in varying if is_seed_key(k)]


def aggregate(sweep_dir: str | Path) -> SweepResult:
    """Read every job of the sweep at ``sweep_dir`` and average each cell over its group's seeds."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ValueError(
            f"sweep dir {str(sweep_dir)!r} does not exist; pass the folder of a Hydra multirun "
            "(multirun/evaluate/<date>_<time>)"
        )
    found = find_jobs(sweep_dir)
    if not any(found.values()):
        raise ValueError(
            f"no results.json (nor a train job's schedules/step_*.json) under {str(sweep_dir)!r} ({len(found)} job "
            "folders); pass the multirun folder of finished evaluate.py or train.py jobs"
        )
    jobs, values = [], []
    for path in sorted(found, key=lambda p: [(0, int(x), "") if x.isdigit() else (1, 0, x) for x in p.parts]):
        rows, step = job_rows(path, found[path]) if found[path] else ([], None)  # job 10 after job 9, not after 1
        jobs.append(Job(path.relative_to(sweep_dir).as_posix(), read_overrides(path), found[path], step))
        values.append(rows)
    common, grouping, seed_keys = split_overrides(jobs)
    cells: dict[tuple, list[tuple[float, float | None]]] = {}
    for job, rows in zip(jobs, values):
        group = tuple(job.overrides.get(k) for k in grouping)
        for key, value, sem in rows:
            cells.setdefault((group, *key), []).append((float(value), sem))
    records = []
    for (group, metric, sampler, guidance, strategy, K), items in cells.items():
        v = np.array([value for value, _ in items], dtype=np.float64)
        if len(v) > 1:
            sem, source = float(v.std(ddof=1) / math.sqrt(len(v))), "seeds"
        else:  # one seed: no spread to measure, the run's own estimate of its error stands in
            sem, source = items[0][1], "within-run"
        group = dict(zip(grouping, group))
        records.append(SweepRecord(group, strategy, K, metric, sampler, guidance, float(v.mean()), sem, len(v), source))
    records = _ordered(records)
    mark_best(records)
    return SweepResult(sweep_dir, jobs, common, grouping, seed_keys, records)


def _ordered(records: list[SweepRecord]) -> list[SweepRecord]:
    # tables in METRICS order, then rows in the order the jobs first showed them, then K
    first: dict[Any, int] = {}
    row = lambda r: (json.dumps(r.group), r.strategy)  # noqa: E731
    for k in (k for r in records for k in (r.table, row(r)[0], row(r))):
        first.setdefault(k, len(first))
    rank = lambda r: METRICS.index(r.metric) if r.metric in METRICS else len(METRICS)  # noqa: E731
    return sorted(records, key=lambda r: (rank(r), first[r.table], first[row(r)[0]], first[row(r)], r.K))


def mark_best(records: list[SweepRecord]) -> None:
    """Per table and K: ``best`` on the lowest mean, ``tie`` where the one-SE intervals overlap the best's."""
    columns: dict[tuple, list[SweepRecord]] = {}
    for r in records:
        if math.isfinite(r.mean):
            columns.setdefault((*r.table, r.K), []).append(r)
    for column in columns.values():
        for r, (best, tie) in zip(column, best_and_ties([(r.mean, r.sem) for r in column])):
            r.best, r.tie = best, tie


def group_label(group: dict[str, str | None]) -> str:
    """A group as ``key=value, ...`` (``all`` when nothing but seeds differs)."""
    return ", ".join(f"{k}={v}" for k, v in group.items()) or "all"


def title(metric: str, sampler: str | None, guidance: float | None) -> str:
    """A table's heading."""
    where = "" if sampler is None else f", {sampler_label({'sampler': sampler, 'guidance': guidance})} sampler"
    if metric.startswith("predicted_"):  # train jobs: the schedule monitor's last record
        return f"{metric} of the schedule monitor's last validation (train jobs){where}"
    return NAMES.get(metric, metric) + where


def _cell(r: SweepRecord) -> str:
    d = 2 if r.metric == "fid" else 3
    text = f"{r.mean:.{d}f}" + (f" ± {r.sem:.{d}f}" if r.sem is not None else "") + f" ({r.n})"
    return marked(text, r.best, r.tie)


def sweep_markdown(result: SweepResult) -> str:
    """sweep.md: the header (sweep dir, jobs, common overrides, grouping and seed keys), then one table per metric."""
    code = lambda items: ", ".join(f"`{k}={v}`" for k, v in items) or "none"  # noqa: E731
    lines = [
        f"# Sweep {result.sweep_dir}",
        "",
        f"- jobs: {len(result.jobs)} ({len(result.missing)} missing)",
        f"- common overrides: {code(result.common.items())}",
        f"- grouping keys: {', '.join(f'`{k}`' for k in result.grouping) or 'none (one group)'}",
        f"- seed keys (averaged over): {', '.join(f'`{k}`' for k in result.seed_keys) or 'none'}",
    ]
    lines += [f"- missing (no results yet): `{j.dir}` with {code(j.overrides.items())}" for j in result.missing]
    for (metric, sampler, guidance), rows in result.tables().items():
        ks = sorted({r.K for r in rows})
        within = "" if metric.startswith("predicted_") else f" ({metric}_sem)"
        one = f"; n = 1: the job's own within-run standard error{within}" if min(r.n for r in rows) == 1 else ""
        lines += ["", f"## {title(metric, sampler, guidance)}", "", CAPTION + one, ""]
        lines += ["| group | strategy | " + " | ".join(f"K={k}" for k in ks) + " |", "|---" * (len(ks) + 2) + "|"]
        cells = {(group_label(r.group).replace("|", "\\|"), r.strategy, r.K): _cell(r) for r in rows}
        for group, strategy in dict.fromkeys((g, s) for g, s, _ in cells):
            shown = " | ".join(cells.get((group, strategy, k), "") for k in ks)
            lines.append(f"| {group} | {strategy} | {shown} |")
        lines += ["", TIE_RULE]
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[SweepRecord], heading: str, ylabel: str) -> Figure:
    """One table's means against K with SE error bars, one line per group x strategy, the legend outside the axes."""
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    lines: dict[str, list[SweepRecord]] = {}
    for r in sorted(rows, key=lambda r: r.K):
        lines.setdefault(f"{group_label(r.group)} | {r.strategy}", []).append(r)
    for label, line in lines.items():
        ks, means, sems = [r.K for r in line], [r.mean for r in line], [r.sem or 0.0 for r in line]
        ax.errorbar(ks, means, yerr=sems, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets := sorted({r.K for r in rows}), [str(k) for k in budgets])  # K itself, not 2^k
    _log_y_if_wide(ax, [r.mean for r in rows])
    ax.set(xlabel="steps K", ylabel=ylabel)
    ax.set_title(heading, fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    return fig


def figures(result: SweepResult) -> dict[str, Figure]:
    """sweep_bpd (a train sweep: sweep_predicted_<unit>) and one sweep_fd_<sampler> per sampler with FD rows."""
    out = {}
    for (metric, sampler, guidance), rows in result.tables().items():
        heading = f"{title(metric, sampler, guidance)}, {result.sweep_dir.name}"
        if metric == "bpd" or metric.startswith("predicted_"):
            out[f"sweep_{metric}"] = plot_sweep(rows, heading, metric.replace("bpd", "bits/dim"))
        elif metric == "fid":
            label = sampler_label({"sampler": sampler, "guidance": guidance})
            out[f"sweep_fd_{label}"] = plot_sweep(rows, heading, "Fréchet distance")
    return out
