"""Contrastive representation distillation (Tian et al., ICLR 2020) at every crucial layer
pair: learnt embedding heads, a memory bank of the teacher's embeddings of the training set,
and the NCE critic of eqs. 18-20. The maths are in :mod:`lightning_layerkd.functional.crd`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_layerkd.functional.crd import crd_loss_from_logits, momentum_update
from lightning_layerkd.functional.maps import feature_grid
from lightning_layerkd.methods.base import LearntParts, MethodOutput, Networks, register_method
from lightning_layerkd.methods.features import FeatureMethod
from lightning_layerkd.methods.logit_losses import LogitLoss


class Embedding(nn.Module):
    """CRD's embedding head ``g``: global average pooling of a ``(B, C, H, W)`` feature, a
    linear map to ``dim`` and L2 normalisation (Tian et al. section 3.2)."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, dim)

    def forward(self, feature: Tensor) -> Tensor:
        return F.normalize(self.linear(feature.mean(dim=(2, 3))), dim=1)


class ContrastLayer(nn.Module):
    """One crucial layer pair's learnt parts: the student's and the teacher's embedding heads
    and the memory bank of the teacher's embeddings of every training sample (a buffer, so it
    is checkpointed), initialised to random unit vectors."""

    def __init__(
        self, student_channels: int, teacher_channels: int, dim: int, num_samples: int, seed: int
    ) -> None:
        super().__init__()
        self.student_head = Embedding(student_channels, dim)
        self.teacher_head = Embedding(teacher_channels, dim)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("bank", F.normalize(torch.randn(num_samples, dim, generator=g), dim=1))

    bank: Tensor


class ContrastState(nn.Module):
    """What every layer shares: the number of training steps taken, which seeds the draw of the
    negatives (so a resumed run draws what an uninterrupted one would)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    step: Tensor


def _all_gather(t: Tensor) -> Tensor:
    """``t`` from every process, concatenated along the first dimension (itself when not
    distributed); ranks may hold different numbers of rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    rows = max(int(s) for s in sizes)
    padded = t.new_zeros((rows, *t.shape[1:]))
    padded[: t.shape[0]] = t
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s)] for g, s in zip(gathered, sizes, strict=True)])


