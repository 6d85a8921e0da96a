"""Forward hooks that read crucial layers during training without rewriting the model.

:class:`FeatureHooks` puts persistent hooks on some modules; they act only inside
:meth:`FeatureHooks.record`, where they store each module's output and, for Hessian maps, add a
Hutchinson probe's forward-mode tangent (docs/design.md section 3).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "CrucialLayerError",
    "FeatureHooks",
    "LayerFiredTwiceError",
    "ProbeKind",
    "Recording",
    "rademacher_like",
]

ProbeKind = Literal["output", "weight"]


class CrucialLayerError(RuntimeError):
    """A hooked module did not run exactly once in a forward pass."""

    def __init__(self, path: str, message: str, hooks: FeatureHooks | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.hooks = hooks


class LayerFiredTwiceError(CrucialLayerError):
    """A hooked module ran more than once in one forward pass, so its output is ambiguous."""

    def __init__(self, path: str, hooks: FeatureHooks | None = None) -> None:
        super().__init__(
            path,
            f"module '{path}' ran more than once in one forward pass (shared or reused module), "
            "so its feature map is ambiguous; choose a module that runs exactly once.",
            hooks,
        )


def rademacher_like(
    like: Tensor, generator: torch.Generator | None = None, *, dtype: torch.dtype | None = None
) -> Tensor:
    """A tensor of independent +-1 entries with the shape and device of ``like``."""
    device = generator.device if generator is not None else like.device
    bits = torch.randint(0, 2, like.shape, generator=generator, device=device)
    return (bits * 2 - 1).to(device=like.device, dtype=dtype or like.dtype)


@dataclass
class Recording:
    """What the hooks saw during one forward pass (index = hooked module)."""

    outputs: list[Tensor | None]
    probes: list[Tensor | None]
    versions: list[int] = field(default_factory=list)


class _CaptureHook:
    """A picklable forward hook (``ddp_spawn`` pickles the model) that defers to its owner."""

    def __init__(self, owner: FeatureHooks, index: int) -> None:
        self.owner, self.index = owner, index

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        return self.owner._on_forward(self.index, module, inputs, output)


class FeatureHooks:
    """Persistent forward hooks on some modules of a model; they act only inside :meth:`record`.

    Outside :meth:`record` a hook returns at once, so the model behaves as if unhooked. Inside,
    each hook stores its module's output and, when asked, adds a forward-mode tangent for a
    Hutchinson probe (docs/design.md section 3): ``probe="output"`` adds a Rademacher ``v`` to the
    module's output; ``probe="weight"`` (convolutions) adds ``conv(x, v)``, the change of the
    output along ``v`` in weight space, so one forward-mode pass carries every layer's probe.
    """

    def __init__(self, modules: Sequence[nn.Module], paths: Sequence[str]) -> None:
        if len(modules) != len(paths):
            raise ValueError("FeatureHooks needs one path per module")
        self.modules = list(modules)
        self.paths = list(paths)
        self._recording: Recording | None = None
        self._probe: ProbeKind | None = None
        self._generator: torch.Generator | None = None
        self._handles: list[RemovableHandle] = [
            module.register_forward_hook(_CaptureHook(self, index))
            for index, module in enumerate(self.modules)
        ]

    def _on_forward(
        self, index: int, module: nn.Module, inputs: tuple, output: Tensor
    ) -> Tensor | None:
        recording = self._recording
        if recording is None:
            return None
        if recording.outputs[index] is not None:
            raise LayerFiredTwiceError(self.paths[index], self)
        if not isinstance(output, Tensor):
            raise TypeError(
                f"module '{self.paths[index]}' returned {type(output).__name__}, "
                "but a crucial layer must return one tensor"
            )
        recording.outputs[index] = output
        # inference tensors (Lightning's validation) have no version counter and no autograd
        recording.versions[index] = -1 if output.is_inference() else output._version
        if self._probe == "output":
            v = rademacher_like(output, self._generator)
            recording.probes[index] = v
            return output + fwAD.make_dual(torch.zeros_like(output), v)
        if self._probe == "weight":
            v = rademacher_like(module.weight, self._generator)  # type: ignore[arg-type]
            recording.probes[index] = v
            x = fwAD.unpack_dual(inputs[0]).primal
            tangent = module._conv_forward(x, v, None)  # type: ignore[operator]  # d out / dW . v
            return output + fwAD.make_dual(torch.zeros_like(output), tangent)
        return None

    @contextmanager
    def record(
        self, probe: ProbeKind | None = None, generator: torch.Generator | None = None
    ) -> Iterator[Recording]:
        """Arm the hooks for one forward pass; the yielded :class:`Recording` fills in."""
        if self._recording is not None:
            raise RuntimeError("FeatureHooks.record() is not re-entrant")
        n = len(self.modules)
        recording = Recording(outputs=[None] * n, probes=[None] * n, versions=[0] * n)
        self._recording, self._probe, self._generator = recording, probe, generator
        try:
            yield recording
        finally:
            self._recording, self._probe, self._generator = None, None, None

    def outputs(self, recording: Recording) -> list[Tensor]:
        """The recorded outputs, checking that every module ran and none was changed in place."""
        result = []
        for path, output, version in zip(
            self.paths, recording.outputs, recording.versions, strict=True
        ):
            if output is None:
                raise CrucialLayerError(
                    path,
                    f"module '{path}' did not run in the forward pass; a crucial layer must be "
                    "on the path from input to output",
                    self,
                )
            if version >= 0 and output._version != version:
                raise RuntimeError(
                    f"the output of '{path}' was modified in place after it was produced "
                    "(e.g. by nn.ReLU(inplace=True)); pick the module that follows the "
                    "in-place operation as the crucial layer"
                )
            result.append(output)
        return result

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def active(self) -> bool:
        """Whether the hooks are still installed."""
        return bool(self._handles)
