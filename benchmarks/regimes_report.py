"""The regimes report (RESULTS.md section 3): the strong-teacher runs of several regimes side by
side, each method at the student's rate and at its own best rate, with the core-hours they cost,
and one figure of accuracy against core-hours.

    python benchmarks/regimes_report.py            # reads benchmarks/results/strong_teacher/*
    # writes benchmarks/results/regimes/tables.md and cost.png
    python benchmarks/regimes_report.py --matched-epochs student   # epochs of a compute-matched run

A compute-matched run (item 4) trains a configuration for as many core-seconds as a run of the
reference (Jacobian matching) takes: the same schedule shape (decays at 1/2 and 3/4 of the epochs)
stretched to ``round(epochs * cost(reference) / cost(configuration))`` epochs, both costs the mean
over the regime's runs of that configuration, measured CPU time preferred to wall time.

A run's cost is its process CPU time (``cpu_seconds``: core-seconds, whatever else shared the
machine); runs recorded before that field existed give their wall time (one thread each, so an
upper bound of the same quantity), marked with ``*`` in the tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strong_teacher import _paired

log = logging.getLogger("regimes_report")
RESULTS = Path(__file__).parent / "results" / "strong_teacher"


@dataclass(frozen=True)
class RegimeDir:
    """One regime's results folder and the student alone's best rate in it."""

    label: str
    folder: str
    student_lr: float


REGIMES = (
    RegimeDir("CIFAR-100, 100 a class, 15 epochs", "cifar100", 0.4),
    RegimeDir("CIFAR-100, 100 a class, 45 epochs", "cifar100_e45", 0.4),
    RegimeDir("CIFAR-100, 500 a class, 15 epochs", "cifar100_full", 0.4),
    RegimeDir("CIFAR-10, 500 a class, 10 epochs", "cifar10", 0.2),
)
#: Item 4: the 100-a-class CIFAR-100 rows trained for Jacobian matching's core-seconds.
MATCHED = RegimeDir(
    "CIFAR-100, 100 a class, Jacobian matching's core-seconds", "cifar100_matched", 0.4
)
MATCHED_REFERENCE = "jacobian_matching"
#: The methods of the own-rate comparison (item 1) and the configurations of the figure.
OWN_RATE = ("logits", "attention+logits/constant", "jacobian_matching", "information_flow")
#: Issue 29's logit methods and compositions, each also paired with Hinton's KD.
LOGIT_METHODS = (
    "logits",
    "dkd",
    "dist",
    "logits+ls",
    "dkd+ls",
    "attention+logits/constant",
    "attention+dkd",
    "attention+dkd+ls",
    "attention+dist",
    "jacobian_matching",
    "jacobian_matching+dist",
)


def core_seconds(record: dict[str, Any]) -> tuple[float, bool]:
    """The run's core-seconds and whether they are a wall-time stand-in."""
    if "cpu_seconds" in record:
        return float(record["cpu_seconds"]), False
    return float(record["seconds"]) * int(record.get("threads", 1)), True


def load(folder: Path) -> dict[tuple[str, float], dict[int, dict[str, Any]]]:
    """Every run of ``folder`` by (configuration, rate) and seed."""
    runs: dict[tuple[str, float], dict[int, dict[str, Any]]] = {}
    for path in sorted(folder.glob("*__seed*.json")):
        record = json.loads(path.read_text())
        runs.setdefault((record["config"], record["lr"]), {})[record["seed"]] = record
    return runs


Runs = dict[tuple[str, float], dict[int, dict[str, Any]]]


def mean_cost(folders: list[Runs], name: str) -> float:
    """Mean core-seconds of a run of ``name`` at any rate in ``folders``: measured CPU time where
    any run has it (runs from before the field, or before a speed-up, only where none has)."""
    records = [
        r for runs in folders for (n, _), rows in runs.items() if n == name for r in rows.values()
    ]
    measured = [core_seconds(r)[0] for r in records if not core_seconds(r)[1]]
    costs = measured or [core_seconds(r)[0] for r in records]
    if not costs:
        raise SystemExit(f"no run of {name!r} to take its cost from; run it first")
    return statistics.mean(costs)


