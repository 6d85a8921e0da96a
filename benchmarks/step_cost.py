"""Per-training-step cost of each distillation method, measured in one process.

Every configuration runs the same training step on the same batch::

    loss = module.training_step((x, y), 0)["loss"]
    optimizer.zero_grad(); loss.backward(); optimizer.step()

with the optimizer from ``module.configure_optimizers()`` (SGD, momentum 0.9, weight decay
5e-4, the library's default) and the student in train mode. Configurations:

* ``student``: ``DistillationModule(None, student, method="none")``, cross-entropy alone;
* ``floor``: the ``student`` step plus one teacher forward under ``torch.no_grad()``, the cost
  no distillation method can go below;
* ``attention``, ``jacobian-weight``, ``jacobian-activation``, ``hessian-weight``,
  ``hessian-activation``: ``DistillationModule`` with that ``method`` and ``wrt`` on the four
  crucial pairs ``layer1``..``layer4``;
* ``jacobian_matching``, ``information_flow``, ``fitnet``, ``attention_transfer``, ``crd``
  (a bank of 10,000 rows), ``review_kd``: those methods with their default options on the same
  four pairs (a configuration that this version of ``DistillationModule`` rejects is listed as
  skipped with the error it raised);
* ``jacobian_matching/output`` (eq. 10 on the output alone, no crucial layers) and
  ``jacobian_matching/layer1`` .. ``layer4`` (the output plus that one layer): the terms of
  Jacobian matching, each with its own step cost;
* ``logits``, ``dkd``, ``dist``, ``dkd+ls``: the logit methods (Hinton's KD, decoupled KD,
  DIST, DKD with logit standardization) at their defaults, no crucial layers.

``--precision bf16`` runs the forward part of every step (the teacher forward and
``training_step``) under ``torch.autocast(dtype=torch.bfloat16)``, the backward and the optimizer
step outside it (what Lightning's ``precision="bf16-mixed"`` does).

Timing: all configurations of one (pair, batch size) are built in this process, each with its
own copy of the same initial networks; after ``--warmup`` steps each, ``--repeats`` rounds run
one step of every configuration (the order rotates each round), so a change in machine load
hits every configuration alike. Each step is timed with ``time.perf_counter`` (after
``torch.cuda.synchronize`` on CUDA); the table gives the median and the interquartile range.
On a machine that others load, ``--clock cpu`` times each step by the process's CPU time
(``time.process_time``, core-seconds; with ``--threads 1`` a step's work on one core), which
other processes do not inflate the way they inflate wall time.

Aten ops per step (``--ops profile``, the default; ``--ops none`` skips it): after the warm-up,
``--ops-steps`` further steps of every configuration run one at a time under
``torch.profiler.profile(activities=[ProfilerActivity.CPU])`` (CPU op events only, whatever the
device). An *op* is a profiler event whose name starts with ``aten::`` and that has no ``aten::``
event among its ancestors on the CPU op stack (``FunctionEvent.cpu_parent`` chain): the ops the
dispatcher is called for from Python, autograd's backward nodes and the optimizer, not the ops
they decompose into (``aten::conv2d`` counts once, its inner ``aten::convolution`` /
``aten::_convolution`` / ``aten::mkldnn_convolution`` do not). This is the closest CPU-side proxy
of the kernels a step launches; it also counts ops that launch no kernel (views such as
``aten::t``, ``aten::view``, ``aten::detach``), and a composite op that launches several kernels
counts once. The JSON also keeps the count of all ``aten::`` events (nested ones included). The
table's ``aten ops`` is the median over the profiled steps, ``ops x floor`` its ratio to the
``floor`` configuration of the same (pair, batch size).

Memory (``--memory subprocess``, the default): each configuration runs again in a fresh
subprocess (``--one CONFIG``, hidden flag) for 3 steps. On CPU the figure is the growth of the
process's resident set: the kernel's peak mark ``VmHWM`` is reset to the current RSS through
``/proc/self/clear_refs`` just before the first step, and the table shows peak minus that RSS,
i.e. the step's transient working set plus the optimizer state (where the reset is impossible,
the growth of ``ru_maxrss``, coarser). It is a coarse figure (page granularity; memory the
allocator already holds is not counted), not an allocation trace. On CUDA it is
``torch.cuda.max_memory_allocated`` minus the memory allocated before the first step.

Reference comparison (``--reference-pair``, default ``narrow``; ``--reference-batch``, default
32): the map computation of one network (the pair's teacher, batch norm in eval mode, as the
teacher is in training; maps of all four conversion convolutions, no graph kept) by the
library's batched ``compute_maps`` against a straightforward per-sample loop: one forward and one
``torch.autograd.grad`` per sample for the Jacobian, plus a double backward per sample for a
one-probe Hutchinson estimate of the Hessian diagonal.

Examples::

    python benchmarks/step_cost.py --pairs w8 --batch-sizes 4 --memory none \\
        --reference-pair none --configs floor,attention,jacobian-weight,hessian-weight
    python benchmarks/step_cost.py --pairs narrow --batch-sizes 32 --repeats 5 --warmup 2 \\
        --threads 1
    python benchmarks/step_cost.py --pairs paper,narrow --batch-sizes 32,128 --repeats 10
    python benchmarks/step_cost.py --device cuda --repeats 50 --warmup 10
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_layerkd.functional.derivatives import compute_maps
from lightning_layerkd.layers.hooks import FeatureHooks
from lightning_layerkd.layers.specs import conversion_conv
from lightning_layerkd.methods import method_class
from lightning_layerkd.models import resnet
from lightning_layerkd.module import DistillationModule

#: name -> (teacher depth, student depth, teacher width, student width)
PAIRS: dict[str, tuple[int, int, int, int]] = {
    "paper": (18, 10, 64, 64),  # Kokane et al.: ResNet-18 -> ResNet-10 on CIFAR
    "narrow": (18, 10, 16, 8),  # a CPU-sized pair
    "w8": (18, 10, 8, 8),  # the GPU-speed issue's op-count pair (with batch 4)
}
NUM_CLASSES = 10
IMAGE_SIZE = 32
LAYERS = [(f"layer{i}", f"layer{i}") for i in range(1, 5)]


@dataclass(frozen=True)
class Config:
    """One row of the table: how the training step is built."""

    name: str
    method: str  # DistillationModule's method ("none" for student and floor)
    wrt: str | None = None  # derivative maps: "weight" or "activation"
    floor: bool = False  # add a teacher forward under no_grad
    options: tuple[tuple[str, Any], ...] = ()  # further method options
    #: the crucial pairs by stage number (1 -> ``layer1``); ``None``: all four (``LAYERS``)
    stages: tuple[int, ...] | None = None

    @property
    def layers(self) -> list[tuple[str, str]]:
        return LAYERS if self.stages is None else [LAYERS[i - 1] for i in self.stages]


CONFIGS: dict[str, Config] = {
    c.name: c
    for c in (
        Config("student", "none"),
        Config("floor", "none", floor=True),
        Config("attention", "attention"),
        Config("jacobian-weight", "jacobian", "weight"),
        Config("jacobian-activation", "jacobian", "activation"),
        Config("hessian-weight", "hessian", "weight"),
        Config("hessian-activation", "hessian", "activation"),
        Config("jacobian_matching", "jacobian_matching"),
        # Jacobian matching's terms (issue 28): eq. 10 on the output alone, the output plus one
        # crucial layer's attention pixel, and (``jacobian_matching``) the output plus all four
        Config("jacobian_matching/output", "jacobian_matching", stages=()),
        *(
            Config(f"jacobian_matching/layer{i}", "jacobian_matching", stages=(i,))
            for i in range(1, 5)
        ),
        Config("information_flow", "information_flow"),
        Config("fitnet", "fitnet"),
        Config("attention_transfer", "attention_transfer"),
        Config("crd", "crd"),
        Config("review_kd", "review_kd"),
        Config("logits", "logits"),
        Config("dkd", "dkd"),
        Config("dist", "dist"),
        Config("dkd+ls", "dkd", options=(("standardize", True),)),
    )
}
#: CRD's memory bank: one row per training sample (the strong-teacher benchmark's CIFAR-100)
CRD_SAMPLES = 10_000

#: the issue's targets: CPU, paper pair, batch 32, wrt=weight; config -> max ratio to floor
TARGETS = {"attention": 1.05, "jacobian-weight": 2.0, "hessian-weight": 3.0}
TARGET_CELL = ("cpu", "paper", 32)
#: the GPU-speed issue's targets for aten ops per step, ratio to floor, on this (pair, batch)
OPS_TARGETS = {
    "attention": 1.5,
    "jacobian-weight": 3.0,
    "jacobian-activation": 3.0,
    "hessian-weight": 5.0,
    "hessian-activation": 5.0,
}
OPS_TARGET_CELL = ("w8", 4)
#: the issue's ratios before this measurement ("today"), for the report
OPS_ISSUE_RATIOS = {"attention": 1.90, "jacobian": 3.97, "hessian": 7.51}


class Skipped(Exception):
    """The configuration cannot be built with this version of the library."""


# ---------------------------------------------------------------------------------- building
def make_networks(pair: str, device: torch.device, seed: int) -> tuple[nn.Module, nn.Module]:
    """The pair's teacher (eval mode, frozen) and student, with seeded initial weights."""
    t_depth, s_depth, t_width, s_width = PAIRS[pair]
    torch.manual_seed(seed)
    teacher = resnet(t_depth, NUM_CLASSES, t_width).to(device).eval()
    teacher.requires_grad_(False)
    student = resnet(s_depth, NUM_CLASSES, s_width).to(device)
    return teacher, student


