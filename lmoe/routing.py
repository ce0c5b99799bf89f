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
* sparsegen router (LD-MoLE, Sparsegen-lin): ``g = sparsemax(l / (1 - lam))`` with ``lam`` per token from the
  layer's MLP; in the closed form of LD-MoLE's code (``sparsegen_lin``): sort ``l`` descending, the support is
  ``{j : 1 - lam + j l_(j) > sum_{i<=j} l_(i)}`` (size K), ``tau = (sum_{i<=K} l_(i) - 1 + lam) / K``,
  ``g = max(l - tau, 0) / max(1 - lam, eps)``. Sparsity loss: ``relu(lam_k - lam)`` with
  ``lam_k = 1 - (sum_{i<=k} u_(i) - k u_(k+1))``, ``u`` the logits without gradient: the smallest lam at which
  at most k experts are active.
* dynmole router (DynMoLE): ``p = softmax(l)``; ``H = S_q(p + eps) / S_q(uniform)`` the normalised Tsallis
  entropy (``tsallis_entropy``); ``H > threshold``: all experts, ``g = p``; else the experts (by p, descending)
  whose cumulative p is ``<= top_p``, at least the first k, with ``g_i = p_i`` there (not renormalised) and 0
  elsewhere. Entropy loss: mean of H over tokens.
* hard-soft router (LoRA-Mixer, our reading; docs/methods.md): forward values exactly the top-k router's
  (softmax over the k largest logits, zeros elsewhere), backward the gradient of the dense ``softmax(l)``
  (straight-through: ``g = p + stop_grad(topk_gates - p)``), so every expert's logit learns.
  Routing specialisation loss: ``mean_t H(p_t) / log N + 1 - H(mean_t p_t) / log N`` (``specialization_loss``).
* LoRAMoE's localised balancing constraint (``localized_balance_loss``): per sample b and routed expert i the
  importance ``Q_bi = sum_t g_bti`` (non-padding tokens), weighted by ``I_bi = 1 + delta`` where expert i's group
  (the first ``n_world`` experts: world knowledge, task type 1; the rest: downstream, type 0) matches the sample's
  task type, ``1 - delta`` where not, 1 for an unknown type (-1) or no types at all; the loss is the squared
  coefficient of variation ``var(Z) / (mean(Z)^2 + 1e-10)`` of the B*N entries ``Z = Q * I`` (unbiased var;
  0 for a single entry).
* balance bias (aux-loss-free balancing, Wang et al. 2024 / DeepSeek-V3): for the top-k routers a bias
  ``b`` (no gradient) is added to the scores used to *select* experts only; after each training forward
  ``b_i += rate * sign(mean_j c_j - c_i)`` with ``c_i`` the number of non-padding tokens that selected i.
* ``f_i``: fraction of tokens dispatched to expert i (the arg-max for the softmax and switch routers,
  counted *before* capacity drops; for (noisy) top-k, tokens whose top-k set holds i, divided by k; for the
  sparsegen and dynmole routers, whose number of active experts varies, tokens with ``g_i != 0`` divided by the
  mean number of active experts, i.e. ``sum_t [g_ti != 0] / sum_t |S_t|``), so ``sum_i f_i = 1``. No gradient.
