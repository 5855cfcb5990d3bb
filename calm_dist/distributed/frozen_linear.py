"""Linear layers of the frozen, ZeRO-3-partitioned anchor whose backward keeps no gathered weight alive.

Plain ``F.linear`` saves its weight for backward (the transposed view ``mm`` needs for the input's
gradient). Under ZeRO-3 that view pins the *gathered* weight: DeepSpeed re-partitions a parameter by
pointing ``param.data`` at an empty tensor, but the saved view still holds the full storage, so every
frozen weight of every layer above the first bridge (and the LM head) stays resident from forward until
backward, whatever the anchor rank count.

``FrozenLinearFunction`` saves a reference to the ``Parameter`` object instead of its data: once
DeepSpeed re-partitions it, the gathered storage is freed. In backward, DeepSpeed's pre-backward hooks
gather the module's parameters again (ZeRO-3 gathers every parameter in forward and again in backward);
should the weight not be there, it is gathered here and released after use. For a frozen weight the input
is not saved either: ``grad_input = grad_output @ W`` needs only the weight.

The bridges' linear layers use it too (``build_engine``): their weights are trainable, but ZeRO-3 gathers
and releases them like the anchor's, and plain ``F.linear`` would keep each gathered bridge weight alive from
forward to backward.

DeepSpeed's own ``memory_efficient_linear`` does the same for the weight but replaces
``torch.nn.functional.linear`` for the whole process, for good (every other model in the process, e.g. a
plain reference model or the augmenting model, then runs through it). Here only the anchor's own
``nn.Linear`` modules change class (``use_frozen_linear``), nothing process-wide.
"""
from __future__ import annotations

import torch
from torch import nn


def _gather_if_partitioned(weight: torch.Tensor) -> bool:
    """Gathers a ZeRO-3 parameter that is not available; True when it must be released after use."""
    status = getattr(weight, "ds_status", None)
    if status is not None and status.name == "NOT_AVAILABLE":
        weight.all_gather()
        return True
    return False


class FrozenLinearFunction(torch.autograd.Function):
    """``F.linear(input, weight, bias)`` whose saved state is the input (only when the weight needs a gradient)
    and a reference to the weight and bias parameters, never their gathered storage."""

    @staticmethod
    def forward(ctx, input, weight, bias):  # noqa: A002 (torch's name)
        ctx.weight, ctx.bias_shape = weight, None if bias is None else bias.shape
        ctx.save_for_backward(input if weight.requires_grad else None)
        return torch.nn.functional.linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        (input,) = ctx.saved_tensors
        weight = ctx.weight
        grad_input = grad_weight = grad_bias = None
        gathered = _gather_if_partitioned(weight) if ctx.needs_input_grad[0] or ctx.needs_input_grad[1] else False
        try:
            if ctx.needs_input_grad[0]:
                grad_input = grad_output.matmul(weight.to(grad_output.dtype))
            if ctx.needs_input_grad[1]:  # in grad_output's dtype, as autocast's linear computes it
                grad_weight = grad_output.reshape(-1, grad_output.shape[-1]).t().matmul(
                    input.reshape(-1, input.shape[-1]).to(grad_output.dtype)).to(weight.dtype)
        finally:
            if gathered:
                weight.partition()
        if ctx.bias_shape is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        ctx.weight = None
        return grad_input, grad_weight, grad_bias


class FrozenLinear(nn.Linear):
    """An ``nn.Linear`` whose forward runs ``FrozenLinearFunction`` (set by ``use_frozen_linear``)."""

    def forward(self, input):  # noqa: A002
        if not torch.is_grad_enabled() or not (input.requires_grad or self.weight.requires_grad):
            return torch.nn.functional.linear(input, self.weight, self.bias)
        return FrozenLinearFunction.apply(input, self.weight, self.bias)


def use_frozen_linear(model: nn.Module) -> int:
    """Every ``nn.Linear`` of ``model`` (exactly that class: subclasses may compute otherwise) becomes a
    ``FrozenLinear``, in place: same parameters, hooks and state. Returns how many changed."""
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FrozenLinear
            changed += 1
    return changed