def make_batch(batch_size: int, device: torch.device, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)
    return x.to(device), y.to(device)


def build_step(
    config: Config,
    teacher: nn.Module,
    student: nn.Module,
    x: Tensor,
    y: Tensor,
    precision: str = "32",
) -> Callable[[], None]:
    """A closure that runs one training step of ``config`` on its own copies of the networks.

    ``precision="bf16"`` runs the forward part (the teacher forward and ``training_step``) under
    ``torch.autocast(dtype=torch.bfloat16)`` and the backward and optimizer step outside it, as
    Lightning's ``precision="bf16-mixed"`` does.

    Raises:
        Skipped: if ``DistillationModule`` rejects the method (not implemented yet).
    """
    teacher = copy.deepcopy(teacher)
    student = copy.deepcopy(student)
    if config.method == "none":
        module = DistillationModule(None, student, method="none", num_classes=NUM_CLASSES)
    else:
        kwargs: dict[str, Any] = {"layers": config.layers, "num_classes": NUM_CLASSES}
        try:  # may be a method this version lacks
            options: dict[str, Any] = {"wrt": config.wrt} if config.wrt is not None else {}
            if method_class(config.method).needs_sample_indices:
                options["num_samples"] = CRD_SAMPLES
            kwargs["method"] = method_class(config.method)(**options, **dict(config.options))
            if not kwargs["method"].uses_layers:  # the logit methods: no crucial layers
                kwargs["layers"] = []
            module = DistillationModule(teacher, student, **kwargs)
        except ValueError as err:
            raise Skipped(f"DistillationModule(method={config.method!r}): {err}") from err
        module.resolve_layers(x)  # installs the hooks outside the timed region
    module.train()
    optimizers = module.configure_optimizers()
    optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
    floor_teacher = teacher if config.floor else None
    # sample indices for a method with a bank of the training set (CRD), else none
    batch = (
        (x, y, torch.arange(len(x), device=x.device))
        if module.method.needs_sample_indices
        else (x, y)
    )
    bf16 = precision == "bf16"

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            if floor_teacher is not None:
                with torch.no_grad():
                    floor_teacher(x)
            loss = module.training_step(batch, 0)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


