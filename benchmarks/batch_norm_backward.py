"""Batch norm's double backward against its backward, in one process.

Training-mode batch norm ``y = F.batch_norm(x, None, None, w, b, training=True)`` at ResNet
feature shapes. Timed, interleaved round by round:

* ``backward``: ``autograd.grad(y, (x, w, b), g)``, the native backward kernel (no graph kept);
* ``double backward, closed form``: the library's, i.e. with ``y`` and its gradient built under
  ``LeanAutograd(tangents=False, double_backward=True)``, the time of
  ``autograd.grad(dx, (x, w, g), v)`` where ``dx = grad(y, x, g, create_graph=True)``;
* ``double backward, PyTorch``: the same without the mode (PyTorch's composite
  ``batchnorm_double_backward``).

The table gives medians and each double backward as a ratio to the backward, plus the aten ops
each runs (CPU profiler, top-level ``aten::*`` events as in ``step_cost.py``)::

    python benchmarks/batch_norm_backward.py --threads 2 \\
        --out benchmarks/results/batch_norm_backward_cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import count_aten_ops  # the same op definition as the step table

from lightning_layerkd._autograd.mode import LeanAutograd

SHAPES = {"64x32x32": (64, 32, 32), "128x16x16": (128, 16, 16), "256x8x8": (256, 8, 8)}


def _double_backward(lean: bool, x: Tensor, w: Tensor, b: Tensor, g: Tensor, v: Tensor):  # type: ignore[no-untyped-def]
    """A closure timing only the double backward (the graph is built outside it)."""
    mode: AbstractContextManager = (
        LeanAutograd(tangents=False, double_backward=True) if lean else nullcontext()
    )
    with mode:
        y = F.batch_norm(x, None, None, w, b, training=True)
    (dx,) = torch.autograd.grad(y, x, g, create_graph=True)

    def run() -> None:
        torch.autograd.grad(dx, (x, w, g), v, retain_graph=True)

    return run


def build(batch: int, shape: tuple[int, int, int]) -> dict[str, Callable[[], None]]:
    gen = torch.Generator().manual_seed(0)
    channels, height, width = shape
    x = torch.randn(batch, channels, height, width, generator=gen).requires_grad_()
    w = torch.rand(channels, generator=gen).add(0.5).requires_grad_()
    b = torch.randn(channels, generator=gen).requires_grad_()
    g = torch.randn_like(x).requires_grad_()
    v = torch.randn_like(x)
    y = F.batch_norm(x, None, None, w, b, training=True)

    def backward() -> None:
        torch.autograd.grad(y, (x, w, b), g.detach(), retain_graph=True)

    return {
        "backward": backward,
        "double backward, closed form": _double_backward(True, x, w, b, g, v),
        "double backward, PyTorch": _double_backward(False, x, w, b, g, v),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/batch_norm_backward_cpu")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = []
    for label, shape in SHAPES.items():
        runs = build(args.batch, shape)
        for fn in runs.values():
            for _ in range(args.warmup):
                fn()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["backward"])
        for name, fn in runs.items():
            median = statistics.median(times[name])
            rows.append(
                {
                    "shape": f"{args.batch}x{label}",
                    "pass": name,
                    "median_ms": 1e3 * median,
                    "x_backward": median / base,
                    "aten_ops": count_aten_ops(fn, torch.device("cpu"))["top"],
                }
            )
    lines = [
        f"# Batch norm: double backward against backward (torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), CPU)",
        "",
        f"- command: `python benchmarks/batch_norm_backward.py {' '.join(sys.argv[1:])}`",
        f"- {args.repeats} interleaved rounds after {args.warmup} warm-up runs; medians",
        "",
        "| input (N x C x H x W) | pass | median ms | x backward | aten ops |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['pass']} | {r['median_ms']:.2f} | {r['x_backward']:.2f} "
            f"| {r['aten_ops']} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
