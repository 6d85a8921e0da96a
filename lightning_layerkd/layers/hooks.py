"""Forward hooks that read crucial layers during training without rewriting the model.

:class:`FeatureHooks` puts persistent hooks on some modules; they act only inside
:meth:`FeatureHooks.record`, where they store each module's output and, for Hessian maps, add a
Hutchinson probe's forward-mode tangent (docs/design.md section 3), one probe per pass or, over
a batch repeated ``k`` times, probe ``i`` on copy ``i``
(:mod:`lightning_layerkd.functional._probes`).
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
    #: hook indices in firing order: the order in which the probes were drawn
    order: list[int] = field(default_factory=list)
    #: each convolution's input by copy (``probe="weight"`` over a repeated batch), for the
    #: weight gradient of each copy
    inputs: list[Sequence[Tensor] | None] = field(default_factory=list)


@dataclass(frozen=True)
class ProbePlan:
    """The probes one pass drew, in firing order: hook index and a zero-stride stand-in with the
    probe's shape, dtype and device (it holds no memory), valid for inputs described by ``key``."""

    key: object
    draws: list[tuple[int, Tensor]]


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
        self._chunks = 1
        self._drawn: list[Tensor | None] | None = None
        #: the draws of the last pass recorded with a ``plan`` key (see :meth:`record`)
        self.probe_plan: ProbePlan | None = None
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
        recording.order.append(index)
        if self._probe is not None and self._drawn is not None:  # over a repeated batch
            return self._chunked_probe(index, module, inputs, output, recording)
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

    def _chunked_probe(
        self, index: int, module: nn.Module, inputs: tuple, output: Tensor, recording: Recording
    ) -> Tensor:
        """The tangent of probe ``i`` on copy ``i`` of the repeated batch (eq. 6's ``J v`` for
        every probe in one pass); ``recording.probes[index]`` gets the stacked ``(k, ...)``."""
        k = self._chunks
        if output.shape[0] % k:
            raise RuntimeError(
                f"module '{self.paths[index]}' has {output.shape[0]} rows, not {k} copies of a "
                "batch: probes over a repeated batch need the batch dimension first"
            )
        rows = output.shape[0] // k
        like = output if self._probe == "output" else module.weight
        assert isinstance(like, Tensor)
        shape = (rows, *output.shape[1:]) if self._probe == "output" else like.shape
        v = self._drawn[index] if self._drawn is not None else None
        if v is None or v.shape[1:] != shape or (v.dtype, v.device) != (like.dtype, like.device):
            # A layer the plan did not foresee: fresh probes, still independent Rademacher ones
            # (an unbiased estimate), but not those of sequential passes; the next call re-plans.
            self.probe_plan = None
            one = like[:rows] if self._probe == "output" else like
            v = torch.stack([rademacher_like(one, self._generator) for _ in range(k)])
        recording.probes[index] = v
        if self._probe == "output":
            tangent = v.flatten(0, 1)
        else:
            x = fwAD.unpack_dual(inputs[0]).primal.chunk(k)
            recording.inputs[index] = x
            pairs = zip(x, v.unbind(), strict=True)
            conv = module._conv_forward  # d out / dW . v, for each copy
            tangent = torch.cat([conv(x_i, v_i, None) for x_i, v_i in pairs])  # type: ignore[operator]
        return output + fwAD.make_dual(torch.zeros_like(output), tangent)

    def draw_probes(self, chunks: int, generator: torch.Generator | None) -> list[Tensor | None]:
        """Probes for ``chunks`` passes, drawn as that many passes would draw them: every planned
        hook's first probe in firing order, then every second one, ...; stacked per hook,
        ``(chunks, *shape)``, ``None`` for hooks not in :attr:`probe_plan`."""
        if self.probe_plan is None:
            raise RuntimeError("draw_probes needs a probe_plan: record a pass with plan= first")
        draws: list[list[Tensor]] = [[] for _ in self.modules]
        for _ in range(chunks):
            for index, like in self.probe_plan.draws:
                draws[index].append(rademacher_like(like, generator))
        return [torch.stack(d) if d else None for d in draws]

    @contextmanager
    def record(
        self,
        probe: ProbeKind | None = None,
        generator: torch.Generator | None = None,
        *,
        chunks: int = 1,
        probes: Sequence[Tensor | None] | None = None,
        plan: object = None,
    ) -> Iterator[Recording]:
        """Arm the hooks for one forward pass; the yielded :class:`Recording` fills in.

        With ``probes`` (:meth:`draw_probes`), the batch is ``chunks`` copies of one batch and
        copy ``i`` carries probe ``i``. ``plan``: a key (the input's layout) under which a
        one-probe pass keeps its draws as :attr:`probe_plan`.
        """
        if self._recording is not None:
            raise RuntimeError("FeatureHooks.record() is not re-entrant")
        n = len(self.modules)
        recording = Recording(
            outputs=[None] * n, probes=[None] * n, versions=[0] * n, inputs=[None] * n
        )
        self._recording, self._probe, self._generator = recording, probe, generator
        self._chunks, self._drawn = chunks, list(probes) if probes is not None else None
        try:
            yield recording
            if plan is not None and probe is not None and probes is None:
                draws = [(i, recording.probes[i]) for i in recording.order]
                self.probe_plan = ProbePlan(
                    plan, [(i, p.new_empty(()).expand(p.shape)) for i, p in draws if p is not None]
                )
        finally:
            self._recording, self._probe, self._generator = None, None, None
            self._chunks, self._drawn = 1, None

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
