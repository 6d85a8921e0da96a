"""``layerkd-report``: Table 1 layout and Figure 2-style curves from a multirun directory."""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lightning_layerkd.methods import method_names

#: Table 1's names for the schedules (Kokane et al. 2024).
SCHEDULE_LABELS = {"none": "None", "multistep": "Constant Update", "layerwise": "Layerwise Update"}


#: What a results.json must hold to be reported.
REQUIRED = ("method", "schedule", "dataset", "student")


def _number_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _malformed(result: Any) -> str | None:
    """What in a parsed results.json the report cannot use (every field it reads, of the type
    it reads it as), or ``None``."""
    if not isinstance(result, dict):
        return f"it holds a JSON {type(result).__name__}, not an object"
    missing = [k for k in REQUIRED if k not in result]
    if missing:
        return f"no {', '.join(missing)}"
    for key in ("method", "schedule", "dataset"):
        if not isinstance(result[key], str):
            return f"{key} is {result[key]!r}, not a name"
    student = result["student"]
    if not isinstance(student, dict):
        return "student is not an object (no student.val_acc)"
    for key in ("val_acc", "best_val_acc"):
        if not _number_or_none(student.get(key)):
            return f"student.{key} is {student.get(key)!r}, not a number"
    history = student.get("history", [])
    if not isinstance(history, list) or not all(
        isinstance(row, dict) and all(_number_or_none(v) for v in row.values()) for row in history
    ):
        return "student.history is not a list of epochs of numbers"
    for key in ("teacher", "sweep", "config", "layerwise", "final_lrs", "eta"):
        if result.get(key) is not None and not isinstance(result[key], dict):
            return f"{key} is {type(result[key]).__name__}, not an object"
    if not _number_or_none((result.get("teacher") or {}).get("val_acc")):
        return "teacher.val_acc is not a number"
    if not isinstance(result.get("layer_pairs") or [], list):
        return "layer_pairs is not a list"
    return None


def read_result(path: Path) -> dict[str, Any] | str:
    """The results of ``path``, or why it cannot be reported."""
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        return f"{path}: unreadable ({type(err).__name__}: {err}); rerun or resume that run"
    problem = _malformed(result)
    if problem is not None:
        return f"{path}: malformed, {problem}; rerun or resume that run"
    return result


def gaps(root: Path) -> list[str]:
    """Everything below ``root`` the report cannot show: unreadable or malformed results.json
    files, and sweep jobs (of each ``multirun.yaml``) without one, with the command that runs
    or resumes them."""
    from . import signals
    from .signals import sweep_jobs

    found = [
        p
        for p in (read_result(p) for p in sorted(root.rglob("results.json")))
        if isinstance(p, str)
    ]
    for spec in sorted(root.rglob("multirun.yaml")):
        folder = spec.parent
        try:
            jobs: dict[int, list[str] | None] = dict(enumerate(sweep_jobs(folder)))
        except Exception:  # noqa: BLE001 - a sweeper of its own (Optuna): the job folders
            jobs = {int(d.name): None for d in folder.iterdir() if d.name.isdigit()}
        for num, overrides in sorted(jobs.items()):
            job = folder / str(num)
            if (job / "results.json").is_file():
                continue
            resume = (job / "checkpoints" / "last.ckpt").is_file()
            state = "stopped before it finished" if job.is_dir() else "never ran"
            how = ""
            if overrides is not None:
                command = signals.command(overrides, job, resume)
                how = f"; {'resume' if resume else 'run'} it: {command}"
            found.append(f"{job}: sweep job {num} has no results.json, it {state}{how}")
    for saved in sorted(root.rglob(".hydra/overrides.yaml")):  # single runs (and jobs alone)
        run_dir = saved.parent.parent
        if (run_dir / "results.json").is_file() or (run_dir.parent / "multirun.yaml").is_file():
            continue
        resume = (run_dir / "checkpoints" / "last.ckpt").is_file()
        try:
            overrides = [str(o) for o in OmegaConf.load(saved)]
        except Exception:  # noqa: BLE001 - an unreadable record: the run is still named
            overrides = []
        command = signals.command(overrides, run_dir, resume)
        found.append(
            f"{run_dir}: run has no results.json, it crashed or was stopped; "
            f"{'resume' if resume else 'rerun'} it: {command}"
        )
    return found