@register_method("crd")
class CRD(FeatureMethod):
    """Contrastive representation distillation at every crucial layer pair: ``CE + crd_weight *
    sum_j w_j mean_i L_ij`` with ``L_ij = -log h(t_i, s_i) - sum_{k=1..N} log(1 - h(t_{n_k},
    s_i))`` (Tian et al. eqs. 18-19): student embedding ``s_i = g_S(F_j^S(x_i))``, positive
    ``t_i = g_T(F_j^T(x_i))``, negatives the memory bank's teacher embeddings of ``N`` training
    samples drawn uniformly. After each training step the bank's rows of the batch's samples
    move to ``normalize(m v + (1 - m) t)`` (section 4), with every process's samples under DDP,
    so the banks stay equal. The heads learn in their layer's param group; heads and banks are
    saved in checkpoints. Training batches must carry the samples' indices, ``(inputs, targets,
    indices)`` (``ImageDataModule.sample_indices = True``; the app sets it).

    Args:
        crd_weight: the weight of the summed layer terms (``beta``; 0.8 in their experiments).
        dim: the embedding dimension (128 in the paper).
        num_negatives: ``N`` (16384 of 50,000 samples in the paper, ``N / M`` 0.33; 4096 of
            the benchmark's 10,000 is 0.41).
        tau: the temperature of eq. 19 (0.07).
        momentum: ``m`` of the bank's update (0.5).
        num_samples: ``M``, the training set's size; ``None``: the module's train loader's.
        seed: seeds the bank's initial vectors and the draws of negatives.
        task_loss, logit_weight, temperature, logit_loss: see :class:`DistillationMethod`.
    """

    divergence_name = "crd"
    loss_name = "crd_loss"
    has_parts = True
    needs_sample_indices = True

    def __init__(
        self,
        *,
        crd_weight: float = 0.8,
        dim: int = 128,
        num_negatives: int = 4096,
        tau: float = 0.07,
        momentum: float = 0.5,
        num_samples: int | None = None,
        seed: int = 0,
        task_loss: bool = True,
        logit_weight: float = 0.0,
        temperature: float = 4.0,
        logit_loss: LogitLoss | None = None,
    ) -> None:
        if not crd_weight >= 0:
            raise ValueError(f"crd_weight must be non-negative (e.g. 0.8), got {crd_weight}")
        for name, value in (("dim", dim), ("num_negatives", num_negatives)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not tau > 0:
            raise ValueError(f"tau must be positive (e.g. 0.07), got {tau}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1) (e.g. 0.5), got {momentum}")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"num_samples must be at least 1 or None, got {num_samples}")
        super().__init__(
            feature_weight=crd_weight,
            task_loss=task_loss,
            logit_weight=logit_weight,
            temperature=temperature,
            logit_loss=logit_loss,
        )
        self.crd_weight = float(crd_weight)
        self.dim = dim
        self.num_negatives = num_negatives
        self.tau = float(tau)
        self.momentum = float(momentum)
        self.num_samples = num_samples
        self.seed = int(seed)

    def build_parts(
        self,
        student_shapes: Sequence[tuple[int, ...]],
        teacher_shapes: Sequence[tuple[int, ...]],
        num_samples: int | None = None,
    ) -> LearntParts:
        """Embedding heads and a bank of ``M`` rows per crucial layer pair."""
        m = self.num_samples if self.num_samples is not None else num_samples
        if m is None:
            raise ValueError(
                "CRD keeps a memory bank of the training set and does not know its size: pass "
                "num_samples=len(train_set), or fit with a train loader over a sized dataset"
            )
        layers = []
        for j, (s, t) in enumerate(zip(student_shapes, teacher_shapes, strict=True)):
            c_s = feature_grid(torch.empty((1, *s), device="meta")).shape[1]
            c_t = feature_grid(torch.empty((1, *t), device="meta")).shape[1]
            layers.append(ContrastLayer(c_s, c_t, self.dim, m, self.seed + j))
        return LearntParts(layers, ContrastState())

    def pair_divergence(
        self, index: int, layer: str, student: Tensor, teacher: Tensor, nets: Networks
    ) -> Tensor:
        parts = nets.parts
        if parts is None:
            raise RuntimeError("CRD's heads and banks are not built: the module builds them")
        part = parts.per_layer[index]
        assert isinstance(part, ContrastLayer)
        s = part.student_head(feature_grid(student, layer))
        t = part.teacher_head(feature_grid(teacher, layer).to(s.dtype))
        # the critic's logits with every bank row, then the drawn ones: (B, M) rather than
        # the (B, N, d) negatives themselves
        drawn = self._negatives(parts, index, s.shape[0], part.bank.device)
        updating = parts.training and torch.is_grad_enabled()
        bank = part.bank.clone() if updating else part.bank  # the update must not reach backward
        z_neg = (s @ bank.to(s.dtype).T).gather(1, drawn) / self.tau
        z_pos = (s * t).sum(dim=1) / self.tau
        loss = crd_loss_from_logits(z_pos, z_neg, part.bank.shape[0])
        if updating:  # a training step: move the batch's rows of the bank
            if nets.indices is None:
                raise ValueError(
                    "CRD needs each training sample's index in the training set: batches "
                    "(inputs, targets, indices), e.g. ImageDataModule.sample_indices = True or "
                    "lightning_layerkd.data.IndexedDataset around the train set"
                )
            self._update(part, nets.indices, t.detach())
        return loss

    def _negatives(
        self, parts: LearntParts, index: int, batch: int, device: torch.device
    ) -> Tensor:
        """``(B, N)`` uniform indices into the bank, drawn from the step, the layer and the
        process, so a resumed run draws what an uninterrupted one would."""
        state = parts.shared
        assert isinstance(state, ContrastState)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        key = ((self.seed * 1_000_003 + int(state.step)) * 1_009 + index) * 65_537 + rank
        g = torch.Generator().manual_seed(key % 2**63)
        part = parts.per_layer[index]
        assert isinstance(part, ContrastLayer)
        m = int(part.bank.shape[0])
        return torch.randint(0, m, (batch, self.num_negatives), generator=g).to(device)

    def _update(self, part: ContrastLayer, indices: Tensor, t: Tensor) -> None:
        indices = _all_gather(indices.to(part.bank.device).long())
        t = _all_gather(t.to(part.bank.dtype))
        with torch.no_grad():
            part.bank[indices] = momentum_update(part.bank[indices], t, self.momentum)

    def compute(self, nets: Networks, x: Tensor, y: Tensor, *, create_graph: bool) -> MethodOutput:
        out = super().compute(nets, x, y, create_graph=create_graph)
        parts = nets.parts
        if parts is not None and parts.training and torch.is_grad_enabled():
            state = parts.shared
            assert isinstance(state, ContrastState)
            state.step += 1
        return out
