"""Batches as the module sees them: the first batch of a stage (for discovering crucial layers
before the optimizer exists) and the default ``(inputs, targets)`` split."""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["first_batch", "split_batch"]


def split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` from a tuple or list batch; other layouts are an error that says
    how to support them."""
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        "DistillationModule expects batches (inputs, targets) as a tuple or list, got "
        f"{type(batch).__name__}; override unpack_batch() for other layouts"
    )


def first_batch(trainer: Any, stage: str) -> Any:
    """The first batch of the train (``stage="fit"``) or validation dataloader the trainer
    will use, for discovering crucial layers before the optimizer exists; ``None`` if none."""
    datamodule: Any = getattr(trainer, "datamodule", None)
    if datamodule is not None:
        loader = datamodule.train_dataloader() if stage == "fit" else datamodule.val_dataloader()
    else:
        loop: Any = trainer.fit_loop if stage == "fit" else trainer.validate_loop
        loader = loop._data_source.dataloader()
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    return None if loader is None else next(iter(loader))
