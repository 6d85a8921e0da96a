"""Scaled dot-product attention in ordinary ops, for derivative maps of transformers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


class ComposedAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as ``softmax(q k^T * scale + mask) v`` in ordinary ops.

    The fused kernels (flash, memory-efficient, and PyTorch's own math kernel under forward
    mode, which writes into a saved tensor) have no forward-mode AD or no backward of it, which
    Hessian maps of a transformer need; the composed form computes the same attention with
    every derivative. Active only inside the map passes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        return _composed_attention(*args, **kwargs)


def _composed_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    scores = query @ key.transpose(-2, -1) * (scale or query.shape[-1] ** -0.5)
    length, source = query.shape[-2], key.shape[-2]
    if is_causal:
        causal = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    # softmax written out: its forward-mode formula divides the saved exp in place
    exp = (scores - scores.detach().amax(dim=-1, keepdim=True)).exp()
    weights = exp / exp.sum(dim=-1, keepdim=True)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return weights @ value
