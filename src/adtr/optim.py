"""Optimisers: AdamW (the paper's) and Muon on the transformer's weight matrices.

Muon (Jordan et al., 2024, "Muon: an optimizer for hidden layers in neural networks")
replaces each weight matrix's momentum by the nearest semi-orthogonal matrix, so every
direction of the matrix moves at the same rate instead of the few directions that
dominate its gradient. We write the step ourselves rather than use ``torch.optim.Muon``
because that one always orthogonalises in bf16, which CPUs without bf16 units (AVX2)
run about 25 times slower than fp32: 24 s an optimiser step of the default model on the
project's 2-core AMD EPYC, against a 1 s training step.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from adtr.config import ADAMW_UPDATE_RMS, OPTIMIZERS

#: Coefficients of the quintic Newton-Schulz iteration, chosen by Muon's authors for the
#: steepest slope at zero (singular values end in about [0.7, 1.2], not exactly 1).
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., m, n) -> approximately U V^T of each matrix's SVD U S V^T, by ``steps`` quintic
    Newton-Schulz iterations; a batch of same-shaped matrices runs as one batched matmul.

    Each iteration is x <- p(x x^T) x with p(G) = a I + b G + c G^2. For a wide matrix (n at
    least twice m) the fp32 (or fp64) iteration runs on the m x m Gram matrix alone, G <- p(G) G p(G),
    accumulating the product of the p(G), and multiplies x once at the end: the same result
    in about 60% of the time for the transformer's 256 x 1024 feed-forward matrices. Not in
    bf16: there nothing pulls the accumulated product back to x's singular directions, and
    for a low-rank momentum (rank 2 plus noise) the rounding errors grew the update to 60-100
    times its size; the plain iteration re-reads x each step and stays in Muon's band.
    """
    a, b, c = NEWTON_SCHULZ
    x = g.to(dtype)
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:
        x = x.mT  # iterate on the smaller Gram matrix
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-7)  # spectral norm <= Frobenius norm <= 1
    if torch.finfo(dtype).bits >= 32 and x.shape[-1] >= 2 * x.shape[-2]:  # Gram form: fp32 and fp64 only
        gram = x @ x.mT
        eye = torch.eye(gram.shape[-1], dtype=dtype, device=gram.device)
        total = None
        for i in range(steps):
            poly = a * eye + b * gram + c * gram @ gram
            total = poly if total is None else poly @ total
            if i < steps - 1:  # the last step's Gram matrix is never read
                gram = poly @ gram @ poly
        x = total @ x
    else:
        for _ in range(steps):
            gram = x @ x.mT
            x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.mT).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters: Nesterov momentum, orthogonalised, scaled to a multiple of AdamW's update size.

    The scale ``rms sqrt(max(m, n))`` gives the update of an m x n matrix a root-mean-square of
    ``rms`` x lr per entry; 0.2 is that of a typical AdamW update (Liu et al., 2025, "Muon is
    scalable for LLM training"), so one learning rate and schedule serve both optimisers.
    Weight decay is decoupled, as in AdamW.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, weight_decay: float = 0.0,
                 momentum: float = 0.95, ns_steps: int = 5, ns_dtype: torch.dtype = torch.float32,
                 rms: float = ADAMW_UPDATE_RMS) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "ns_steps": ns_steps, "rms": rms})
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon updates matrices only; got a parameter of shape {tuple(p.shape)}")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("rms", ADAMW_UPDATE_RMS)  # optimiser states saved before the option

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, beta = group["lr"], group["momentum"]
            # Tall matrices join the wide ones of the transposed shape (a feed-forward block's
            # 1024 x 256 and 256 x 1024: one batch), stacked contiguous: orthogonalising a
            # transposed view ran 1.4x slower.
            by_shape: dict[torch.Size, list[tuple[torch.Tensor, bool, torch.Tensor]]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - beta)
                update = p.grad.lerp(buf, beta)  # Nesterov
                tall = p.shape[0] > p.shape[1]
                if tall:
                    update = update.mT
                by_shape[update.shape].append((p, tall, update))
            for shape, items in by_shape.items():
                updates = orthogonalize(torch.stack([u for _, _, u in items]), group["ns_steps"], self.ns_dtype)
                scale = group["rms"] * math.sqrt(max(shape))
                for (p, tall, _), update in zip(items, updates):
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(update.mT if tall else update, alpha=-lr * scale)


def transformer_matrices(model: nn.Module) -> list[torch.Tensor]:
    """The weight matrices of ``model.transformer`` (none for the CNN reconstructor's convolutions)."""
    return [p for n, p in model.named_parameters() if n.startswith("transformer.") and p.ndim == 2]


class MuonAdamW:
    """Muon for the transformer's weight matrices, AdamW for everything else.

    The embeddings, the input and output projections, biases and norms stay with AdamW, as
    Muon's authors advise for a network's first and last layers and its vectors. The engine
    sets the rate through :attr:`param_groups` and checkpoints through :meth:`state_dict`.
    """

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, fused: bool | None,
                 ns_dtype: torch.dtype = torch.float32, muon_rms: float = ADAMW_UPDATE_RMS) -> None:
        matrices = transformer_matrices(model)
        taken = {id(p) for p in matrices}
        rest = [p for p in model.parameters() if id(p) not in taken]
        self.muon = Muon(matrices, lr=lr, weight_decay=weight_decay, ns_dtype=ns_dtype, rms=muon_rms)
        self.adamw = torch.optim.AdamW(rest, lr=lr, weight_decay=weight_decay, fused=fused)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.muon.param_groups + self.adamw.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device,
                   name: str = "adamw", muon_rms: float = ADAMW_UPDATE_RMS,
                   ns_dtype: torch.dtype = torch.float32) -> torch.optim.Optimizer | MuonAdamW:
    """The optimiser ``name`` (``adamw`` or ``muon``, whose matrix updates have an RMS of
    ``muon_rms`` x lr, orthogonalised in ``ns_dtype``) over all of ``model``'s parameters.

    A model without transformer matrices (Table 4's CNN reconstructor) gets AdamW alone.

    AdamW runs PyTorch's fused kernel on the CPU and CUDA: one pass over all parameters
    instead of a loop over 174 tensors (an optimiser step of the default model: 37 ms ->
    11 ms on 2 CPU cores, 8% of a training step).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r} (use {', '.join(OPTIMIZERS)})")
    fused = (device.type in ("cpu", "cuda")) or None
    if name == "muon" and transformer_matrices(model):
        return MuonAdamW(model, lr, weight_decay, fused, ns_dtype, muon_rms)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused)
