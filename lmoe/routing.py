"""Routing policies and routing losses, as pure functions of the router logits.

The layer (``lmoe.layer``) computes ``W0 x + s * sum_i g_i B_i A_i x`` given gates ``g``; this file
produces ``g`` from the logits and turns logits into losses and statistics. Everything here is in
float32 and takes flat ``(T, N)`` tensors, with an optional boolean ``mask`` of shape ``(T,)`` that
drops padding tokens from every average.

Definitions (docs/method.md states the same):

* softmax router: ``g = softmax(l)``.
* top-k router: keep the k largest logits, softmax over them, zeros elsewhere.
* noisy top-k router (Shazeer et al. 2017): the layer replaces ``l`` by ``H = l + softplus(l_noise) * eps``,
  ``eps ~ N(0, 1)``, in training mode only (``noisy_logits``); then exactly the top-k router on ``H``.
* switch router (Fedus et al. 2021): top-1 with gate ``g_i = softmax(l)_i`` for ``i = argmax l`` (not
  renormalised, so the router gets a gradient), then expert capacity: with T tokens in the forward and N
  experts, ``C = ceil(capacity_factor * T / N)``; token t keeps its gate iff it is among the first C
  tokens (in flattened batch order) whose arg-max is i, else its gate is 0 (dropped: the layer gives
  ``W0 x`` for it). ``capacity_factor=None``: no limit.
* ``f_i``: fraction of tokens dispatched to expert i (the arg-max for the softmax and switch routers,
  counted *before* capacity drops; for (noisy) top-k, tokens whose top-k set holds i, divided by k), so
  ``sum_i f_i = 1``. No gradient.
* ``P_i``: mean over tokens of the full softmax probability of expert i (also for top-k and switch).
  The logits are those the gate acted on: for the noisy router in training, ``H`` (noise included).
* Shared (always-on) experts have no logits: they appear in neither f nor P.
* load-balancing loss (Switch Transformer): ``N * sum_i f_i P_i``; 1 when perfectly balanced.
* router z-loss (ST-MoE): mean over tokens of ``logsumexp(l)^2``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def route(logits: torch.Tensor, router: str, top_k: int, capacity_factor: float | None = 1.25) -> torch.Tensor:
    """Gates ``(T, N)`` from router logits ``(T, N)`` (for 'noisy_topk', logits with the noise already added)."""
    if router == "softmax":
        return logits.softmax(dim=-1)
    if router in ("topk", "noisy_topk"):
        vals, idx = logits.topk(top_k, dim=-1)  # (T, k)
        return torch.zeros_like(logits).scatter(-1, idx, vals.softmax(dim=-1))
    if router == "switch":
        return switch_gates(logits, capacity_factor)
    raise ValueError(f"unknown router {router!r}")


def switch_gates(logits: torch.Tensor, capacity_factor: float | None) -> torch.Tensor:
    """Top-1 gates ``softmax(l)_i`` at the arg-max, zeroed for tokens beyond their expert's capacity."""
    t, n = logits.shape
    idx = logits.topk(1, dim=-1).indices  # (T, 1), the same choice as dispatch_fraction's
    keep = torch.zeros_like(logits).scatter_(-1, idx, 1.0)  # (T, N) one-hot
    if capacity_factor is not None:
        capacity = math.ceil(capacity_factor * t / n)
        position = keep.cumsum(dim=0) * keep  # (T, N): 1-based place of each token in its expert's queue
        keep = keep * (position <= capacity)
    return logits.softmax(dim=-1) * keep


def noisy_logits(logits: torch.Tensor, noise_logits: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Shazeer et al. (2017) eq. 4: ``H = W_g x + softplus(W_noise x) * eps``; all (T, N)."""
    return logits + F.softplus(noise_logits) * eps


def dispatch_k(router: str, top_k: int) -> int:
    """k of the dispatch fraction f: ``top_k`` for the top-k routers, 1 (the arg-max) for softmax and switch."""
    return top_k if router in ("topk", "noisy_topk") else 1


def dispatch_fraction(logits: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``f``: (N,) share of tokens dispatched to each expert (top-k membership / k). No gradient."""
    with torch.no_grad():
        idx = logits.topk(k, dim=-1).indices  # (T, k)
        onehot = torch.zeros_like(logits).scatter_(-1, idx, 1.0 / k)  # (T, N), rows sum to 1
        return _masked_mean(onehot, mask)


def load_balancing_loss(logits: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer balance loss ``N * sum_i f_i P_i`` for one layer (a 0-dim tensor)."""
    n = logits.shape[-1]
    f = dispatch_fraction(logits, k, mask)
    p = _masked_mean(logits.softmax(dim=-1), mask)
    return n * (f * p).sum()


def z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss: mean of ``logsumexp(logits)^2`` over tokens."""
    return _masked_mean(logits.logsumexp(dim=-1).square().unsqueeze(-1), mask).squeeze(-1)


def routing_sums(logits: torch.Tensor, gates: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> dict:
    """Detached per-expert *sums* over tokens, for accumulating statistics across forwards.

    ``load`` (dispatch counts / k), ``gate`` (sum of g), ``entropy`` (sum of the normalised gate entropy
    H(g) / log N) and ``tokens``. Kept as tensors so that accumulating never syncs with the host.
    """
    with torch.no_grad():
        w = _weights(logits, mask)  # (T, 1)
        idx = logits.topk(k, dim=-1).indices
        load = torch.zeros_like(logits).scatter_(-1, idx, 1.0 / k)
        n = gates.shape[-1]
        ent = -(gates * gates.clamp_min(1e-20).log()).sum(-1, keepdim=True)  # (T, 1)
        ent = ent / math.log(n) if n > 1 else torch.zeros_like(ent)
        return {
            "load": (load * w).sum(0),
            "gate": (gates.float() * w).sum(0),
            "entropy": (ent * w).sum(),
            "tokens": w.sum(),
        }


def _weights(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.new_ones(x.shape[0], 1)
    return mask.reshape(-1, 1).to(x.dtype)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the token dimension of ``x`` (T, C) -> (C,), counting only tokens where mask is True."""
    if mask is None:
        return x.mean(dim=0)
    w = _weights(x, mask)
    return (x * w).sum(0) / w.sum().clamp_min(1.0)