def collect(root: Path, sweep: str | None = None) -> list[dict[str, Any]]:
    """Every ``results.json`` below ``root``, or only those of ``sweep`` (an id from
    results.json). Runs of separate sweeps in separate directories are reported together; a
    sweep directory that holds runs of two sweeps (reused, with an earlier sweep's extra jobs
    left behind) is an error that lists them."""
    runs, bad = [], []
    for path in sorted(root.rglob("results.json")):
        result = read_result(path)
        if isinstance(result, str):
            bad.append(result)  # named by gaps() beside the table
            continue
        result["_dir"] = str(path.parent)
        runs.append(result)
    if not runs:
        raise FileNotFoundError(
            f"no readable results.json below {root}; point layerkd-report at a layerkd-train "
            "output or multirun directory" + "".join(f"\n  {line}" for line in bad)
        )
    if sweep is not None:
        chosen = [run for run in runs if (run.get("sweep") or {}).get("id") == sweep]
        if not chosen:
            raise ValueError(f"no runs of sweep {sweep!r} below {root}")
        return chosen
    by_dir: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        info = run.get("sweep") or {}
        if info.get("dir") is not None:
            by_dir[info["dir"]][info["id"]].append(run)
    mixed = {folder: ids for folder, ids in by_dir.items() if len(ids) > 1}
    if mixed:
        folder, ids = next(iter(mixed.items()))
        lines = [
            f"  --sweep {key}: {len(members)} runs, overrides "
            f"{members[0]['sweep'].get('overrides')}, e.g. {members[0]['_dir']}"
            for key, members in ids.items()
        ]
        raise ValueError(
            f"the sweep directory {folder} holds runs of {len(ids)} different sweeps (it was "
            "reused, and an earlier sweep's jobs were left behind); reporting them together "
            "would mix their seeds. Report one, or rerun into a fresh directory:\n"
            + "\n".join(lines)
        )
    return runs


def _cell(values: Sequence[float]) -> str:
    values = [100 * v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


#: Config keys (and groups) in which runs of one row may differ: seeds, and where things go.
SEED_AND_PLACES = ("seed", "ckpt_path", "output_dir", "teacher_cache_dir", "callbacks", "logger")
SEED_AND_PLACES_IN = ("dataset.data_dir", "dataset.num_workers", "trainer.enable_progress_bar")


def _settings(run: dict[str, Any]) -> dict[str, str]:
    """The run's config, flat, less its seed and where it writes (as JSON strings)."""
    flat: dict[str, str] = {}

    def walk(tree: Any, prefix: str) -> None:
        if isinstance(tree, dict):
            for key, value in tree.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix] = json.dumps(tree, sort_keys=True, default=str)

    walk(run.get("config") or {}, "")
    return {
        k: v
        for k, v in flat.items()
        if k.split(".")[0] not in SEED_AND_PLACES and not k.startswith(SEED_AND_PLACES_IN)
    }


def _variants(runs: list[dict[str, Any]]) -> list[str]:
    """Per run, what sets it apart from the runs of its row (method, schedule, dataset) other
    than the seed (``lr=0.01, map_weight=2``; "" when nothing): runs that differ in a setting
    (an Optuna search's trials) are never averaged as if they were seeds."""
    groups: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for index, run in enumerate(runs):
        groups[run["method"], run["schedule"], run["dataset"]].append(index)
    labels = [""] * len(runs)
    settings = [_settings(run) for run in runs]
    for members in groups.values():
        keys = sorted({k for i in members for k in settings[i]})
        varying = [k for k in keys if len({settings[i].get(k) for i in members}) > 1]
        for i in members:
            labels[i] = ", ".join(f"{k}={settings[i].get(k, '-')}" for k in varying)
    return labels


