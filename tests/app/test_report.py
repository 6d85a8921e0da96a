"""``layerkd-report``'s figure compares methods: one panel per dataset on a shared accuracy
axis, a line per (method, schedule), whole-number epoch ticks, the student alone as a
reference line. Read from the matplotlib objects, not from pixels."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import pytest

from lightning_layerkd.app.report import curves_figure, plot_curves


def _run(dataset: str, method: str, schedule: str, accs: list[float]) -> dict[str, Any]:
    history = [{"epoch": e, "val/acc": a} for e, a in enumerate(accs)]
    return {
        "dataset": dataset,
        "method": method,
        "schedule": schedule,
        "student": {"history": history},
    }


RUNS = [
    _run("cifar10", "attention", "layerwise", [0.50, 0.60, 0.70]),
    _run("cifar10", "attention", "layerwise", [0.52, 0.64, 0.72]),  # a second seed
    _run("cifar10", "attention", "multistep", [0.40, 0.55, 0.65]),
    _run("cifar10", "jacobian", "layerwise", [0.30, 0.45, 0.60]),
    _run("cifar10", "none", "multistep", [0.20, 0.35, 0.50]),
    _run("digits", "attention", "layerwise", [0.80, 0.90, 0.95]),
    _run("digits", "jacobian", "layerwise", [0.85, 0.92, 0.97]),
]


@pytest.fixture()
def figure():
    fig = curves_figure(RUNS)
    yield fig
    plt.close(fig)


def _lines(ax) -> dict[str, Any]:
    return {line.get_label(): line for line in ax.get_lines()}


def test_one_panel_per_dataset_one_line_per_method_and_schedule(figure) -> None:
    axes = figure.get_axes()
    assert [ax.get_title() for ax in axes] == ["cifar10", "digits"]
    assert sorted(_lines(axes[0])) == [
        "attention, Constant Update (n=1)",
        "attention, Layerwise Update (n=2)",
        "jacobian, Layerwise Update (n=1)",
        "student alone (n=1)",
    ]
    assert sorted(_lines(axes[1])) == [
        "attention, Layerwise Update (n=1)",
        "jacobian, Layerwise Update (n=1)",
    ]


def test_a_line_is_the_mean_over_seeds_in_percent_by_epoch_from_one(figure) -> None:
    line = _lines(figure.get_axes()[0])["attention, Layerwise Update (n=2)"]
    assert list(line.get_xdata()) == [1, 2, 3]
    assert list(line.get_ydata()) == pytest.approx([51.0, 62.0, 71.0], abs=1e-12)


def test_methods_share_one_axis_and_keep_their_colour_across_panels(figure) -> None:
    cifar, digits = figure.get_axes()
    assert cifar.get_ylim() == digits.get_ylim()
    low, high = cifar.get_ylim()
    assert low <= 20.0 and high >= 97.0  # both panels' data inside the one range
    for method in ("attention", "jacobian"):
        label = f"{method}, Layerwise Update"
        left = next(v for k, v in _lines(cifar).items() if k.startswith(label))
        right = next(v for k, v in _lines(digits).items() if k.startswith(label))
        assert left.get_color() == right.get_color()
    attention = _lines(cifar)
    layerwise = attention["attention, Layerwise Update (n=2)"]
    constant = attention["attention, Constant Update (n=1)"]
    assert layerwise.get_color() == constant.get_color()  # one method, one colour
    assert layerwise.get_linestyle() != constant.get_linestyle()  # the schedule tells apart


def test_epoch_ticks_are_whole_numbers(figure) -> None:
    for ax in figure.get_axes():
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_the_student_alone_is_a_black_dashed_reference(figure) -> None:
    line = _lines(figure.get_axes()[0])["student alone (n=1)"]
    assert line.get_color() == "black" and line.get_linestyle() == "--"
    assert list(line.get_ydata()) == pytest.approx([20.0, 35.0, 50.0], abs=1e-12)
    assert not any("student alone" in k for k in _lines(figure.get_axes()[1]))


def test_plot_curves_writes_a_png(tmp_path) -> None:
    path = plot_curves(RUNS, tmp_path / "curves.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
