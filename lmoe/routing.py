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
* sigmoid top-k router (SMoRA; DeepSeek-V3's gate without the renormalisation): ``s = sigmoid(l)``; keep
  the k experts with the largest ``s + b`` (``b``: the balance bias below, 0 if off), gate ``s_i`` there,
  0 elsewhere.
* implicit router (FlyLoRA): no router weights; the layer passes the scores ``|A_i x + b_i|`` of its rank-1
  experts as the "logits"; the k largest get gate 1, the rest 0.
* static router (LoRA Soups' CAT): ``g_i = w_i``, one learned weight per expert and layer for every token.
* balance bias (aux-loss-free balancing, Wang et al. 2024 / DeepSeek-V3): for the top-k routers a bias
  ``b`` (no gradient) is added to the scores used to *select* experts only; after each training forward
  ``b_i += rate * sign(mean_j c_j - c_i)`` with ``c_i`` the number of non-padding tokens that selected i.
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


def route(logits: torch.Tensor, router: str, top_k: int, capacity_factor: float | None = 1.25,
          bias: torch.Tensor | None = None) -> torch.Tensor:
    """Gates ``(T, N)`` from router logits ``(T, N)`` (for 'noisy_topk', logits with the noise already added;
    for 'implicit', the layer's scores). ``bias`` (N,): the balance bias, added to the selection scores only."""
    if router == "softmax":
        return logits.softmax(dim=-1)
    if router in ("topk", "noisy_topk"):
        if bias is None:
            vals, idx = logits.topk(top_k, dim=-1)  # (T, k)
        else:
            idx = (logits + bias).topk(top_k, dim=-1).indices
            vals = logits.gather(-1, idx)
        return torch.zeros_like(logits).scatter(-1, idx, vals.softmax(dim=-1))
    if router == "sigmoid_topk":
        s = logits.sigmoid()
        idx = (s if bias is None else s + bias).topk(top_k, dim=-1).indices
        return torch.zeros_like(logits).scatter(-1, idx, s.gather(-1, idx))
    if router == "implicit":
        idx = logits.topk(top_k, dim=-1).indices  # the bias is inside the scores already
        return torch.zeros_like(logits).scatter(-1, idx, 1.0)
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
    return top_k if router in ("topk", "noisy_topk", "sigmoid_topk", "implicit") else 1


def selection_counts(gates: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) number of (non-padding) tokens whose gate for expert i is nonzero, i.e. that selected i."""
    with torch.no_grad():
        return ((gates != 0).to(torch.float32) * _weights(gates, mask)).sum(0)


def balance_bias_step(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> None:
    """In place: ``b_i += rate * sign(mean(c) - c_i)`` (under-loaded experts up, over-loaded down)."""
    bias.add_(rate * torch.sign(counts.mean() - counts))


def _dispatch(logits: torch.Tensor, k: int, selected: torch.Tensor | None) -> torch.Tensor:
    """(T, N) dispatch weights, rows summing to 1: top-k membership of the logits / k, or, when the actual
    selection differs from the logits' top-k (balance bias, implicit router), ``selected != 0`` / k."""
    if selected is not None:
        return (selected != 0).to(logits.dtype) / k
    idx = logits.topk(k, dim=-1).indices  # (T, k)
    return torch.zeros_like(logits).scatter_(-1, idx, 1.0 / k)


def dispatch_fraction(logits: torch.Tensor, k: int, mask: torch.Tensor | None = None,
                      selected: torch.Tensor | None = None) -> torch.Tensor:
    """``f``: (N,) share of tokens dispatched to each expert (top-k membership / k). No gradient."""
    with torch.no_grad():
        return _masked_mean(_dispatch(logits, k, selected), mask)


def load_balancing_loss(logits: torch.Tensor, k: int, mask: torch.Tensor | None = None,
                        selected: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer balance loss ``N * sum_i f_i P_i`` for one layer (a 0-dim tensor)."""
    n = logits.shape[-1]
    f = dispatch_fraction(logits, k, mask, selected)
    p = _masked_mean(logits.softmax(dim=-1), mask)
    return n * (f * p).sum()


def z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss: mean of ``logsumexp(logits)^2`` over tokens."""
    return _masked_mean(logits.logsumexp(dim=-1).square().unsqueeze(-1), mask).squeeze(-1)


def routing_sums(logits: torch.Tensor, gates: torch.Tensor, k: int, mask: torch.Tensor | None = None,
                 selected: torch.Tensor | None = None) -> dict:
    """Detached per-expert *sums* over tokens, for accumulating statistics across forwards.

    ``load`` (dispatch counts / k), ``gate`` (sum of g), ``entropy`` (sum of the normalised gate entropy
    H(g) / log N) and ``tokens``. Kept as tensors so that accumulating never syncs with the host.
    """
    with torch.no_grad():
        w = _weights(logits, mask)  # (T, 1)
        load = _dispatch(logits, k, selected)
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
