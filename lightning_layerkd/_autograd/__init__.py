"""Private autograd machinery for the derivative maps (imported by
:mod:`lightning_layerkd.functional`
only): cheaper forward-mode and double-backward rules for convolution and batch norm
(:class:`~lightning_layerkd._autograd.mode.LeanAutograd`), a twice-differentiable hardsigmoid and
scaled dot-product attention in ordinary ops. Same values and gradients as PyTorch's rules."""
