"""Hydra finds launchers in the ``hydra_plugins`` namespace only: ``layerkd-train``'s own
parallel launcher (:mod:`lightning_layerkd.app.launcher`) is registered from here."""
