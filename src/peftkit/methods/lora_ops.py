"""Fused kernels for LoRA on linear layers (the speed and memory work of the performance issue).

The plain LoRA forward ``y = W x + b + s · B (A x)`` written with modules costs, besides the two small
matmuls, two passes over the full ``(N, out)`` output (``· s`` and ``+``) in forward and two more in
backward (the scaled gradient, and the sum of the base's and the adapter's input gradients), each with a
fresh ``(N, out)`` or ``(N, in)`` temporary. :class:`LoraLinearFunction` does the same algebra with the
scale and the sum folded into ``addmm``::

    forward    aᵀ = A xᵀ                       (r, N)
               y  = addmm(b, x, Wᵀ);  y += s · a Bᵀ          (one output buffer, no temporaries)
    backward   g_aᵀ = s · Bᵀ gᵀ                (r, N)
               ∂x  = g W;  ∂x += g_a A                        (one input-gradient buffer)
               ∂A  = g_aᵀ x,   ∂B = s · (aᵀ g)ᵀ

The rank-r products are written with the small factor on the left (``A xᵀ`` rather than ``x Aᵀ``, and
``aᵀ g`` rather than ``gᵀ a``): the same numbers, but this CPU's BLAS runs these skinny shapes 2-8× faster
that way round (``benchmarks/README.md`` has the timings), and they are most of LoRA's extra cost.

It saves ``x`` (the base layer saves nothing when ``W`` is frozen, so ``x`` is the one activation LoRA
must keep; the query, key and value projections share it), the small ``a`` and the weights. The results
equal the module version up to float rounding (the order of additions differs).
"""

from __future__ import annotations

from typing import Any

import torch


class LoraLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b + s · (x_A Aᵀ) Bᵀ`` for a frozen or trainable ``W``; ``x_A`` is ``x`` after dropout.

    Args (of :meth:`apply`, all positional):
        x: ``(..., in)`` input.
        dropped: ``x`` after the adapter's dropout, or ``None`` when there is none (then ``x`` is used
            and saved once).
        weight: the base weight, ``(out, in)``, or ``(in, out)`` when ``weight_in_out`` (GPT-2 Conv1D).
        bias: ``(out,)`` or ``None``.
        lora_A: ``(r, in)``;  lora_B: ``(out, r)``;  scaling: the float ``s``.
        weight_in_out: the layout flag above.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        dropped: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        weight_in_out: bool,
    ) -> torch.Tensor:
        in_features = x.shape[-1]
        x_2d = x.reshape(-1, in_features)  # (N, in)
        adapter_in = x_2d if dropped is None else dropped.reshape(-1, in_features)
        weight_t = weight if weight_in_out else weight.t()  # (in, out)
        out = torch.mm(x_2d, weight_t) if bias is None else torch.addmm(bias, x_2d, weight_t)  # (N, out)
        after_A_t = torch.mm(lora_A, adapter_in.t())  # (r, N): see the module docstring on layouts
        out.addmm_(after_A_t.t(), lora_B.t(), alpha=scaling)
        # ``x`` is kept only when some gradient needs it; saving a tensor costs a reference, not a copy
        needs_x = ctx.needs_input_grad[2] or (dropped is None and ctx.needs_input_grad[4])
        ctx.save_for_backward(
            x_2d if needs_x else None,
            None if dropped is None else adapter_in,
            after_A_t,
            weight,
            lora_A,
            lora_B,
        )
        ctx.scaling, ctx.weight_in_out, ctx.x_shape = scaling, weight_in_out, x.shape
        ctx.shared_input = dropped is None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_2d, dropped_2d, after_A_t, weight, lora_A, lora_B = ctx.saved_tensors
        need_x, need_dropped, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:6]
        scaling = ctx.scaling
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        adapter_in = x_2d if ctx.shared_input else dropped_2d

        grad_after_A_t = None  # s · (g B)ᵀ: the gradient reaching A's output, (r, N)
        if need_A or need_dropped or (need_x and ctx.shared_input):
            grad_after_A_t = torch.mm(lora_B.t().to(grad_2d.dtype), grad_2d.t()).mul_(scaling)

        grad_x = grad_dropped = None
        if need_x:
            grad_x = torch.mm(grad_2d, weight.t() if ctx.weight_in_out else weight)  # (N, in)
            if ctx.shared_input:
                grad_x.addmm_(grad_after_A_t.t(), lora_A)
            grad_x = grad_x.view(ctx.x_shape)
        if need_dropped:
            grad_dropped = torch.mm(grad_after_A_t.t(), lora_A).view(ctx.x_shape)

        grad_weight = grad_bias = grad_A = grad_B = None
        if need_w:
            grad_weight = x_2d.t().mm(grad_2d) if ctx.weight_in_out else grad_2d.t().mm(x_2d)
        if need_b:
            grad_bias = grad_2d.sum(0)
        if need_A:
            grad_A = torch.mm(grad_after_A_t, adapter_in)  # (r, in)
        if need_B:
            grad_B = torch.mm(after_A_t, grad_2d).mul_(scaling).t()  # (out, r), a transposed view
        return grad_x, grad_dropped, grad_weight, grad_bias, grad_A, grad_B, None, None


