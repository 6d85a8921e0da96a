"""The app's messages go through Python's :mod:`logging`, from rank zero only.

Under ``layerkd-train`` Hydra configures the root logger (``hydra/job_logging``): one handler
for the console, one for ``train.log`` in the run directory, so both hold the same lines.
:func:`route_lightning_to_root` sends Lightning's own messages the same way. Through the Python
API (:func:`~lightning_layerkd.app.train.run`) the messages go wherever the caller's logging
configuration sends them.
"""

from __future__ import annotations

import logging

from lightning.pytorch.utilities.rank_zero import rank_zero_only

#: Lightning's loggers, which add their own console handler (on stderr) when imported before
#: logging is configured, as they are under Hydra: their lines would miss ``train.log``.
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


class RankZeroFilter(logging.Filter):
    """Passes records on the process of global rank zero only (one line per message under
    ``strategy=ddp``, whose other ranks run the same script)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(rank_zero_only, "rank", 0) == 0


def get_logger(name: str) -> logging.Logger:
    """The logger ``name`` (a module's ``__name__``), silent on ranks other than zero."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, RankZeroFilter) for f in logger.filters):
        logger.addFilter(RankZeroFilter())
    return logger


def route_lightning_to_root() -> None:
    """Drop the console handler Lightning adds to its loggers when imported before logging is
    configured, and let their records reach the root logger's handlers (the console and
    ``train.log`` under Hydra), if the root logger has any."""
    if not logging.getLogger().hasHandlers():
        return
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