* ``P_i``: mean over tokens of the full softmax probability of expert i (also for top-k and switch; for the
  sparsegen router, of its gate ``g_i``, as LD-MoLE's code does).
  The logits are those the gate acted on: for the noisy router in training, ``H`` (noise included).
* Shared (always-on) experts have no logits: they appear in neither f nor P.
* load-balancing loss (Switch Transformer): ``N * sum_i f_i P_i``; 1 when perfectly balanced.
* router z-loss (ST-MoE): mean over tokens of ``logsumexp(l)^2``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


SPARSEGEN_EPS = 1e-2  # LD-MoLE's GlobalSparsegen eps: lam <= 1 - eps
TSALLIS_EPS = 1e-5  # DynMoLE's entropy_eps: added to p before the entropy
CV_EPS = 1e-10  # LoRAMoE's cv_squared eps


def route(logits: torch.Tensor, router: str, top_k: int, capacity_factor: float | None = 1.25,
          bias: torch.Tensor | None = None, *, lam: torch.Tensor | None = None, top_p: float | None = None,
          entropy_threshold: float | None = None, tsallis_q: float | None = None) -> torch.Tensor:
    """Gates ``(T, N)`` from router logits ``(T, N)`` (for 'noisy_topk', logits with the noise already added;
    for 'implicit', the layer's scores). ``bias`` (N,): the balance bias, added to the selection scores only.
    'sparsegen' needs ``lam`` (T,); 'dynmole' needs ``top_p``, ``entropy_threshold`` and ``tsallis_q``."""
    if router == "sparsegen":
        if lam is None:
            raise ValueError("router 'sparsegen' needs lam")
        return sparsegen_lin(logits, lam)
    if router == "dynmole":
        if top_p is None or entropy_threshold is None or tsallis_q is None:
            raise ValueError("router 'dynmole' needs top_p, entropy_threshold and tsallis_q")
        return dynmole_gates(logits, top_k, top_p, entropy_threshold, tsallis_q)
    if router == "softmax":
        return logits.softmax(dim=-1)
    if router == "hard_soft":
        return hard_soft_gates(logits, top_k)
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


def hard_soft_gates(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """LoRA-Mixer's hard-soft gates (our reading): the values of the top-k router (softmax over the k largest
    logits, 0 elsewhere), the gradient of the dense ``p = softmax(l)``: ``p + (topk_gates - p).detach()``."""
    p = logits.softmax(dim=-1)
    vals, idx = logits.topk(top_k, dim=-1)
    hard = torch.zeros_like(logits).scatter(-1, idx, vals.softmax(dim=-1))
    return p + (hard - p).detach()


def specialization_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """LoRA-Mixer's routing specialisation loss of one layer (our reading, a 0-dim tensor): with ``p = softmax(l)``,
    ``mean_t H(p_t) / log N + 1 - H(mean_t p_t) / log N`` over the (non-padding) tokens, ``H(p) = -sum p log p``;
    in [0, 2], 0 when every token picks one expert with certainty and the experts are used equally. 0 for N = 1."""
    n = logits.shape[-1]
    if n == 1:
        return logits.new_zeros(())
    p = logits.softmax(dim=-1)
    token = -torch.special.xlogy(p, p).sum(dim=-1, keepdim=True)  # (T, 1)
    mean_p = _masked_mean(p, mask)  # (N,)
    marginal = -torch.special.xlogy(mean_p, mean_p).sum()
    return (_masked_mean(token, mask).squeeze(-1) + math.log(n) - marginal) / math.log(n)


def cv_squared(x: torch.Tensor, eps: float = CV_EPS) -> torch.Tensor:
    """LoRAMoE's ``cv_squared``: ``var(x) / (mean(x)^2 + eps)`` of a flat tensor (unbiased var, in float32 or
    wider); 0 for a single entry."""
    x = x.reshape(-1)
    if x.numel() == 1:
        return x.new_zeros(())
    x = x.float() if x.dtype not in (torch.float32, torch.float64) else x
    return x.var() / (x.mean() ** 2 + eps)


def localized_balance_loss(gates: torch.Tensor, batch_size: int, n_world: int, delta: float,
                           task_type: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """LoRAMoE's localised balancing constraint of one layer (a 0-dim tensor), without its weight.

    ``gates`` (B*S, N) are the routed gates of B samples of S tokens, batch-major; ``task_type`` (B,) holds 1
    (world knowledge: the first ``n_world`` experts), 0 (downstream tasks: the others) or -1 (unknown: weight 1);
    ``None``: every weight 1, i.e. the plain CV^2 of the importance. ``mask`` (B*S,) drops padding from Q."""
    t, n = gates.shape
    if t % batch_size:
        raise ValueError(f"cannot split {t} routed tokens into {batch_size} samples")
    g = gates if mask is None else gates * mask.reshape(-1, 1).to(gates.dtype)
    q = g.reshape(batch_size, t // batch_size, n).sum(dim=1)  # (B, N) importance per sample and expert
    if task_type is not None:
        tt = task_type.reshape(-1, 1).to(q.device)  # (B, 1)
        world = torch.arange(n, device=q.device).unsqueeze(0) < n_world  # (1, N)
        match = torch.where(world, tt == 1, tt == 0)  # (B, N)
        weight = torch.where(match, 1.0 + delta, 1.0 - delta).to(q.dtype)
        known = (tt == 0) | (tt == 1)
        q = q * torch.where(known, weight, torch.ones_like(weight))
    return cv_squared(q)


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


def sparsegen_lin(logits: torch.Tensor, lam: torch.Tensor, eps: float = SPARSEGEN_EPS) -> torch.Tensor:
    """Sparsegen-lin gates ``sparsemax(l / (1 - lam))`` (T, N), in the closed form of LD-MoLE's
    ``GlobalSparsegen._compute_prob``; ``lam`` (T,) or (T, 1). Differentiable in both (a.e.)."""
    n = logits.shape[-1]
    lam = lam.reshape(-1, 1)
    z = logits.sort(dim=-1, descending=True).values  # (T, N)
    j = torch.arange(1, n + 1, device=logits.device, dtype=logits.dtype)
    support = (1 - lam + j * z > z.cumsum(dim=-1)).to(logits.dtype)  # (T, N), a prefix of the sorted experts
    size = support.sum(dim=-1, keepdim=True).clamp_min(1)
    tau = ((support * z).sum(dim=-1, keepdim=True) - 1 + lam) / size  # (T, 1)
    return (logits - tau).clamp(min=0) / (1 - lam).clamp(min=eps)


def sparsity_lower_bound(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(T,) ``lam_k = 1 - (sum_{i<=k} u_(i) - k u_(k+1))`` of the detached logits: with ``lam >= lam_k`` the
    sparsegen router activates at most k experts (LD-MoLE's ``lambda_interval_k`` lower end). ``-inf`` when
    k >= N (no constraint)."""
    u = logits.detach()
    if k >= u.shape[-1]:
        return torch.full(u.shape[:-1], -math.inf, device=u.device, dtype=u.dtype)
    top = u.topk(k + 1, dim=-1).values  # (T, k+1), descending
    return 1.0 - (top[:, :k].sum(dim=-1) - k * top[:, k])


def sparsity_loss(logits: torch.Tensor, lam: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """LD-MoLE's sparsity loss of one layer: mean over tokens of ``relu(lam_k(l) - lam)`` (a 0-dim tensor)."""
    gap = torch.relu(sparsity_lower_bound(logits, k) - lam.reshape(-1))
    return _masked_mean(gap.unsqueeze(-1), mask).squeeze(-1)


def tsallis_entropy(p: torch.Tensor, q: float, eps: float = TSALLIS_EPS) -> torch.Tensor:
    """(T,) normalised Tsallis entropy of the rows of p, as DynMoLE's ``tsallis_entropy``:
    ``S_q(p + eps) / S_q(uniform)`` with ``S_q(p) = (1 - sum_i p_i^q) / (q - 1)`` and
    ``S_q(uniform) = (1 - N^(1-q)) / (q - 1)``; q = 1: Shannon, ``-sum p log p / log N``. 0 for N = 1."""
    n = p.shape[-1]
    if n == 1:
        return p.new_zeros(p.shape[:-1])
    p = p + eps
    if q == 1.0:
        return -torch.special.xlogy(p, p).sum(dim=-1) / math.log(n)  # = p log p, and 0 at p = 0
    return (1 - p.pow(q).sum(dim=-1)) / (1 - n ** (1 - q))  # the two (q - 1) cancel


def dynmole_gates(logits: torch.Tensor, top_k: int, top_p: float, threshold: float, q: float) -> torch.Tensor:
    """DynMoLE's hybrid gates (T, N): ``p = softmax(l)`` on every expert for a token whose normalised Tsallis
    entropy exceeds ``threshold`` (never when threshold >= 1), else ``p`` on the experts, largest p first, whose
    cumulative p is ``<= top_p``, and on the first ``top_k`` whatever their sum; 0 elsewhere; not renormalised."""
    p = logits.softmax(dim=-1)
    sorted_p, idx = p.sort(dim=-1, descending=True)
    keep_sorted = sorted_p.cumsum(dim=-1) <= top_p
    keep_sorted[:, :top_k] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)  # (T, N) bool
    if threshold < 1.0:
        keep = keep | (tsallis_entropy(p, q) > threshold).unsqueeze(-1)
    return p * keep


def entropy_loss(logits: torch.Tensor, q: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """DynMoLE's auxiliary loss of one layer: mean over tokens of the normalised Tsallis entropy of softmax(l)."""
    return _masked_mean(tsallis_entropy(logits.softmax(dim=-1), q).unsqueeze(-1), mask).squeeze(-1)


def noisy_logits(logits: torch.Tensor, noise_logits: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Shazeer et al. (2017) eq. 4: ``H = W_g x + softplus(W_noise x) * eps``; all (T, N)."""
    return logits + F.softplus(noise_logits) * eps


def dispatch_k(router: str, top_k: int) -> int | None:
    """k of the dispatch fraction f: ``top_k`` for the top-k routers, 1 (the arg-max) for softmax and switch,
    None (the mean number of active experts, from the gates) for the sparsegen and dynmole routers."""
    if router in ("sparsegen", "dynmole"):
        return None
    return top_k if router in ("topk", "noisy_topk", "sigmoid_topk", "implicit", "hard_soft") else 1


def selection_counts(gates: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) number of (non-padding) tokens whose gate for expert i is nonzero, i.e. that selected i."""
    with torch.no_grad():
        return ((gates != 0).to(torch.float32) * _weights(gates, mask)).sum(0)


def balance_bias_step(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> None:
    """In place: ``b_i += rate * sign(mean(c) - c_i)`` (under-loaded experts up, over-loaded down)."""
    bias.add_(rate * torch.sign(counts.mean() - counts))


def _dispatch(logits: torch.Tensor, k: int | None, selected: torch.Tensor | None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """(T, N) dispatch weights, rows summing to 1: top-k membership of the logits / k, or, when the actual
    selection differs from the logits' top-k (balance bias, implicit router), ``selected != 0`` / k.
    ``k=None`` (a varying number of active experts): ``selected != 0`` divided by its mean row count over the
    (non-padding) tokens, so that the masked mean over tokens is ``sum_t [g_ti != 0] / sum_t |S_t|``."""
    if k is None:
        if selected is None:
            raise ValueError("a varying dispatch (k=None) needs the selected gates")
        active = (selected != 0).to(logits.dtype)
        return active / _masked_mean(active.sum(dim=-1, keepdim=True), mask).clamp_min(1.0)
    if selected is not None:
        return (selected != 0).to(logits.dtype) / k
    idx = logits.topk(k, dim=-1).indices  # (T, k)
    return torch.zeros_like(logits).scatter_(-1, idx, 1.0 / k)


def dispatch_fraction(logits: torch.Tensor, k: int | None, mask: torch.Tensor | None = None,
                      selected: torch.Tensor | None = None) -> torch.Tensor:
    """``f``: (N,) share of tokens dispatched to each expert (top-k membership / k). No gradient."""
    with torch.no_grad():
        return _masked_mean(_dispatch(logits, k, selected, mask), mask)


def load_balancing_loss(logits: torch.Tensor, k: int | None, mask: torch.Tensor | None = None,
                        selected: torch.Tensor | None = None, probs: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer balance loss ``N * sum_i f_i P_i`` for one layer (a 0-dim tensor). ``P`` is the mean
    of ``softmax(logits)``, or of ``probs`` (T, N) when given (the sparsegen router's gates)."""
    n = logits.shape[-1]
    f = dispatch_fraction(logits, k, mask, selected)
    p = _masked_mean(logits.softmax(dim=-1) if probs is None else probs, mask)
    return n * (f * p).sum()


def z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss: mean of ``logsumexp(logits)^2`` over tokens."""
    return _masked_mean(logits.logsumexp(dim=-1).square().unsqueeze(-1), mask).squeeze(-1)


def routing_sums(logits: torch.Tensor, gates: torch.Tensor, k: int | None, mask: torch.Tensor | None = None,
                 selected: torch.Tensor | None = None) -> dict:
    """Detached per-expert *sums* over tokens, for accumulating statistics across forwards.

    ``load`` (dispatch counts / k), ``gate`` (sum of g), ``entropy`` (sum of the normalised gate entropy
    H(g) / log N) and ``tokens``. Kept as tensors so that accumulating never syncs with the host.
    """
    with torch.no_grad():
        w = _weights(logits, mask)  # (T, 1)
        load = _dispatch(logits, k, selected, mask)
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