class DoraLinearFunction(torch.autograd.Function):
    """DoRA on a linear layer without dropout: ``y = c ⊙ (x Wᵀ + s · (x Aᵀ) Bᵀ) + b`` with ``c = m / n``.

    ``n = ‖W + s·BA‖`` per output feature is computed by the caller without gradient (DoRA treats it as a
    constant in backward, paper §4.3); ``m`` is the trainable magnitude. Writing ``z = x Wᵀ + s·a Bᵀ``::

        backward   ∂m = Σ_rows (g ⊙ z) / n,   g_z = g ⊙ c,   then LoRA's backward with g_z

    Only ``z`` is kept besides LoRA's tensors (the module version keeps the base output and the adapter
    output, two ``(N, out)`` tensors, and makes four more elementwise passes over them).

    Args (of :meth:`apply`): ``x, weight, bias, lora_A, lora_B, scaling, weight_in_out, magnitude, norm``
    with ``magnitude`` and ``norm`` shaped ``(out,)``; the others as in :class:`LoraLinearFunction`.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        weight_in_out: bool,
        magnitude: torch.Tensor,
        norm: torch.Tensor,
    ) -> torch.Tensor:
        x_2d = x.reshape(-1, x.shape[-1])  # (N, in)
        z = torch.mm(x_2d, weight if weight_in_out else weight.t())  # (N, out)
        after_A_t = torch.mm(lora_A, x_2d.t())  # (r, N)
        z.addmm_(after_A_t.t(), lora_B.t(), alpha=scaling)
        inverse_norm = norm.reciprocal()
        factor = magnitude * inverse_norm  # c, (out,)
        out = z * factor if bias is None else torch.addcmul(bias, z, factor)
        ctx.save_for_backward(x_2d, after_A_t, weight, lora_A, lora_B, z, factor, inverse_norm)
        ctx.scaling, ctx.weight_in_out, ctx.x_shape = scaling, weight_in_out, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_2d, after_A_t, weight, lora_A, lora_B, z, factor, inverse_norm = ctx.saved_tensors
        need_x, need_w, need_b, need_A, need_B, _, _, need_m = ctx.needs_input_grad[:8]
        scaling = ctx.scaling
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        grad_m = (grad_2d * z).sum(0).mul_(inverse_norm) if need_m else None
        grad_bias = grad_2d.sum(0) if need_b else None
        grad_z = grad_2d * factor  # (N, out)
        grad_after_A_t = None
        if need_A or need_x:
            grad_after_A_t = torch.mm(lora_B.t(), grad_z.t()).mul_(scaling)  # (r, N)
        grad_x = grad_weight = grad_A = grad_B = None
        if need_x:
            grad_x = torch.mm(grad_z, weight.t() if ctx.weight_in_out else weight)
            grad_x.addmm_(grad_after_A_t.t(), lora_A)
            grad_x = grad_x.view(ctx.x_shape)
        if need_w:
            grad_weight = x_2d.t().mm(grad_z) if ctx.weight_in_out else grad_z.t().mm(x_2d)
        if need_A:
            grad_A = torch.mm(grad_after_A_t, x_2d)
        if need_B:
            grad_B = torch.mm(after_A_t, grad_z).mul_(scaling).t()
        return grad_x, grad_weight, grad_bias, grad_A, grad_B, None, None, grad_m, None
