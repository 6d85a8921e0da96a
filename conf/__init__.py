"""The Hydra configs of ``layerkd-train`` (shipped in the wheel as ``lightning_layerkd.conf``).

Importing the package registers the resolver the configs use: ``${layerkd.milestones:N}``,
the MultiStepLR milestones at half and three quarters of ``N`` epochs (8 epochs: [4, 6])."""

from omegaconf import OmegaConf


def _milestones(epochs: int) -> list[int]:
    epochs = int(epochs)
    return sorted({max(1, min(epochs, round(epochs * f))) for f in (0.5, 0.75)})


OmegaConf.register_new_resolver("layerkd.milestones", _milestones, replace=True)
