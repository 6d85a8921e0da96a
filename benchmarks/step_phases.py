"""Where the time of one derivative-map training step goes, in units of plain passes.

For one (pair, batch size), in one process, interleaved round by round like ``step_cost.py``:

* ``teacher forward``: the teacher under ``torch.no_grad()``, as in the floor;
* ``student forward`` and ``student forward+backward``: the student alone, cross-entropy;
* ``teacher maps``: ``compute_maps`` on the teacher exactly as ``DistillationModule`` calls it
  (logits and all four layers' maps, no graph kept);
* ``full step``: ``training_step``, ``zero_grad``, ``backward``, ``step`` (as in ``step_cost.py``).

``student part = full step - teacher maps`` is then the student's map pass, the JSD and the
backward through both (a double backward). The table divides each phase by the pass it should be
compared with, which shows how far the step is from the floor and which part is inherent.

Jacobian matching (``jacobian_matching`` and its ``/output``, ``/layerN`` rows): ``teacher maps``
are the teacher's input Jacobians (one forward, ``1 + L`` input-gradient backward passes, no
graph), and one more phase, ``student Jacobians``, is the student's forward with its ``1 + L``
backward passes that keep their graph; ``full step - teacher - student Jacobians`` is then the
backward through them (the double backward) and through the forward. Its algorithmic floor with
exact gradients, in convolution passes (a forward, an input-gradient and a weight-gradient pass
of a layer cost about the same): ``(1 + D_T) T + (3 + 3 D_S) S``, where ``D`` sums, over the
``1 + L`` differentiated scalars, the fraction of the network's convolution work that lies
before it (1 for the output; measured by counting multiply-adds of the convolutions that run
before each hooked layer's output)::

    python benchmarks/step_phases.py --pair paper --batch-size 32 --threads 2 \\
        --out benchmarks/results/step_phases_cpu
    python benchmarks/step_phases.py --pair paper --batch-size 32 --threads 1 \\
        --configs jacobian_matching,jacobian_matching/output \\
        --out benchmarks/results/step_phases_jacobian_matching
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
    NUM_CLASSES,
    PAIRS,
    build_step,
    machine_info,
    make_batch,
    make_networks,
)

from lightning_layerkd.functional.derivatives import compute_maps
from lightning_layerkd.functional.jacobian_matching import layer_jacobians
from lightning_layerkd.layers.hooks import FeatureHooks
from lightning_layerkd.methods import method_class
from lightning_layerkd.module import DistillationModule

DERIVATIVE_CONFIGS = [
    c for c in CONFIGS.values() if c.method in ("jacobian", "hessian", "jacobian_matching")
]


def depth_fractions(model: torch.nn.Module, x: torch.Tensor, paths: list[str]) -> list[float]:
    """Per hooked layer: the fraction of ``model``'s convolution multiply-adds that run before
    the layer's output (its input-gradient backward passes through that much of the network)."""
    macs: list[float] = []
    done: dict[str, float] = {}

    def count(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        w = module.weight  # type: ignore[union-attr]
        macs.append(output.numel() / output.shape[0] * w[0].numel())

    def mark(path: str) -> Callable[..., None]:
        def hook(*_: object) -> None:  # returns None: the output stays as it is
            done.setdefault(path, sum(macs))

        return hook

    handles = [
        m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d)
    ]
    handles += [model.get_submodule(p).register_forward_hook(mark(p)) for p in paths]
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    return [done[p] / sum(macs) for p in paths]


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
    depths: dict[str, tuple[float, float]] = {}
    for name in configs:
        config = CONFIGS[name]
        options = {"wrt": config.wrt} if config.wrt is not None else {}
        method = method_class(config.method)(**options, **dict(config.options))
        module = DistillationModule(
            teacher, student, method=method, layers=config.layers, num_classes=NUM_CLASSES
        )
        module.resolve_layers(x)
        hooks = module._teacher_hooks  # the module's own hooks on the teacher
        assert hooks is not None
        if config.method == "jacobian_matching":
            s_hooks = module._student_hooks
            assert s_hooks is not None
            t_result = layer_jacobians(teacher, x, hooks, y)
            timers[f"{name}: teacher maps"] = lambda h=hooks: layer_jacobians(teacher, x, h, y)
            timers[f"{name}: student Jacobians"] = lambda h=s_hooks, t=t_result: _student_jacobians(
                student, x, h, y, t
            )
            paths = [p for p, _ in config.layers]
            depths[name] = (
                1 + sum(depth_fractions(teacher, x, paths)),
                1 + sum(depth_fractions(student, x, paths)),
            )
        else:
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
    ms = {k: 1e3 * statistics.median(v) for k, v in seconds.items()}
    for name, (d_teacher, d_student) in depths.items():
        ms[f"{name}: D_T"], ms[f"{name}: D_S"] = d_teacher, d_student
    return ms


def _student_jacobians(
    student: torch.nn.Module,
    x: torch.Tensor,
    hooks: FeatureHooks,
    y: torch.Tensor,
    teacher: object,
) -> object:
    """The student's forward and its ``1 + L`` backward passes that keep their graph."""
    return layer_jacobians(student, x, hooks, y, teacher, create_graph=True)  # type: ignore[arg-type]


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
        if f"{name}: D_T" in ms:
            d_t, d_s = ms[f"{name}: D_T"], ms[f"{name}: D_S"]
            first = ms[f"{name}: student Jacobians"]
            floor_ms = (1 + d_t) * t_fwd + (3 + 3 * d_s) * s_fwd
            lines += [
                f"| {name}: teacher Jacobians (D_T = {d_t:.2f}) | {t_maps:.1f} | "
                f"{t_maps / t_fwd:.2f} T (floor {1 + d_t:.2f} T) |",
                f"| {name}: student forward + Jacobians, graph kept (D_S = {d_s:.2f}) | "
                f"{first:.1f} | {first / s_fwd:.2f} S (floor {1 + d_s:.2f} S) |",
                f"| {name}: double backward + backward of the forward + optimizer | "
                f"{student_part - first:.1f} | {(student_part - first) / s_fwd:.2f} S "
                f"(floor {2 + 2 * d_s:.2f} S) |",
                f"| {name}: full step | {full:.1f} | {full / floor:.2f} x floor step; "
                f"algorithmic floor {floor_ms:.0f} ms = {floor_ms / floor:.2f} x floor step |",
            ]
            continue
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
