"""Readable teacher-vs-student map figures, rendered off-screen (matplotlib's Agg canvas).

Per-sample maps (attention and ``wrt="activation"`` derivative maps) become one figure per
layer: a row per sample, teacher | student side by side, upscaled with nearest interpolation,
one colour scale shared by the two maps of a row and its colour bar. Weight maps (one energy
per output channel and batch) become a wide bar chart of teacher vs student energies in the
order they are compared. Figures are returned as ``uint8`` RGB arrays with full 0-255 contrast.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: Colour map of the per-sample maps; perceptually uniform and readable in grey.
CMAP = "viridis"
#: Colours of the two networks in weight-map charts.
TEACHER_COLOUR, STUDENT_COLOUR = "#1f77b4", "#ff7f0e"


def grid_shape(k: int, aspect: float = 1.0) -> tuple[int, int]:
    """The ``(h, w)`` with ``h * w == k`` whose ratio ``h / w`` is closest to ``aspect`` (the
    input's height over width): the grid of a flattened map when its shape is not known."""
    if k < 1:
        raise ValueError(f"a map needs at least one entry, got {k}")
    pairs = [(h, k // h) for h in range(1, int(k**0.5) + 1) if k % h == 0]
    pairs += [(w, h) for h, w in pairs]
    # ties (a prime k on a square input): the wide strip, read like a line of text
    return min(pairs, key=lambda hw: (round(abs(np.log(hw[0] / hw[1] / aspect)), 9), hw[0]))


def _limits(*maps: np.ndarray) -> tuple[float, float]:
    """A shared colour range over ``maps``: finite values only, widened when constant."""
    values = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 1e-12 * max(abs(lo), abs(hi), 1.0):
        pad = 0.5 * max(abs(lo), 1e-12)
        return lo - pad, hi + pad
    return lo, hi


def sample_maps_figure(
    teacher: np.ndarray,
    student: np.ndarray,
    *,
    title: str,
    row_labels: Sequence[str] | None = None,
    colorbar_label: str = "",
    panel_px: int = 192,
    dpi: int = 100,
) -> Figure:
    """Rows = samples, columns = teacher | student, of ``(N, H, W)`` maps; each row has its
    own colour scale (min and max over both maps of that sample) and colour bar."""
    if teacher.shape != student.shape or teacher.ndim != 3:
        raise ValueError(
            f"need two (N, H, W) maps of one shape, got {teacher.shape} and {student.shape}"
        )
    n, h, w = teacher.shape
    width = panel_px / dpi
    height = width * min(max(h / w, 0.25), 4.0)
    size = (2 * width + 1.6, n * (height + 0.45) + 0.5)
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 2, squeeze=False)
    for i in range(n):
        vmin, vmax = _limits(teacher[i], student[i])
        for ax, role, m in (
            (axes[i, 0], "teacher", teacher[i]),
            (axes[i, 1], "student", student[i]),
        ):
            image = ax.imshow(m, cmap=CMAP, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title(role, fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i, 0].set_ylabel(row_labels[i] if row_labels else f"sample {i}", fontsize=9)
        bar = fig.colorbar(image, ax=axes[i, :].tolist(), fraction=0.05, pad=0.02)
        bar.ax.tick_params(labelsize=8)
        if colorbar_label:
            bar.set_label(colorbar_label, fontsize=8)
    fig.suptitle(title, fontsize=11)
    return fig


def weight_maps_figure(
    teacher: np.ndarray,
    student: np.ndarray,
    *,
    title: str,
    xlabel: str = "output channel",
    ylabel: str = "",
    max_bars: int = 64,
    max_points: int = 1024,
    dpi: int = 100,
) -> Figure:
    """Teacher vs student energies ``(K,)`` entry by entry, in the order they are compared:
    grouped bars up to ``max_bars`` entries, step lines beyond (averaged into at most
    ``max_points`` bins)."""
    t, s = np.asarray(teacher, dtype=np.float64).ravel(), np.asarray(student, dtype=np.float64)
    s = s.ravel()
    if t.shape != s.shape or t.size == 0:
        raise ValueError(f"need two non-empty maps of one size, got {t.shape} and {s.shape}")
    fig = Figure(figsize=(9.0, 3.2), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if t.size <= max_bars:
        index = np.arange(t.size)
        ax.bar(index - 0.2, t, width=0.4, color=TEACHER_COLOUR, label="teacher")
        ax.bar(index + 0.2, s, width=0.4, color=STUDENT_COLOUR, label="student")
    else:
        per_bin = -(-t.size // max_points)
        t, s = _bin_means(t, per_bin), _bin_means(s, per_bin)
        index = np.arange(t.size) * per_bin
        ax.step(index, t, where="post", color=TEACHER_COLOUR, label="teacher")
        ax.step(index, s, where="post", color=STUDENT_COLOUR, label="student")
        if per_bin > 1:
            xlabel = f"{xlabel} (mean of {per_bin} per point)"
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=11)
    return fig


def _bin_means(values: np.ndarray, per_bin: int) -> np.ndarray:
    """Means of consecutive runs of ``per_bin`` values (the last run may be shorter)."""
    starts = np.arange(0, values.size, per_bin)
    return np.add.reduceat(values, starts) / np.diff(np.append(starts, values.size))


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """Draw ``fig`` off-screen: an ``(H, W, 3)`` ``uint8`` array."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