def table(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Rows ``(method, LR update)`` and one column per dataset: student accuracy, mean ± std
    over seeds (runs that differ in any other setting get rows of their own, labelled by
    it); plus the student alone and the teacher."""
    datasets = sorted({run["dataset"] for run in runs})
    cells: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    teachers: dict[str, dict[str, float]] = defaultdict(dict)
    for run, variant in zip(runs, _variants(runs), strict=True):
        key = (run["method"], run["schedule"] + (f" [{variant}]" if variant else ""))
        cells[key][run["dataset"]].append(run["student"]["val_acc"])
        teacher = run.get("teacher") or {}
        if teacher.get("val_acc") is not None:
            teachers[run["dataset"]][teacher.get("key", "")] = teacher["val_acc"]
    header = ["Method", "Learning Rate update", *datasets]
    rows = []
    methods = sorted({m for m, _ in cells}, key=_method_key)
    for method in methods:
        first = True
        for schedule in sorted(
            {s for m, s in cells if m == method},
            key=lambda s: (_schedule_key(s), s),
        ):
            label = method.replace("_", " ").replace("+", " + ").title()
            label = "Student alone" if method == "none" else label
            name, _, variant = schedule.partition(" [")
            shown = SCHEDULE_LABELS.get(name, name) + (f" [{variant}" if variant else "")
            row = [label if first else "", shown]
            row += [_cell(cells[method, schedule].get(d, [])) for d in datasets]
            rows.append(row)
            first = False
    rows.append(["Teacher", "", *[_cell(list(teachers[d].values())) for d in datasets]])
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _method_key(method: str) -> tuple[int, str]:
    """The registry's order (user methods after the built-in ones, ``attention+logits`` right
    after ``attention``), the student alone last."""
    order = [name for name in method_names() if name != "none"]
    if method == "none":
        return (len(order) + 1, method)
    name = method.split("+")[0]
    return (order.index(name) if name in order else len(order), method)


def divergence_table(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The last epoch's validation divergence per crucial layer, mean ± std over seeds: rows
    ``(method, LR update, layer)``, one column per dataset. Each method names its divergence
    (``jsd``, ``pkt``, ...; ``divergence_name`` in results.json), which the metric keys use."""
    datasets = sorted({run["dataset"] for run in runs})
    cells: dict[tuple[str, str, str, str], dict[str, list[float]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for run in runs:
        name = run.get("divergence_name")
        history = run["student"]["history"]
        if not name or not history:
            continue
        prefix = f"val/{name}/"
        for key, value in history[-1].items():
            if key.startswith(prefix):
                row = (run["method"], run["schedule"], name, key[len(prefix) :])
                cells[row][run["dataset"]].append(value)
    header = ["Method", "Learning Rate update", "Divergence", "Layer", *datasets]
    keys = sorted(cells, key=lambda k: (_method_key(k[0]), k[1], k[3]))
    rows = [
        [
            m,
            SCHEDULE_LABELS.get(s, s),
            d,
            layer,
            *[_raw_cell(cells[m, s, d, layer].get(x, [])) for x in datasets],
        ]
        for m, s, d, layer in keys
    ]
    return header, rows


def _raw_cell(values: Sequence[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g} (n={len(values)})"


def search_trials(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]], int] | None:
    """The trials of a search (``hparams_search=optuna``): a row per run whose sweeper searched
    parameters (its ``.hydra/hydra.yaml``), in trial order, with the searched values (from its
    config) and the student's best validation accuracy, the objective; and the index of the
    best row (the first of the highest). ``None`` when no run comes from a search."""
    found = []
    for run in runs:
        saved = Path(run["_dir"]) / ".hydra" / "hydra.yaml"
        if not saved.is_file():
            continue
        hydra_cfg = OmegaConf.load(saved).hydra
        params = hydra_cfg.sweeper.get("params")
        if params and "Optuna" in str(hydra_cfg.sweeper.get("_target_")):
            found.append((int(hydra_cfg.job.num), list(params), run))
    if not found:
        return None
    found.sort(key=lambda trial: trial[0])
    names = list(dict.fromkeys(name for _, params, _ in found for name in params))
    header = ["Trial", *names, "Best val acc (%)", "Best epoch"]
    rows, scores = [], []
    for num, _, run in found:
        config = OmegaConf.create(run["config"])
        values = [OmegaConf.select(config, name) for name in names]
        student = run["student"]
        best = student.get("best_val_acc")
        scores.append(-math.inf if best is None or math.isnan(best) else best)
        rows.append(
            [
                str(num),
                *[f"{v:.4g}" if isinstance(v, float) else str(v) for v in values],
                "-" if best is None else f"{100 * best:.2f}",
                str(student.get("best_epoch")),
            ]
        )
    return header, rows, scores.index(max(scores))


def _schedule_key(schedule: str) -> int:
    """Table 1's order of a schedule (a row's schedule may carry its setting: ``name [...]``)."""
    name = schedule.partition(" [")[0]
    return list(SCHEDULE_LABELS).index(name) if name in SCHEDULE_LABELS else 99


def _epoch_means(seeds: list[dict[int, float]]) -> tuple[list[int], list[float], list[float]]:
    """Epochs, the mean over seeds and one standard deviation (0 for a single seed)."""
    epochs = sorted(set().union(*seeds))
    values = [[acc[e] for acc in seeds if e in acc] for e in epochs]
    mean = [statistics.mean(v) for v in values]
    std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
    return epochs, mean, std


def curves_figure(runs: list[dict[str, Any]]) -> Any:
    """Validation accuracy per epoch (Figure 2 style) for comparing methods: one panel per
    dataset on one shared accuracy axis, one line per (method, schedule) with the mean over
    seeds and a band of one standard deviation, a colour per method and a line style per
    schedule (the same in every panel), whole-number epoch ticks, and the student alone
    (method ``none``) as a black dashed reference line where the runs have it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    curves: dict[str, dict[tuple[str, str], list[dict[int, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for run in runs:
        accs = {
            row["epoch"] + 1: 100 * row["val/acc"]
            for row in run["student"]["history"]
            if row.get("val/acc") is not None
        }
        curves[run.get("dataset", "")][run["method"], run["schedule"]].append(accs)
    datasets = sorted(curves)
    methods = sorted(
        {m for lines in curves.values() for m, _ in lines if m != "none"}, key=_method_key
    )
    schedules = sorted({s for lines in curves.values() for _, s in lines}, key=_schedule_key)
    colours = {m: f"C{k % 10}" for k, m in enumerate(methods)}
    styles = {s: ("-", "-.", ":")[k % 3] for k, s in enumerate(schedules)}  # "--": reference
    fig, axes = plt.subplots(
        1, len(datasets), figsize=(5.5 * len(datasets), 4.0), squeeze=False, sharey=True
    )
    for ax, dataset in zip(axes[0], datasets, strict=True):
        lines = sorted(curves[dataset], key=lambda k: (_method_key(k[0]), _schedule_key(k[1])))
        for method, schedule in lines:
            seeds = curves[dataset][method, schedule]
            epochs, mean, std = _epoch_means(seeds)
            schedule_label = SCHEDULE_LABELS.get(schedule, schedule)
            if method == "none":  # the reference every method is read against
                alone = [s for m, s in lines if m == "none"]
                name = "student alone" + (f", {schedule_label}" if len(alone) > 1 else "")
                style = {"color": "black", "linestyle": "--", "linewidth": 1.2, "zorder": 1}
            else:
                name = f"{method.replace('_', ' ')}, {schedule_label}"
                style = {"color": colours[method], "linestyle": styles[schedule], "marker": "o"}
                style["markersize"] = 2.5
            ax.plot(epochs, mean, label=f"{name} (n={len(seeds)})", **style)
            low = [m - d for m, d in zip(mean, std, strict=True)]
            high = [m + d for m, d in zip(mean, std, strict=True)]
            ax.fill_between(epochs, low, high, color=style["color"], alpha=0.1, linewidth=0)
        ax.set_title(dataset or "validation accuracy")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("validation accuracy (%)")
    fig.tight_layout()
    return fig


def plot_curves(runs: list[dict[str, Any]], path: Path) -> Path:
    """:func:`curves_figure` written to ``path`` (PNG)."""
    fig = curves_figure(runs)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """``layerkd-report DIR``: print the table (markdown); write ``table1.md``, ``table1.csv``,
    ``curves.png`` and ``runs.json`` (every run's results) into DIR (or ``--out``)."""
    parser = argparse.ArgumentParser(prog="layerkd-report", description=main.__doc__)
    parser.add_argument("directory", type=Path, help="a layerkd-train output or multirun dir")
    parser.add_argument("--out", type=Path, default=None, help="where to write csv and png")
    parser.add_argument("--sweep", default=None, help="report only this sweep id (results.json)")
    args = parser.parse_args(argv)
    try:
        runs = collect(args.directory, args.sweep)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"layerkd-report: error: {err}\n")
    out = args.out or args.directory
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write(args, runs, out)
    except OSError as err:
        parser.exit(
            2,
            f"layerkd-report: error: cannot write the report into {out} ({err.strerror or err}: "
            f"{err.filename or out}); pass --out <a writable folder>\n",
        )


def _write(args: argparse.Namespace, runs: list[dict[str, Any]], out: Path) -> None:
    header, rows = table(runs)
    text = markdown(header, rows)
    missing = gaps(args.directory)
    if missing:
        text += f"\n\nNot in this table ({len(missing)}):\n" + "\n".join(f"- {m}" for m in missing)
        for line in missing:
            print(f"layerkd-report: warning: {line}", file=sys.stderr)
    print(text)
    (out / "table1.md").write_text(text + "\n")
    with open(out / "table1.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    d_header, d_rows = divergence_table(runs)
    if d_rows:
        d_text = markdown(d_header, d_rows)
        print("\nFinal validation divergence per crucial layer:\n" + d_text)
        (out / "divergences.md").write_text(d_text + "\n")
    trials = search_trials(runs)
    if trials is not None:
        t_header, t_rows, best = trials
        t_text = markdown(t_header, t_rows)
        chosen = ", ".join(
            f"{k}={v}" for k, v in zip(t_header[1:-2], t_rows[best][1:-2], strict=True)
        )
        t_text += (
            f"\n\nBest: trial {t_rows[best][0]} ({chosen}): best val acc {t_rows[best][-2]}% "
            f"at epoch {t_rows[best][-1]}"
        )
        print(f"\nSearch trials ({len(t_rows)}):\n" + t_text)
        (out / "trials.md").write_text(t_text + "\n")
    png = plot_curves(runs, out / "curves.png")
    # every run's results.json in one file, folders relative to DIR: the evidence behind the table
    for run in runs:
        run["_dir"] = str(Path(run["_dir"]).relative_to(args.directory))
    (out / "runs.json").write_text(json.dumps(runs, indent=1))
    print(f"\nwrote table1.md, table1.csv, {png.name} and runs.json ({len(runs)} runs) to {out}")


if __name__ == "__main__":
    main()
