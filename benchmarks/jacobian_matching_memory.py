"""What a Jacobian-matching step keeps for backward, phase by phase (issue 28).

Autograd's saved tensors (unique storages, counted with ``saved_tensors_hooks``) of, on the
``step_cost.py`` networks and batch:

* the plain student step (cross-entropy): what the floor keeps;
* the teacher's input Jacobians (``layer_jacobians`` without a graph; freed before the student
  runs);
* the student's forward and its ``1 + L`` backward passes that keep their graph (what the
  double backward reads, alive until the step's backward).

Deterministic (no timing), so one pass suffices::

    python benchmarks/jacobian_matching_memory.py --pair paper --batch-size 32 \\
        --out benchmarks/results/jacobian_matching_memory
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import CONFIGS, PAIRS, make_batch, make_networks

from lightning_layerkd.functional.jacobian_matching import layer_jacobians
from lightning_layerkd.layers.hooks import FeatureHooks

JM_CONFIGS = [name for name, c in CONFIGS.items() if c.method == "jacobian_matching"]


def saved_mib(fn: Callable[[], object]) -> float:
    """MiB of the distinct storages autograd saves for backward while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=list(PAIRS), default="paper")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/jacobian_matching_memory")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    teacher, student = make_networks(args.pair, device, args.seed)
    x, y = make_batch(args.batch_size, device, args.seed)
    student.train()
    plain = saved_mib(lambda: F.cross_entropy(student(x), y))
    rows = []
    for name in JM_CONFIGS:
        paths = [p for p, _ in CONFIGS[name].layers]
        t_hooks = FeatureHooks([teacher.get_submodule(p) for p in paths], paths)
        s_hooks = FeatureHooks([student.get_submodule(p) for p in paths], paths)
        t_result = layer_jacobians(teacher, x, t_hooks, y)
        t_mib = saved_mib(lambda h=t_hooks: layer_jacobians(teacher, x, h, y))
        s_mib = saved_mib(
            lambda h=s_hooks, t=t_result: layer_jacobians(student, x, h, y, t, create_graph=True)
        )
        t_hooks.remove()
        s_hooks.remove()
        rows.append({"config": name, "teacher_mib": t_mib, "student_mib": s_mib})
    lines = [
        f"# Saved tensors of a Jacobian-matching step: {args.pair} pair, batch {args.batch_size}",
        "",
        f"Plain student step (cross-entropy; what the floor keeps): {plain:.0f} MiB",
        "",
        "| config | teacher Jacobians MiB (freed before the student) | student forward + "
        "Jacobian graphs MiB | x plain student step |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['teacher_mib']:.0f} | {r['student_mib']:.0f} | "
            f"{r['student_mib'] / plain:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    result = {"settings": vars(args), "plain_student_mib": plain, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
