"""Which kernels one training step spends its CPU time in (``torch.profiler``, self CPU time).

Builds the steps of ``step_cost.py`` (same networks, batch and configurations), runs
``--warmup`` steps of each, then profiles one step per configuration and writes the top
``--top`` aten ops by self CPU time, with their call counts::

    python benchmarks/profile_step.py --pair paper --batch-size 128 --threads 1 \\
        --configs floor,jacobian_matching --out benchmarks/results/profile_step_jm_b128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import CONFIGS, PAIRS, build_step, machine_info, make_batch, make_networks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=list(PAIRS), default="paper")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--configs", default="floor,jacobian_matching")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/profile_step")
    args = parser.parse_args(argv)
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown or not names:
        parser.error(f"--configs {args.configs!r}: choose from {list(CONFIGS)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    teacher, student = make_networks(args.pair, device, args.seed)
    x, y = make_batch(args.batch_size, device, args.seed)
    info = machine_info(device)
    lines = [
        f"# One profiled step: {args.pair} pair, batch {args.batch_size}",
        "",
        f"{info['cpu_model']}; torch {info['torch']}; {info['torch_threads']} thread(s); "
        f"load average at start {info['load_average_start']}; after {args.warmup} warm-up "
        "step(s); aten ops by self CPU time",
    ]
    for name in names:
        step = build_step(CONFIGS[name], teacher, student, x, y)
        for _ in range(args.warmup):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        lines += [
            "",
            f"## {name}: {total / 1e3:.0f} ms self CPU in all",
            "",
            "| op | calls | self CPU ms | share |",
            "| --- | ---: | ---: | ---: |",
        ]
        for e in events[: args.top]:
            lines.append(
                f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e3:.0f} | "
                f"{100 * e.self_cpu_time_total / total:.1f}% |"
            )
        del step
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out).with_suffix(".md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