def matched_epochs(folders: list[Runs], name: str, reference: str = MATCHED_REFERENCE) -> int:
    """Epochs for which ``name`` costs what a run of ``reference`` costs (module docstring)."""
    epochs = {r["epochs"] for runs in folders for rows in runs.values() for r in rows.values()}
    if len(epochs) != 1:
        raise SystemExit(f"the folders' runs mix epochs {sorted(epochs)}; expected one budget")
    return max(1, round(epochs.pop() * mean_cost(folders, reference) / mean_cost(folders, name)))


def matched_table(matched: Runs, runs: Runs, regime: RegimeDir = MATCHED) -> str:
    """Item 4: each compute-matched row against the reference's own runs (``runs``: the regime
    at its own budget), paired by seed."""
    reference = runs.get((MATCHED_REFERENCE, regime.student_lr), {})
    student = matched.get(("student", regime.student_lr), {})
    lines = [
        f"{regime.label} (base rate {regime.student_lr:g}; the reference: "
        f"{MATCHED_REFERENCE}, {cost(reference) if reference else '-'} core-hours a run)",
        "",
        "| configuration | epochs | accuracy (%) | seeds | minus the compute-matched student "
        f"| minus {MATCHED_REFERENCE} (paired, seeds) | core-hours a run |",
        "|---|---|---|---|---|---|---|",
        f"| {MATCHED_REFERENCE} | {_epochs(reference)} | "
        f"{mean_std(accuracies(reference)) if reference else '-'} | {len(reference)} | "
        f"{paired(reference, student) if student and reference else '-'} | - | "
        f"{cost(reference) if reference else '-'} |",
    ]
    for (name, lr), rows in sorted(matched.items()):
        if lr != regime.student_lr:
            continue
        cells = [
            name,
            _epochs(rows),
            mean_std(accuracies(rows)),
            str(len(rows)),
            paired(rows, student) if student else "-",
            paired(rows, reference) if reference else "-",
            cost(rows),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _epochs(rows: dict[int, dict[str, Any]]) -> str:
    return ", ".join(str(e) for e in sorted({r["epochs"] for r in rows.values()})) or "-"


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def paired(rows: dict[int, dict[str, Any]], base: dict[int, dict[str, Any]]) -> str:
    """Mean ± std of the accuracy differences to ``base``, paired by seed, and their count."""
    return _paired(list(rows.values()), list(base.values())) if rows is not base else "-"


def cost(rows: dict[int, dict[str, Any]]) -> str:
    """Mean core-hours per run (``*``: from wall time)."""
    costs = [core_seconds(r) for r in rows.values()]
    hours = statistics.mean(c for c, _ in costs) / 3600
    return f"{hours:.3f}{'*' if any(wall for _, wall in costs) else ''}"


def accuracies(rows: dict[int, dict[str, Any]]) -> list[float]:
    return [r["test_accuracy"] for r in rows.values()]


def own_rate_table(
    regime: RegimeDir,
    runs: Runs,
    names: tuple[str, ...] = OWN_RATE,
    also_against: str | None = None,
) -> str:
    """Item 1: each method at the student's rate and at its own best rate of the grid, paired
    with the student alone at its best rate and, with ``also_against``, with that configuration
    at the same rate as the row (issue 29: Hinton's KD, ``logits``)."""
    student = runs.get(("student", regime.student_lr), {})
    against = f" | minus {also_against} (same rate)" if also_against else ""
    lines = [
        f"{regime.label} (the student alone's best rate: {regime.student_lr:g})",
        "",
        f"| method | at the student's rate (%) | minus the student alone{against} "
        f"| own best rate | at its own best (%) | minus the student alone{against} | seeds |",
        "|---|---|---|---|---|---|---|" + ("---|---|" if also_against else ""),
    ]
    for name in ("student", *names):
        grid = {lr: rows for (n, lr), rows in runs.items() if n == name and len(rows) >= 2}
        if regime.student_lr not in grid:
            continue
        best = max(grid, key=lambda lr: statistics.mean(accuracies(grid[lr])))
        cells = [name]
        for at_best, lr in enumerate((regime.student_lr, best)):
            if at_best:
                cells.append(f"{best:g} (of {', '.join(f'{r:g}' for r in sorted(grid))})")
            cells += [mean_std(accuracies(grid[lr])), paired(grid[lr], student)]
            if also_against:
                base = runs.get((also_against, lr), {})
                cells.append(paired(grid[lr], base) if base and name != "student" else "-")
        cells.append(str(len(grid[best])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def regime_table(regime: RegimeDir, runs: dict[tuple[str, float], dict[int, Any]]) -> str:
    """Every configuration at the student's rate, with its cost."""
    student = runs.get(("student", regime.student_lr), {})
    lines = [
        f"{regime.label}, base rate {regime.student_lr:g}",
        "",
        "| configuration | accuracy (%) | seeds | minus the student alone (paired, seeds) "
        "| minus its constant schedule (paired, seeds) | core-hours a run |",
        "|---|---|---|---|---|---|",
    ]
    for (name, lr), rows in sorted(runs.items()):
        if lr != regime.student_lr:
            continue
        maps, _, schedule = name.partition("/")
        layerwise = schedule not in ("", "constant")
        constant = runs.get((f"{maps}/constant", lr), {}) if layerwise else {}
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    mean_std(accuracies(rows)),
                    str(len(rows)),
                    paired(rows, student),
                    paired(rows, constant) if constant else "-",
                    cost(rows),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def points(
    runs: dict[tuple[str, float], dict[int, Any]], lr: float
) -> Iterable[tuple[str, float, float, float]]:
    """(configuration, core-hours, mean accuracy, std) at ``lr`` for rows with two seeds or more."""
    for (name, rate), rows in sorted(runs.items()):
        if rate != lr or len(rows) < 2:
            continue
        accs = accuracies(rows)
        hours = statistics.mean(core_seconds(r)[0] for r in rows.values()) / 3600
        yield name, hours, statistics.mean(accs), statistics.stdev(accs)


def plot(panels: list[tuple[RegimeDir, dict[tuple[str, float], dict[int, Any]]]], path: Path):
    """Accuracy against core-hours a run, one panel per regime, one marker per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    names = sorted({n for _, runs in panels for n, _ in runs})
    colours = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}
    for ax, (regime, runs) in zip(axes[0], panels, strict=True):
        for name, hours, acc, std in points(runs, regime.student_lr):
            ax.errorbar(hours, acc, yerr=std, fmt="o", color=colours[name], capsize=3)
            ax.annotate(name, (hours, acc), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_title(regime.label, fontsize=9)
        ax.set_xlabel("core-hours a run (log)")
        ax.set_ylabel("student test accuracy (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=RESULTS.parent / "regimes")
    parser.add_argument(
        "--matched-epochs",
        metavar="CONFIG",
        help=f"print the epochs for which CONFIG costs a {MATCHED_REFERENCE} run of "
        "--regime and exit",
    )
    parser.add_argument(
        "--regime",
        nargs="+",
        default=["cifar100", "cifar100_cost"],
        help="results folders (one budget) whose runs give --matched-epochs its costs",
    )
    args = parser.parse_args()
    if args.matched_epochs:
        folders = [load(args.results / f) for f in args.regime]
        print(matched_epochs(folders, args.matched_epochs))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    panels = [
        (regime, load(args.results / regime.folder))
        for regime in REGIMES
        if (args.results / regime.folder).is_dir()
    ]
    sections = ["# Regimes: own rate, cost\n"]
    for regime, runs in panels:
        sections += [own_rate_table(regime, runs), "", regime_table(regime, runs), ""]
        if regime.folder in ("cifar100", "cifar10"):
            logit = own_rate_table(regime, runs, LOGIT_METHODS, also_against="logits")
            sections += ["Logit methods (issue 29)", "", logit, ""]
    if (args.results / MATCHED.folder).is_dir():
        matched = load(args.results / MATCHED.folder)
        sections += [matched_table(matched, load(args.results / "cifar100")), ""]
    (args.out / "tables.md").write_text("\n".join(sections))
    plot([(r, runs) for r, runs in panels if runs], args.out / "cost.png")
    log.info("wrote %s and %s", args.out / "tables.md", args.out / "cost.png")


if __name__ == "__main__":
    main()
