"""Information-flow measurement and layer matching (Passalis et al. 2020, eqs. 1-4).

The information flow of a network (eqs. 1-2: the mutual information ``I(X^(l), Z)`` between
each layer's representation and the labels) is estimated per layer with
:func:`nearest_centroid_accuracy`, the NCC accuracy of their Fig. 2; :func:`layer_information`
measures it over the crucial layers of a model. :func:`match_layers` pairs each student layer
with a teacher layer by eq. 4 and :func:`information_flow_divergence` is eq. 3;
:func:`report_layer_matching` puts them together for a teacher/student pair. The PKT losses
that transfer the information once layers are paired (eqs. 5-10) live in
:mod:`lightning_layerkd.functional.information_flow`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from lightning_layerkd.functional.information_flow import flatten_features
from lightning_layerkd.layers.hooks import FeatureHooks
from lightning_layerkd.layers.specs import resolve_module


@torch.no_grad()
def nearest_centroid_accuracy(
    features: Tensor,
    labels: Tensor,
    test_features: Tensor | None = None,
    test_labels: Tensor | None = None,
) -> float:
    """Nearest-centroid classifier (NCC) accuracy, the per-layer MI proxy of Fig. 2.

    The paper reports the NCC accuracy of each layer's representation as "an intuitive measure"
    of ``I(X^(l), Z)`` (eqs. 1-2) but does not state the protocol. With ``test_features`` the
    class centroids are the means of ``features`` per label and the accuracy is measured on the
    test set; without, it is leave-one-out on ``features``: each sample is classified against
    the centroids with itself removed from its own class (an in-sample accuracy would reward
    high-dimensional noise). A sample alone in its class has no centroid left and counts as
    wrong. Euclidean distance on flattened features; ties go to the smaller label.

    Args:
        features: ``(N, ...)`` representations of one layer.
        labels: ``(N,)`` integer class labels.
        test_features: optional ``(M, ...)`` held-out representations.
        test_labels: ``(M,)`` labels of ``test_features``.

    Returns:
        The accuracy in ``[0, 1]``.
    """
    x = flatten_features(torch.as_tensor(features)).double()
    y = torch.as_tensor(labels, device=x.device).reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"got {x.shape[0]} samples and {y.shape[0]} labels")
    if (test_features is None) != (test_labels is None):
        raise ValueError("pass both test_features and test_labels, or neither")
    classes, idx = torch.unique(y, return_inverse=True)
    counts = torch.bincount(idx, minlength=len(classes)).to(x.dtype)
    centroids = torch.zeros(len(classes), x.shape[1], dtype=x.dtype, device=x.device)
    centroids.index_add_(0, idx, x)
    centroids = centroids / counts[:, None]
    if test_features is not None and test_labels is not None:
        xt = flatten_features(torch.as_tensor(test_features, device=x.device)).double()
        yt = torch.as_tensor(test_labels, device=x.device).reshape(-1)
        if xt.shape[0] != yt.shape[0] or xt.shape[0] == 0:
            raise ValueError(f"got {xt.shape[0]} test samples and {yt.shape[0]} test labels")
        pred = classes[torch.cdist(xt, centroids).argmin(dim=1)]
        return float((pred == yt).double().mean())
    dist = torch.cdist(x, centroids).pow(2)  # (N, C)
    rows = torch.arange(x.shape[0], device=x.device)
    n_c = counts[idx]
    # Leave-one-out: the own centroid without x_n is (n_c mu_c - x_n) / (n_c - 1), whose
    # distance to x_n is n_c / (n_c - 1) times ||x_n - mu_c||.
    own = dist[rows, idx] * (n_c / (n_c - 1).clamp_min(1)) ** 2
    dist[rows, idx] = torch.where(n_c > 1, own, torch.full_like(own, float("inf")))
    pred = dist.argmin(dim=1)
    return float((pred == idx).double().mean())


def _as_list(scores: Sequence[float] | Tensor, name: str) -> list[float]:
    out = [
        float(s) for s in (scores.reshape(-1).tolist() if isinstance(scores, Tensor) else scores)
    ]
    if not out:
        raise ValueError(f"{name} must not be empty")
    return out


def match_layers(
    student_scores: Sequence[float] | Tensor, teacher_scores: Sequence[float] | Tensor
) -> list[int]:
    """Layer matching ``kappa`` of eq. 4, from per-layer MI estimates (eqs. 1-2).

    ``kappa(i) = N_Lt`` (the teacher's last layer) for the student's last layer, else
    ``argmin_j ([w_s]_i - [w_t]_j)^2`` over all teacher layers ``j`` (the last included; ties to
    the earlier layer). Several student layers may share a teacher layer, as the paper notes.

    Args:
        student_scores: ``w_s``, one MI estimate per student layer (e.g.
            :func:`nearest_centroid_accuracy`), input to output.
        teacher_scores: ``w_t``, likewise per teacher layer.

    Returns:
        For each student layer the 0-based index of its teacher layer.
    """
    ws = _as_list(student_scores, "student_scores")
    wt = _as_list(teacher_scores, "teacher_scores")
    out = []
    for s in ws[:-1]:  # argmin keeps the first (earliest) of tied layers
        sq = [(s - t) ** 2 for t in wt]
        out.append(sq.index(min(sq)))
    return out + [len(wt) - 1]


def information_flow_divergence(
    student_scores: Sequence[float] | Tensor, teacher_scores: Sequence[float] | Tensor
) -> float:
    """Information-flow divergence of eq. 3: ``sum_i ([w_s]_i - [w_t]_kappa(i))^2``, eq. 4."""
    ws = _as_list(student_scores, "student_scores")
    wt = _as_list(teacher_scores, "teacher_scores")
    return float(sum((s - wt[j]) ** 2 for s, j in zip(ws, match_layers(ws, wt), strict=True)))


def layer_information(
    model: nn.Module,
    paths: Sequence[str],
    batches: Iterable[tuple[Tensor, Tensor]],
) -> list[float]:
    """Nearest-centroid accuracy (the MI proxy of Fig. 2) of each layer in ``paths`` and of the
    output, on ``batches`` of ``(inputs, labels)``, leave-one-out, the model in eval mode."""
    modules = [resolve_module(model, path) for path in paths]
    hooks = FeatureHooks(modules, list(paths))
    feats: list[list[Tensor]] = [[] for _ in range(len(paths) + 1)]
    labels: list[Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, y in batches:
                x = x.to(next(model.parameters()).device)
                with hooks.record() as recording:
                    logits = model(x)
                    outputs = hooks.outputs(recording)
                for store, f in zip(feats, [*outputs, logits], strict=True):
                    store.append(f.flatten(1).float().cpu())
                labels.append(y.cpu())
    finally:
        hooks.remove()
        model.train(was_training)
    y_all = torch.cat(labels)
    return [nearest_centroid_accuracy(torch.cat(f), y_all) for f in feats]


def report_layer_matching(
    teacher: nn.Module,
    student: nn.Module,
    pairs: Sequence[tuple[str, str]],
    batches: Sequence[tuple[Tensor, Tensor]],
) -> dict[str, object]:
    """Which teacher layer feeds which student layer by eqs. 3-4, from each crucial layer's
    (and the output's) nearest-centroid accuracy: ``{"student": {...}, "teacher": {...},
    "matching": {student_layer: teacher_layer}, "divergence": eq. 3}``."""
    s_paths = [s for s, _ in pairs]
    t_paths = [t for _, t in pairs]
    w_s = layer_information(student, s_paths, batches)
    w_t = layer_information(teacher, t_paths, batches)
    s_names, t_names = [*s_paths, "output"], [*t_paths, "output"]
    kappa = match_layers(w_s, w_t)
    return {
        "student": dict(zip(s_names, w_s, strict=True)),
        "teacher": dict(zip(t_names, w_t, strict=True)),
        "matching": {s_names[i]: t_names[j] for i, j in enumerate(kappa)},
        "divergence": information_flow_divergence(w_s, w_t),
    }
