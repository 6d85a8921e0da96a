"""The command-line application: ``layerkd-train`` (:mod:`~lightning_layerkd.app.train`, a Hydra
app that trains or loads the teacher and distils the student), ``layerkd-report``
(:mod:`~lightning_layerkd.app.report`) and the wandb integration
(:mod:`~lightning_layerkd.app.wandb_logging`). The library does not import it."""

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration mistake found before training starts (``layerkd-train`` prints it
    without a traceback and exits with status 2)."""
