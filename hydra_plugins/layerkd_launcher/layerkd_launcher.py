"""The registration of ``layerkd-train``'s parallel launcher with Hydra (which takes launchers
from the ``hydra_plugins`` namespace only): ``hydra/launcher=parallel``. The launcher itself is
:class:`lightning_layerkd.app.launcher.ProcessLauncher`."""

from lightning_layerkd.app.launcher import ProcessLauncher


class LayerkdLauncher(ProcessLauncher):
    """:class:`~lightning_layerkd.app.launcher.ProcessLauncher`, as Hydra finds it."""
