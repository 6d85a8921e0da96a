"""Where the time of one derivative-map training step goes, in units of plain passes.

For one (pair, batch size), in one process, interleaved round by round like ``step_cost.py``:

* ``teacher forward``: the teacher under ``torch.no_grad()``, as in the floor;
* ``student forward`` and ``student forward+backward``: the student alone, cross-entropy;
* ``teacher maps``: ``compute_maps`` on the teacher exactly as ``DistillationModule`` calls it
  (logits and all four layers' maps, no graph kept);
* ``full step``: ``training_step``, ``zero_grad``, ``backward``, ``step`` (as in ``step_cost.py``).

``student part = full step - teacher maps`` is then the student's map pass, the JSD and the
backward through both (a double backward). The table divides each phase by the pass it should be
compared with, which shows how far the step is from the floor and which part is inherent::

    python benchmarks/step_phases.py --pair paper --batch-size 32 --threads 2 \\
        --out benchmarks/results/step_phases_cpu
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import (
    CONFIGS,
    LAYERS,
    NUM_CLASSES,
    PAIRS,
    build_step,
    machine_info,
    make_batch,
    make_networks,
)

from lightning_layerkd.functional.derivatives import compute_maps
from lightning_layerkd.methods import method_class
from lightning_layerkd.module import DistillationModule

DERIVATIVE_CONFIGS = [c for c in CONFIGS.values() if c.method in ("jacobian", "hessian")]


def phases(pair: str, batch_size: int, configs: list[str], args: argparse.Namespace) -> dict:
    device = torch.device("cpu")
    teacher, student = make_networks(pair, device, args.seed)
    x, y = make_batch(batch_size, device, args.seed)
    timers: dict[str, Callable[[], object]] = {}

    def student_forward_backward() -> None:
        student.zero_grad()
        F.cross_entropy(student(x), y).backward()

    timers["teacher forward"] = lambda: _no_grad(teacher, x)
    timers["student forward"] = lambda: student(x)
    timers["student forward+backward"] = student_forward_backward
    timers["floor step"] = build_step(CONFIGS["floor"], teacher, student, x, y)
    for name in configs:
        config = CONFIGS[name]
        options = {"wrt": config.wrt} if config.wrt is not None else {}
        method = method_class(config.method)(**options)
        module = DistillationModule(
            teacher, student, method=method, layers=LAYERS, num_classes=NUM_CLASSES
        )
        module.resolve_layers(x)
        hooks = module._teacher_hooks  # the module's own hooks on the teacher
        assert hooks is not None
        timers[f"{name}: teacher maps"] = lambda m=config.method, w=config.wrt, h=hooks: (
            compute_maps(teacher, x, h, method=m, wrt=w, target=y)  # type: ignore[arg-type]
        )
        timers[f"{name}: full step"] = build_step(config, teacher, student, x, y)
    for fn in timers.values():
        for _ in range(args.warmup):
            fn()
    seconds: dict[str, list[float]] = {k: [] for k in timers}
    names = list(timers)
    for r in range(args.repeats):
        gc.collect()
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            timers[name]()
            seconds[name].append(time.perf_counter() - start)
        print(f"  round {r + 1}/{args.repeats}", file=sys.stderr)
    return {k: 1e3 * statistics.median(v) for k, v in seconds.items()}


def _no_grad(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def markdown(ms: dict[str, float], configs: list[str], header: str) -> str:
    t_fwd, s_fwd = ms["teacher forward"], ms["student forward"]
    s_fb, floor = ms["student forward+backward"], ms["floor step"]
    lines = [
        header,
        "",
        "| phase | median ms | in units of |",
        "| --- | ---: | --- |",
        f"| teacher forward (no grad), T | {t_fwd:.1f} | |",
        f"| student forward, S | {s_fwd:.1f} | |",
        f"| student forward+backward | {s_fb:.1f} | {s_fb / s_fwd:.2f} S |",
        f"| floor step (student step + teacher forward) | {floor:.1f} | |",
    ]
    for name in configs:
        full, t_maps = ms[f"{name}: full step"], ms[f"{name}: teacher maps"]
        student_part = full - t_maps
        lines += [
            f"| {name}: teacher maps | {t_maps:.1f} | {t_maps / t_fwd:.2f} T |",
            f"| {name}: student part (full - teacher maps) | {student_part:.1f} | "
            f"{student_part / s_fwd:.2f} S; {student_part / s_fb:.2f} x student fwd+bwd |",
            f"| {name}: full step | {full:.1f} | {full / floor:.2f} x floor |",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=list(PAIRS), default="paper")
    parser.add_argument("--batch-size", type=int, default=32)
    names = [c.name for c in DERIVATIVE_CONFIGS]
    parser.add_argument("--configs", default="jacobian-weight,hessian-weight")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/step_phases")
    args = parser.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in names]
    if unknown or not configs:
        parser.error(f"--configs {args.configs!r}: choose from {names}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = machine_info(torch.device("cpu"))
    ms = phases(args.pair, args.batch_size, configs, args)
    header = (
        f"# Step phases: {args.pair} pair, batch {args.batch_size}\n\n"
        f"{info['cpu_model']}; torch {info['torch']}; {info['torch_threads']} thread(s); "
        f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up"
    )
    text = markdown(ms, configs, header)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(
        json.dumps({"machine": info, "settings": vars(args), "median_ms": ms}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
