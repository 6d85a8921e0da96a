"""Signal-to-noise ratio of Hessian maps on the strong-teacher benchmark pair.

SNR of a layer = JSD(student map, teacher map) / JSD(teacher map, teacher map of other probe
draws), both on one batch, averaged over ``--batches`` batches of 32 training images; the
table gives the median over the crucial layers. The teacher is the trained
``resnet(18, width=16)``, the student ``resnet(10, width=8)`` at initialisation (training
mode, as in a fit), one probe for the student (the default ``num_probes``) and
``teacher_probes`` for the teacher.

    python benchmarks/hessian_snr.py --data /tmp/cifar10 --teacher TEACHER.pt
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch

from lightning_layerkd.functional.derivatives import hessian_map
from lightning_layerkd.functional.divergence import js_divergence
from lightning_layerkd.functional.maps import match_maps, to_distribution
from lightning_layerkd.models import resnet

MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
LAYERS = {
    "weight": ["layer1", "layer2", "layer3", "layer4"],
    "activation": ["layer1", "layer2", "layer3"],  # layer4 feeds pooling: constant map
}


def jsd(student: list, teacher: list, alignment: str) -> list[float]:
    return [
        float(
            js_divergence(
                *(to_distribution(m.detach()) for m in match_maps(s, t, alignment))
            ).mean()
        )
        for s, t in zip(student, teacher, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--teacher-probes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = resnet(18, num_classes=10, width=16)
    teacher.load_state_dict(torch.load(args.teacher, weights_only=True))
    teacher.eval()
    student = resnet(10, num_classes=10, width=8).train()
    images = torch.from_numpy(np.load(args.data / "x_train.npy")[: 32 * args.batches])
    labels = torch.from_numpy(np.load(args.data / "y_train.npy")[: 32 * args.batches])
    x_all = (images.permute(0, 3, 1, 2).float() / 255 - MEAN) / STD
    rows = [
        "| wrt | weight_alignment | teacher probes | teacher draw-to-draw JSD (per layer) "
        "| student-teacher JSD (per layer) | SNR (median over layers) |",
        "|---|---|---|---|---|---|",
    ]
    for wrt, alignments in (("weight", ("sorted", "index")), ("activation", ("sorted",))):
        for alignment in alignments:
            for probes in args.teacher_probes:
                noise, signal = [], []
                for b in range(args.batches):
                    x, y = x_all[32 * b : 32 * b + 32], labels[32 * b : 32 * b + 32].long()

                    t1, t2, s1 = (
                        hessian_map(
                            model,
                            x,
                            LAYERS[wrt],
                            y,
                            wrt=wrt,
                            num_probes=k,
                            generator=torch.Generator().manual_seed(3 * b + i),
                        )
                        for i, (model, k) in enumerate(
                            ((teacher, probes), (teacher, probes), (student, 1))
                        )
                    )
                    noise.append(jsd(t1, t2, alignment))
                    signal.append(jsd(s1, t1, alignment))
                n = [statistics.mean(col) for col in zip(*noise, strict=True)]
                s = [statistics.mean(col) for col in zip(*signal, strict=True)]
                snr = statistics.median(a / b for a, b in zip(s, n, strict=True))
                rows.append(
                    f"| {wrt} | {alignment if wrt == 'weight' else '-'} | {probes} | "
                    f"{', '.join(f'{v:.4f}' for v in n)} | {', '.join(f'{v:.4f}' for v in s)} | "
                    f"{snr:.1f} |"
                )
                print(rows[-1], flush=True)
    if args.out is not None:
        args.out.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