# ---------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: ``--clock``: wall time, or this process's CPU time (core-seconds: on a shared machine, what a
#: step costs whatever else competes for the cores; CPU only)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn: Callable[[], Any], device: torch.device, clock: str = "wall") -> float:
    """Seconds taken by ``fn()``, device work included, on ``clock``."""
    now = CLOCKS[clock]
    synchronize(device)
    start = now()
    fn()
    synchronize(device)
    return now() - start


def _has_aten_ancestor(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def count_aten_ops(fn: Callable[[], Any], device: torch.device) -> dict[str, int]:
    """Aten ops of one call of ``fn``, by the CPU profiler (see the module docstring).

    Returns ``{"top": ops with no aten:: ancestor, "all": every aten:: event}``.
    """
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
        synchronize(device)
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    return {"top": sum(not _has_aten_ancestor(e) for e in aten), "all": len(aten)}


def summarise(seconds: list[float]) -> dict[str, Any]:
    ms = [1e3 * s for s in seconds]
    q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0], ms[0], ms[0]]
    return {
        "times_ms": ms,
        "median_ms": statistics.median(ms),
        "p25_ms": q[0],
        "p75_ms": q[2],
        "min_ms": min(ms),
    }


def time_cell(
    pair: str, batch_size: int, configs: list[str], args: argparse.Namespace
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Time (and count the aten ops of) every configuration of one (pair, batch size)."""
    device = torch.device(args.device)
    teacher, student = make_networks(pair, device, args.seed)
    x, y = make_batch(batch_size, device, args.seed)
    steps: dict[str, Callable[[], None]] = {}
    skipped: dict[str, str] = {}
    for name in configs:
        try:
            steps[name] = build_step(CONFIGS[name], teacher, student, x, y, args.precision)
        except Skipped as err:
            skipped[name] = str(err).splitlines()[0]
    for step in steps.values():
        for _ in range(args.warmup):
            step()
        synchronize(device)
    names = list(steps)
    ops: dict[str, dict[str, Any]] = {}
    if args.ops == "profile":
        for name in names:
            counts = [count_aten_ops(steps[name], device) for _ in range(args.ops_steps)]
            top, every = [c["top"] for c in counts], [c["all"] for c in counts]
            ops[name] = {
                "aten_ops": statistics.median(top),
                "aten_ops_steps": top,
                "aten_ops_all": statistics.median(every),
                "aten_ops_all_steps": every,
            }
            print(f"  {pair} b{batch_size}: {name} {top} aten ops", file=sys.stderr)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.repeats):
        gc.collect()
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(timed(steps[name], device, args.clock))
        print(f"  {pair} b{batch_size}: round {r + 1}/{args.repeats}", file=sys.stderr)
    del steps
    gc.collect()
    stats = {name: {**summarise(s), **ops.get(name, {})} for name, s in seconds.items()}
    return stats, skipped


# ---------------------------------------------------------------------------------- memory
def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux), in bytes; ``None`` elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_status_bytes("VmHWM") is not None


def peak_rss_bytes() -> int:
    """Peak resident set size: ``VmHWM`` where available, else ``ru_maxrss``."""
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """``--one CONFIG``: a few steps of one configuration; report its memory as JSON."""
    device = torch.device(args.device)
    pair, batch_size = args.pairs[0], args.batch_sizes[0]
    teacher, student = make_networks(pair, device, args.seed)
    x, y = make_batch(batch_size, device, args.seed)
    try:
        step = build_step(CONFIGS[args.one], teacher, student, x, y, args.precision)
    except Skipped as err:
        return {"skipped": str(err).splitlines()[0]}
    gc.collect()
    synchronize(device)
    # Baseline: the current RSS (imports, networks, batch) with the peak mark reset to it;
    # without /proc/self/clear_refs, the peak so far (ru_maxrss), a coarser baseline.
    reset = reset_peak_rss()
    before = _proc_status_bytes("VmRSS") if reset else None
    result: dict[str, Any] = {
        "rss_before_bytes": before if before is not None else peak_rss_bytes(),
        "rss_method": "VmRSS, VmHWM after clear_refs" if reset else "ru_maxrss",
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        result["cuda_before_bytes"] = torch.cuda.memory_allocated(device)
    for _ in range(max(1, args.warmup) + max(1, args.repeats)):
        step()
    synchronize(device)
    result["rss_peak_bytes"] = peak_rss_bytes()
    if device.type == "cuda":
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def measure_memory(
    pair: str, batch_size: int, config: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Run ``--one config`` in a fresh interpreter and parse its JSON line."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--one",
        config,
        "--pairs",
        pair,
        "--batch-sizes",
        str(batch_size),
        "--warmup",
        "1",
        "--repeats",
        "2",
        "--device",
        args.device,
        "--seed",
        str(args.seed),
        "--precision",
        args.precision,
    ]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    result = json.loads(lines[-1])
    if "skipped" in result:
        return result
    result["rss_delta_bytes"] = result["rss_peak_bytes"] - result["rss_before_bytes"]
    if "cuda_peak_bytes" in result:
        result["cuda_delta_bytes"] = result["cuda_peak_bytes"] - result["cuda_before_bytes"]
    return result


def format_memory(mem: dict[str, Any] | None) -> str:
    if not mem:
        return "-"
    if "error" in mem:
        return "error"
    if "skipped" in mem:
        return "-"
    mib = 1024**2
    if "cuda_delta_bytes" in mem:
        delta, peak = mem["cuda_delta_bytes"] / mib, mem["cuda_peak_bytes"] / mib
        return f"+{delta:.1f} MiB (peak {peak:.0f})"
    delta, peak = mem["rss_delta_bytes"] / mib, mem["rss_peak_bytes"] / mib
    return f"+{delta:.1f} MiB (RSS {peak:.0f})"


# ---------------------------------------------------------------------------------- reference
def _score(logits: Tensor, y: Tensor) -> Tensor:
    return F.log_softmax(logits.float(), dim=-1).gather(1, y.view(-1, 1)).sum()


def reference_jacobian(model: nn.Module, x: Tensor, y: Tensor, weights: list[Tensor]) -> list:
    """``G^2`` with ``G = d(sum_i s_i)/dW``, one sample at a time."""
    total = [torch.zeros_like(w) for w in weights]
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(_score(model(x[i : i + 1]), y[i : i + 1]), weights)
        for acc, g in zip(total, grads, strict=True):
            acc += g
    return [g.square() for g in total]


def reference_hessian(model: nn.Module, x: Tensor, y: Tensor, weights: list[Tensor]) -> list:
    """``|v * (H v)|`` (one Rademacher probe ``v``), ``H v`` by double backward per sample."""
    probes = [torch.randint(0, 2, w.shape, device=w.device).to(w.dtype) * 2 - 1 for w in weights]
    total = [torch.zeros_like(w) for w in weights]
    for i in range(x.shape[0]):
        s = _score(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(s, weights, create_graph=True)
        gv = torch.stack([(g * v).sum() for g, v in zip(grads, probes, strict=True)]).sum()
        hv = torch.autograd.grad(gv, weights)
        for acc, v, h in zip(total, probes, hv, strict=True):
            acc += v * h
    return [t.abs() for t in total]


def reference_comparison(args: argparse.Namespace) -> dict[str, Any]:
    """Library maps (batched) against the per-sample loops, on one network in eval mode."""
    device = torch.device(args.device)
    pair, batch_size = args.reference_pair, args.reference_batch
    model, _ = make_networks(pair, device, args.seed)  # the teacher: eval mode, frozen
    x, y = make_batch(batch_size, device, args.seed)
    convs = [conversion_conv(model.get_submodule(t), t) for _, t in LAYERS]
    weights = [conv.weight for _, conv in convs]
    hooks = FeatureHooks([c for _, c in convs], [p for p, _ in convs])

    def library(method: str) -> list[Tensor]:
        _, maps = compute_maps(model, x, hooks, method=method, wrt="weight", target=y)  # type: ignore[arg-type]
        return maps

    def reference(method: str) -> list[Tensor]:
        for w in weights:
            w.requires_grad_(True)
        try:
            fn = reference_jacobian if method == "jacobian" else reference_hessian
            return fn(model, x, y, weights)
        finally:
            for w in weights:
                w.requires_grad_(False)

    out: dict[str, Any] = {
        "pair": pair,
        "batch": batch_size,
        "network": f"teacher ResNet-{PAIRS[pair][0]} width {PAIRS[pair][2]}, eval mode",
        "layers": [p for p, _ in convs],
    }
    repeats = max(1, min(args.repeats, args.reference_repeats))
    for method in ("jacobian", "hessian"):
        for impl, fn in (("library", library), ("reference", reference)):
            for _ in range(max(1, min(args.warmup, 2))):
                fn(method)
            seconds = [timed(partial(fn, method), device) for _ in range(repeats)]
            out[f"{method}_{impl}"] = summarise(seconds)
        out[f"{method}_speedup"] = (
            out[f"{method}_reference"]["median_ms"] / out[f"{method}_library"]["median_ms"]
        )
    # Same quantity for the Jacobian: the maps must agree.
    lib, ref = library("jacobian"), reference("jacobian")
    out["jacobian_max_rel_diff"] = max(
        ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        for a, b in zip(lib, ref, strict=True)
    )
    hooks.remove()
    return out


# ---------------------------------------------------------------------------------- report
def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other processes compete for the cores)."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "load_average_start": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def target_checks(rows: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """The issue's targets, for every measured cell; ``official`` marks the one they name."""
    checks = []
    cells = sorted({(r["pair"], r["batch"]) for r in rows})
    by_key = {(r["config"], r["pair"], r["batch"]): r for r in rows}
    for pair, batch in cells:
        floor = by_key.get(("floor", pair, batch))
        if floor is None:
            continue
        for config, limit in TARGETS.items():
            row = by_key.get((config, pair, batch))
            if row is None:
                continue
            ratio = row["median_ms"] / floor["median_ms"]
            checks.append(
                {
                    "config": config,
                    "pair": pair,
                    "batch": batch,
                    "ratio_to_floor": ratio,
                    "limit": limit,
                    "holds": ratio <= limit,
                    "official": (device, pair, batch) == TARGET_CELL,
                }
            )
    return checks


def markdown(result: dict[str, Any]) -> str:
    info, settings = result["machine"], result["settings"]
    lines = [
        f"# Step cost ({result['date']})",
        "",
        f"- command: `{result['command']}`",
        "- pairs: " + "; ".join(f"{k} = {v}" for k, v in result["pairs"].items()),
        f"- device: {info['device']}"
        + (f" ({info['gpu']})" if "gpu" in info else f" ({info['cpu_model']})")
        + f"; torch {info['torch']}; {info['torch_threads']} thread(s); "
        f"{info['cpu_count']} CPUs; load average at start {info['load_average_start']}",
        f"- {settings['repeats']} timed rounds after {settings['warmup']} warm-up steps per "
        "configuration, interleaved; median and interquartile range of single steps; clock: "
        + (
            "the process's CPU time (time.process_time)"
            if settings.get("clock") == "cpu"
            else "wall time"
        ),
        f"- precision: {settings.get('precision', '32')}"
        + (
            " (forward under torch.autocast, bfloat16)"
            if settings.get("precision") == "bf16"
            else ""
        ),
        f"- memory: {result['memory_method']}",
        f"- {result['ops_definition']}",
        "",
        "| config | pair | batch | median ms | IQR ms | x student | x floor | aten ops "
        "| ops x floor | memory |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in result["rows"]:
        x_student = f"{r['ratio_to_student']:.2f}" if r.get("ratio_to_student") else "-"
        x_floor = f"{r['ratio_to_floor']:.2f}" if r.get("ratio_to_floor") else "-"
        ops = f"{r['aten_ops']:g}" if "aten_ops" in r else "-"
        ops_floor = f"{r['ops_ratio_to_floor']:.2f}" if r.get("ops_ratio_to_floor") else "-"
        lines.append(
            f"| {r['config']} | {r['pair']} | {r['batch']} | {r['median_ms']:.1f} | "
            f"{r['p25_ms']:.1f}-{r['p75_ms']:.1f} | {x_student} | {x_floor} | {ops} | "
            f"{ops_floor} | {format_memory(r.get('memory'))} |"
        )
    if result["skipped"]:
        lines += ["", "Skipped:"]
        lines += [f"- `{name}`: {why}" for name, why in sorted(result["skipped"].items())]
    lines += ["", "## Targets (CPU, paper pair, batch 32, wrt=weight)", ""]
    official = [c for c in result["targets"] if c["official"]]
    if not official:
        lines.append(
            "Not measured in this run (needs `--device cpu --pairs paper --batch-sizes 32`)."
        )
    for c in result["targets"]:
        tag = "target" if c["official"] else "informative only"
        verdict = "holds" if c["holds"] else "MISSED"
        lines.append(
            f"- {c['config']} ({c['pair']}, batch {c['batch']}, {tag}): "
            f"{c['ratio_to_floor']:.2f}x floor, limit {c['limit']:.2f}x: {verdict}"
        )
    ops_rows = [
        r
        for r in result["rows"]
        if (r["pair"], r["batch"]) == OPS_TARGET_CELL
        and r["config"] in OPS_TARGETS
        and r.get("ops_ratio_to_floor")
    ]
    if ops_rows:
        pair, batch = OPS_TARGET_CELL
        lines += ["", f"## Aten-op targets (GPU-speed issue: {pair} pair, batch {batch})", ""]
        for r in ops_rows:
            limit, ratio = OPS_TARGETS[r["config"]], r["ops_ratio_to_floor"]
            before = OPS_ISSUE_RATIOS.get(r["config"].split("-")[0])
            verdict = "holds" if ratio <= limit else "MISSED"
            lines.append(
                f"- {r['config']}: {ratio:.2f}x floor ops, limit {limit:.1f}x: {verdict}"
                + (f" (issue reported {before:.2f}x)" if before else "")
            )
    ref = result.get("reference")
    if ref:
        lines += [
            "",
            f"## Maps of one network: library vs per-sample reference ({ref['network']}, "
            f"{ref['pair']} pair, batch {ref['batch']}, all four conversion convs, no graph)",
            "",
            "| map | library ms | per-sample loop ms | speed-up |",
            "| --- | ---: | ---: | ---: |",
        ]
        for method in ("jacobian", "hessian"):
            lines.append(
                f"| {method} (wrt weight) | {ref[method + '_library']['median_ms']:.1f} | "
                f"{ref[method + '_reference']['median_ms']:.1f} | "
                f"{ref[method + '_speedup']:.1f}x |"
            )
        lines += [
            "",
            f"Jacobian maps agree: max relative difference {ref['jacobian_max_rel_diff']:.1e}. "
            "The Hessian reference is the exact Hessian by double backward; the library uses the "
            "Gauss-Newton product with forward-mode AD (the same diagonal in expectation; single-"
            "probe values differ).",
        ]
    lines += ["", f"Total wall time of the benchmark: {result['wall_seconds']:.0f} s", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    def csv(kind: type, choices: Any = None) -> Callable[[str], list]:
        def parse(text: str) -> list:
            items = [kind(t) for t in text.split(",") if t]
            bad = [t for t in items if choices is not None and t not in choices]
            if bad or not items:
                raise argparse.ArgumentTypeError(f"{text!r}: choose from {sorted(choices or [])}")
            return items

        return parse

    parser.add_argument("--pairs", type=csv(str, PAIRS), default=["paper", "narrow"])
    parser.add_argument("--batch-sizes", type=csv(int), default=[32, 128])
    parser.add_argument("--configs", type=csv(str, CONFIGS), default=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="cpu: time each step by the process's CPU time (a loaded machine; CPU only)",
    )
    parser.add_argument(
        "--precision",
        choices=["32", "bf16"],
        default="32",
        help="bf16: the forward under torch.autocast(dtype=torch.bfloat16)",
    )
    parser.add_argument("--memory", choices=["subprocess", "none"], default="subprocess")
    parser.add_argument(
        "--ops",
        choices=["profile", "none"],
        default="profile",
        help="count aten ops per step with torch.profiler ('none' skips it)",
    )
    parser.add_argument("--ops-steps", type=int, default=2, help="profiled steps per config")
    parser.add_argument(
        "--reference-pair", choices=[*PAIRS, "none"], default="narrow", help="'none' skips it"
    )
    parser.add_argument("--reference-batch", type=int, default=32)
    parser.add_argument(
        "--reference-repeats", type=int, default=5, help="at most this many (and --repeats)"
    )
    parser.add_argument("--out", default="benchmarks/results/step_cost")
    parser.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.ops_steps < 1:
        parser.error("--repeats and --ops-steps must be >= 1 and --warmup >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.clock == "cpu" and not args.device.startswith("cpu"):
        parser.error("--clock cpu times CPU work only; use --clock wall with --device cuda")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.one is not None:
        print(json.dumps(run_one(args)))
        return

    device = torch.device(args.device)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "command": " ".join(
            ["python", "benchmarks/step_cost.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "settings": {k: v for k, v in vars(args).items() if k != "one"},
        "pairs": {
            p: f"ResNet-{PAIRS[p][0]} width {PAIRS[p][2]} -> ResNet-{PAIRS[p][1]} width "
            f"{PAIRS[p][3]}"
            for p in args.pairs
        },
        "ops_definition": (
            "aten ops per step: CPU torch.profiler events named aten::* with no aten::* "
            "ancestor on the CPU op stack (top-level: what Python, autograd and the optimizer "
            "dispatch); median over --ops-steps profiled steps"
            if args.ops == "profile"
            else "not measured"
        ),
        "memory_method": (
            "not measured"
            if args.memory == "none"
            else (
                "each config in a fresh subprocess, 3 steps; torch.cuda.max_memory_allocated "
                "minus the memory allocated before the first step (peak in brackets)"
                if device.type == "cuda"
                else "each config in a fresh subprocess, 3 steps; the process's peak RSS "
                "(Linux VmHWM, reset to the current RSS just before the first step through "
                "/proc/self/clear_refs) minus the RSS before the first step; peak RSS (imports "
                "and networks included) in brackets. A coarse figure: page granularity, and "
                "memory the allocator reuses or caches is not seen twice"
            )
        ),
        "rows": [],
        "skipped": {},
        "phase_seconds": {},
    }
    for pair in args.pairs:
        for batch_size in args.batch_sizes:
            t0 = time.perf_counter()
            stats, skipped = time_cell(pair, batch_size, args.configs, args)
            result["phase_seconds"][f"time {pair} b{batch_size}"] = time.perf_counter() - t0
            result["skipped"].update(skipped)
            student = stats.get("student", {}).get("median_ms")
            floor = stats.get("floor", {}).get("median_ms")
            floor_ops = stats.get("floor", {}).get("aten_ops")
            for config, s in stats.items():
                result["rows"].append(
                    {
                        "config": config,
                        "pair": pair,
                        "batch": batch_size,
                        **s,
                        "ratio_to_student": s["median_ms"] / student if student else None,
                        "ratio_to_floor": s["median_ms"] / floor if floor else None,
                        "ops_ratio_to_floor": (
                            s["aten_ops"] / floor_ops if floor_ops and "aten_ops" in s else None
                        ),
                    }
                )
    if args.memory == "subprocess":
        t0 = time.perf_counter()
        for row in result["rows"]:
            print(f"  memory: {row['config']} {row['pair']} b{row['batch']}", file=sys.stderr)
            row["memory"] = measure_memory(row["pair"], row["batch"], row["config"], args)
        result["phase_seconds"]["memory"] = time.perf_counter() - t0
    if args.reference_pair != "none":
        t0 = time.perf_counter()
        print("  reference comparison", file=sys.stderr)
        result["reference"] = reference_comparison(args)
        result["phase_seconds"]["reference"] = time.perf_counter() - t0
    result["targets"] = target_checks(result["rows"], device.type)
    result["machine"]["load_average_end"] = load_average()
    result["wall_seconds"] = time.perf_counter() - started

    text = markdown(result)
    print(text)
    md, js = Path(f"{args.out}.md"), Path(f"{args.out}.json")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    js.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {md} and {js}", file=sys.stderr)


if __name__ == "__main__":
    main()
