"""LMoELinear: a frozen Linear plus a per-token mixture of N LoRA experts.

    y = W0 x + b + s * dW(x) x,        s = alpha / r,   g = gate(W_g x) in float32

    delta:  dW = sum_i g_i B_i A_i
    factor: dW = (sum_i g_i B_i) (sum_i g_i A_i)      (has the cross terms B_i A_j)

Both are two GEMMs over the stacked experts (A as (N*r, d_in), B as (d_out, N*r)) and one
elementwise product on the (T, N*r) activation; there is no Python loop over experts and no
per-token d_out x d_in matrix:

    h = x A^T                              # (T, N*r): every expert's A_i x at once
    delta:  z_i = s g_i h_i                # scale each rank-r block by its gate
    factor: u = sum_i g_i h_i;  z_i = s g_i u
    y_delta = z B^T                        # (T, d_out)

Variants, all still these two GEMMs (the gates vector ``g`` is the only thing the router hands over):
* ``shared_experts=S``: S always-on experts are S extra rank blocks *after* the N routed ones in the same
  stacked ``lora_A`` / ``lora_B`` (shapes (N+S, r, d_in), (N+S, d_out, r)); their gates are fixed to 1,
  so the mixture sees ``[g_1..g_N, 1..1]``. The router stays (N, d_in): shared experts have no logits.
* ``share_A`` (HydraLoRA): ``lora_A`` is (1, r, d_in), one A for all experts; ``h = x A^T`` is (T, r),
  computed once and broadcast to the N+S blocks in the gating (its gradient sums over the blocks).
* ``router="noisy_topk"`` adds ``router_noise`` (a second float32 ``nn.Linear(d_in, N)``, initialised to
  zero as in Shazeer et al. 2017, saved as ``router_noise.weight``): in training mode the logits become
  ``W_g x + softplus(W_noise x) * eps`` with ``eps ~ N(0, 1)`` drawn from ``noise_generator`` (None: the
  global RNG, which activation checkpointing replays); the draw is kept in ``last_noise``. Eval is
  deterministic (no noise).

Non-obvious choices:
* ``mixture`` is a custom autograd Function that saves x, h and the gates and recomputes z in backward:
  one (T, N*r) activation per layer, like a LoRA of rank N*r (plain autograd would keep h and z).
  ``mixture_reference`` is the same maths in plain autograd; tests hold the two equal.
* ``lora_B`` is exposed with shape (N, d_out, r) but *stored* as (d_out, N, r) (a permuted view),
  so that ``B.permute(1, 0, 2).reshape(d_out, N*r)`` is a free view and no forward re-lays out the
  weights. Optimizers, ``state_dict`` and ``load_state_dict`` keep that layout; if someone replaces the
  tensor, ``reshape`` silently copies and the result is unchanged.
* The router runs in float32 with autocast disabled; the experts run in the model dtype.
* The base layer is called, never re-implemented, so any Linear subclass (quantised ones too) works.
* ``router="sparsegen"`` (LD-MoLE) adds ``sparsegen_mlp`` (float32 ``Linear(d_in, H)``, ReLU, ``Linear(H, 1)``;
  saved as ``sparsegen_mlp.{0,2}.{weight,bias}``) that predicts ``lam = logsigmoid(mlp(x)) + 1 - eps`` per
  token (kept in ``last_lambda``); with ``sparsegen_shared`` the model gives all routed layers of one input
  width the MLP of the first of them (``share_sparsegen_of``). As in LD-MoLE's code, this router and its MLP
  read the *dropped-out* input, the same draw as the experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TOPK_ROUTERS, LMoEConfig
from .routing import SPARSEGEN_EPS, noisy_logits, route


def mixture_reference(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gates: torch.Tensor, scaling: float,
                      composition: str = "delta") -> torch.Tensor:
    """The mixture update ``s * dW(x) x`` in plain autograd (the readable reference for ``mixture``).

    x: (T, d_in); A: (N*r, d_in), or (r, d_in) for one shared A; B: (d_out, N*r); gates: (T, N) in x's
    dtype. Returns (T, d_out).
    """
    t, n = gates.shape
    h = (x @ A.t()).view(t, -1, B.shape[1] // n)  # (T, N, r), or (T, 1, r) for a shared A
    g = (gates * scaling).unsqueeze(-1)  # (T, N, 1)
    if composition == "delta":
        z = h * g  # (T, N, r)
    elif composition == "factor":
        u = (h * gates.unsqueeze(-1)).sum(dim=1, keepdim=True)  # (T, 1, r) = (sum_j g_j A_j) x
        z = g * u  # (T, N, r)
    else:
        raise ValueError(f"unknown composition {composition!r}")
    return z.reshape(t, -1) @ B.t()  # (T, d_out)


class _Mixture(torch.autograd.Function):
    """Fused mixture: saves x, h = x A^T and the gates, and recomputes the gated activation z in backward.

    Plain autograd keeps both h and z (two (T, N*r) tensors) per layer; this keeps one, i.e. the same
    activation memory as a LoRA of rank N*r. Same two GEMMs forward, four backward.
    """

    @staticmethod
    def forward(ctx, x, A, B, gates, scaling: float, factor: bool):
        t, n = gates.shape
        h = x @ A.t()  # (T, N*r), or (T, r) for a shared A
        z, u = _gate(h.view(t, -1, B.shape[1] // n), gates, scaling, factor)
        ctx.save_for_backward(x, A, B, h, gates, u)
        ctx.scaling, ctx.factor = scaling, factor
        return z.view(t, -1) @ B.t()  # (T, d_out)

    @staticmethod
    def backward(ctx, dy):
        x, A, B, h, gates, u = ctx.saved_tensors
        s, factor = ctx.scaling, ctx.factor
        t, n = gates.shape
        dz = (dy @ B).view(t, n, -1)  # (T, N, r)
        hv = h.view(t, -1, dz.shape[-1])  # (T, N, r), or (T, 1, r) for a shared A
        dB = dA = dx = dg = None
        if ctx.needs_input_grad[2]:
            z, _ = _gate(hv, gates, s, factor)  # recomputed instead of stored
            dB = dy.t() @ z.view(t, -1)  # (d_out, N*r)
        g = gates.unsqueeze(-1)  # (T, N, 1)
        if factor:
            # z_i = s g_i u,  u = sum_j g_j h_j
            du = s * (dz * g).sum(dim=1, keepdim=True)  # (T, 1, r)
            dh = g * du  # (T, N, r)
            dg = s * (dz * u).sum(-1) + (hv * du).sum(-1)  # (T, N)
        else:
            # z_i = s g_i h_i
            dh = dz * (s * g)
            dg = s * (dz * hv).sum(-1)
        if hv.shape[1] != n:
            dh = dh.sum(dim=1)  # (T, r): the shared A was broadcast to every block
        dh = dh.reshape(t, -1)  # (T, N*r)
        if ctx.needs_input_grad[1]:
            dA = dh.t() @ x  # (N*r, d_in)
        if ctx.needs_input_grad[0]:
            dx = dh @ A  # (T, d_in)
        return dx, dA, dB, dg, None, None


def _gate(h: torch.Tensor, gates: torch.Tensor, scaling: float, factor: bool):
    """z (T, N, r) from h (T, N, r): delta z_i = s g_i h_i; factor z_i = s g_i sum_j g_j h_j (u returned)."""
    g = gates.unsqueeze(-1)  # (T, N, 1)
    if factor:
        u = (h * g).sum(dim=1, keepdim=True)  # (T, 1, r)
        return (scaling * g) * u, u
    return h * (scaling * g), None


def mixture(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gates: torch.Tensor, scaling: float,
            composition: str = "delta") -> torch.Tensor:
    """``s * dW(x) x`` for flat inputs with the fused autograd Function (same values as ``mixture_reference``).

    x: (T, d_in); A: (N*r, d_in), or (r, d_in) for one shared A; B: (d_out, N*r); gates: (T, N); all in
    one dtype. Returns (T, d_out).
    """
    if composition not in ("delta", "factor"):
        raise ValueError(f"unknown composition {composition!r}")
    return _Mixture.apply(x, A, B, gates, scaling, composition == "factor")


class LMoELinear(nn.Module):
    """Wraps ``base_layer`` (kept, frozen, and called as is) with an L-MoE adapter.

    ``num_experts`` routed experts (default: the config's largest count) and ``shared_experts`` always-on
    ones (default: the config's). ``num_experts=0, shared_experts=1`` is a plain LoRA (``lora_modules``).
    """

    def __init__(self, base_layer: nn.Module, config: LMoEConfig, num_experts: int | None = None,
                 shared_experts: int | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.num_experts = n = config.max_experts if num_experts is None else num_experts  # routed experts
        self.shared_experts = s = config.shared_experts if shared_experts is None else shared_experts
        if n + s < 1:
            raise ValueError("LMoELinear needs at least one routed or shared expert")
        self.rank = r = config.rank
        self.scaling = config.scaling
        self.disabled = False
        w = getattr(base_layer, "weight", None)
        device = w.device if w is not None else None
        dtype = w.dtype if w is not None and w.dtype.is_floating_point else torch.float32
        kw = dict(device=device, dtype=dtype)
        shared_ab = config.core_experts  # CoMoL: one A and one B, the experts are r x r cores
        n_a = 1 if (config.share_A or shared_ab) else n + s  # A blocks
        n_b = 1 if shared_ab else n + s
        self.lora_A = nn.Parameter(torch.empty(n_a, r, self.in_features, **kw),
                                   requires_grad=config.frozen_sparse_A is None)
        # (n_b, d_out, r) stored as (d_out, n_b, r): see the module docstring.
        self.lora_B = nn.Parameter(torch.empty(self.out_features, n_b, r, **kw).permute(1, 0, 2))
        self.lora_C = nn.Parameter(torch.empty(n + s, r, r, **kw)) if shared_ab else None
        learned = n > 0 and config.router not in ("implicit", "static")
        f32 = dict(device=device, dtype=torch.float32)
        self.router = nn.Linear(self.in_features, n, bias=False, **f32) if learned else None
        self.router_noise = (nn.Linear(self.in_features, n, bias=False, **f32)
                             if learned and config.router == "noisy_topk" else None)
        self.static_gate = (nn.Parameter(torch.ones(n, **f32)) if n > 0 and config.router == "static" else None)
        h = config.sparsegen_hidden
        self.sparsegen_mlp = (nn.Sequential(nn.Linear(self.in_features, h, **f32), nn.ReLU(), nn.Linear(h, 1, **f32))
                              if learned and config.router == "sparsegen" else None)
        if n > 0 and config.balance_bias_rate > 0:
            self.register_buffer("routing_bias", torch.zeros(n, **f32))
        else:
            self.routing_bias = None
        self.noise_generator: torch.Generator | None = None  # for the noisy router; None: the global RNG
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.reset_parameters()
        self.last_routing: tuple[torch.Tensor, torch.Tensor] | None = None  # (logits, routed gates), overwritten
        self.last_noise: torch.Tensor | None = None  # (T, N) eps of the last noisy training forward
        self.last_lambda: torch.Tensor | None = None  # (T,) sparsegen lam of the last forward
        # shared_router_modules: a follower reuses its owner's gates (a plain attribute, not a submodule)
        self.router_owner: LMoELinear | None = None
        self.sparsegen_owner: LMoELinear | None = None  # sparsegen_shared: whose lam MLP this layer uses
        self._route_dropped = config.router == "sparsegen"  # LD-MoLE routes on the dropped-out input
        self._factor = config.composition == "factor"
        self._plain_softmax = config.router == "softmax" and n > 0 and s == 0  # the inference path's own gate

    def share_router_of(self, owner: "LMoELinear") -> None:
        """Reuse ``owner``'s gates (it must run first in every forward); drops this layer's own router."""
        if owner.num_experts != self.num_experts:
            raise ValueError(f"cannot share a router of {owner.num_experts} experts with a layer of {self.num_experts}")
        self.router = self.router_noise = self.routing_bias = self.sparsegen_mlp = None
        object.__setattr__(self, "router_owner", owner)  # a plain reference: not a submodule, not saved

    def share_sparsegen_of(self, owner: "LMoELinear") -> None:
        """Use ``owner``'s lam MLP (same input width); drops this layer's own (sparsegen_shared)."""
        if owner.sparsegen_mlp is None or owner.in_features != self.in_features:
            raise ValueError(f"cannot share a lam MLP of a layer with in_features={owner.in_features} "
                             f"(and an MLP of its own: {owner.sparsegen_mlp is not None}) with in_features="
                             f"{self.in_features}")
        self.sparsegen_mlp = None
        object.__setattr__(self, "sparsegen_owner", owner)  # a plain reference: not a submodule, not saved

    @property
    def routed(self) -> bool:
        """Whether this layer's own router produces per-token gates (losses and statistics come from it)."""
        return self.num_experts > 0 and self.router_owner is None and self.config.router != "static"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        c = self.config
        if c.frozen_sparse_A is not None:
            # FlyLoRA: each row keeps max(1, int(density * d_in)) random entries from N(0, 1/R^2), R = N*r rows.
            a = self.lora_A.view(-1, self.in_features)
            a.zero_()
            nnz = max(1, int(self.in_features * c.frozen_sparse_A))
            for row in a:
                idx = torch.randperm(self.in_features, device=a.device)[:nnz]
                row[idx] = torch.randn(nnz, device=a.device, dtype=a.dtype) / a.shape[0]
        else:
            # A like nn.Linear (fan_in = d_in for each expert), B = 0: the wrapped model starts equal to the base.
            nn.init.kaiming_uniform_(self.lora_A.view(-1, self.in_features), a=math.sqrt(5))
        self.lora_B.zero_()
        if self.lora_C is not None:
            self.lora_C.copy_(torch.eye(self.rank).expand_as(self.lora_C))  # each core starts as the identity
        if self.router is not None:
            if c.router_init_std is not None:
                nn.init.normal_(self.router.weight, std=c.router_init_std)
            else:
                self.router.reset_parameters()
        if self.router_noise is not None:
            self.router_noise.weight.zero_()  # Shazeer et al. 2017: noise std softplus(0) = log 2 at the start
        if self.static_gate is not None:
            self.static_gate.fill_(1.0)  # CAT starts from the sum (concatenation) of the experts
        if self.sparsegen_mlp is not None:
            # LD-MoLE's init "kaiming": weights like nn.Linear, every bias -2.5 (lam about -1.6 at the start).
            for lin in (self.sparsegen_mlp[0], self.sparsegen_mlp[2]):
                nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5))
                nn.init.constant_(lin.bias, -2.5)
        if self.routing_bias is not None:
            self.routing_bias.zero_()

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) / .half() / .double() convert everything; the gate stays float32.
        super()._apply(fn, recurse)
        for r in (self.router, self.router_noise, self.sparsegen_mlp):
            if r is not None and any(p.dtype != torch.float32 for p in r.parameters()):
                r.float()
        for name in ("static_gate", "routing_bias"):
            t = getattr(self, name)
            if t is not None and t.dtype != torch.float32:
                t.data = t.data.float()
        return self

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors an adapter file holds for this layer, by key suffix (the order is the file's)."""
        out = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        for key, t in (("lora_C", self.lora_C), ("router.weight", self.router and self.router.weight),
                       ("router_noise.weight", self.router_noise and self.router_noise.weight),
                       ("static_gate", self.static_gate), ("routing_bias", self.routing_bias)):
            if t is not None:
                out[key] = t
        if self.sparsegen_mlp is not None:
            out.update({f"sparsegen_mlp.{k}": v for k, v in self.sparsegen_mlp.named_parameters()})
        return out

    def adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Full shapes of ``adapter_tensors`` from the layer's sizes (the live tensors may be FSDP shards)."""
        n, s, r, c = self.num_experts, self.shared_experts, self.rank, self.config
        shapes = {"lora_A": (1 if (c.share_A or c.core_experts) else n + s, r, self.in_features),
                  "lora_B": (1 if c.core_experts else n + s, self.out_features, r)}
        if self.lora_C is not None:
            shapes["lora_C"] = (n + s, r, r)
        if self.router is not None:
            shapes["router.weight"] = (n, self.in_features)
        if self.router_noise is not None:
            shapes["router_noise.weight"] = (n, self.in_features)
        if self.static_gate is not None:
            shapes["static_gate"] = (n,)
        if self.routing_bias is not None:
            shapes["routing_bias"] = (n,)
        if self.sparsegen_mlp is not None:
            h = c.sparsegen_hidden
            shapes.update({"sparsegen_mlp.0.weight": (h, self.in_features), "sparsegen_mlp.0.bias": (h,),
                           "sparsegen_mlp.2.weight": (1, h), "sparsegen_mlp.2.bias": (1,)})
        return shapes

    def router_logits(self, x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """(T, N) float32 logits of the gate (or of ``w``, e.g. the noise router) for flat input x (T, d_in)."""
        w = self.router.weight if w is None else w
        if x.dtype == w.dtype and not torch.is_autocast_enabled(x.device.type):
            return F.linear(x, w)  # the common fp32 case: no casts, no context switch
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), w.float())

    def sparsity(self, x: torch.Tensor) -> torch.Tensor:
        """(T,) float32 ``lam = logsigmoid(W2 relu(W1 x + b1) + b2) + 1 - eps`` (LD-MoLE), in (-inf, 1 - eps]."""
        mlp = self.sparsegen_mlp if self.sparsegen_owner is None else self.sparsegen_owner.sparsegen_mlp
        w1, b1, w2, b2 = mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias
        if self.sparsegen_owner is not None and (hasattr(w1, "device_mesh") or w1.dim() != 2
                                                 or w1.untyped_storage().nbytes() == 0):
            raise RuntimeError("sparsegen_shared=True: this layer uses the lam MLP of another layer, which is sharded "
                               "here (FSDP shards per decoder layer); set sparsegen_shared=False or use DDP")
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(w1.dtype)
            out = F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)  # (T, 1)
            return (F.logsigmoid(out) + (1 - SPARSEGEN_EPS)).squeeze(-1)

    def gates(self, flat: torch.Tensor) -> torch.Tensor:
        """Routed gates (T, N) float32 for flat input (T, d_in); records ``last_routing`` for the losses."""
        c, t = self.config, flat.shape[0]
        if self.num_experts == 0:
            return flat.new_zeros(t, 0, dtype=torch.float32)
        if self.router_owner is not None:
            owned = self.router_owner.last_routing
            if owned is None or owned[1].shape[0] != t:
                raise RuntimeError("a layer sharing its router (shared_router_modules) ran before the layer that "
                                   "owns the router in this forward")
            return owned[1]
        if c.router == "static":
            return self.static_gate.expand(t, -1)
        if c.router == "implicit":
            with torch.no_grad():  # FlyLoRA's routing has no gradient: selection by |A_i x + b_i|
                h = self.router_logits(flat, self.lora_A.view(-1, self.in_features))  # (T, N): rank-1 experts
                logits = (h + self.routing_bias if self.routing_bias is not None else h).abs()
            gates = route(logits, "implicit", c.top_k)
        elif c.router == "sparsegen":
            logits = self.router_logits(flat)  # (T, N) float32
            self.last_lambda = lam = self.sparsity(flat)
            gates = route(logits, "sparsegen", c.top_k, lam=lam)
        elif c.router == "dynmole":
            logits = self.router_logits(flat)
            gates = route(logits, "dynmole", c.top_k, top_p=c.top_p, entropy_threshold=c.entropy_threshold,
                          tsallis_q=c.tsallis_q)
        else:
            logits = self.router_logits(flat)  # (T, N) float32
            if self.router_noise is not None and self.training:
                eps = torch.randn(logits.shape, generator=self.noise_generator, device=logits.device,
                                  dtype=logits.dtype)
                logits = noisy_logits(logits, self.router_logits(flat, self.router_noise.weight), eps)
                self.last_noise = eps
            gates = route(logits, c.router, c.top_k, c.capacity_factor, self.routing_bias)
        self.last_routing = (logits, gates)
        return gates

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) for the mixture: A ((N+S)*r or r, d_in), B (d_out, (N+S)*r); views except for core experts,
        where A = stack_i(C_i A0) and B = [B0 ... B0], so that sum_i g_i B C_i A x is the same two GEMMs."""
        if self.lora_C is not None:
            a0 = self.lora_A[0]  # (r, d_in)
            A = (self.lora_C @ a0).reshape(-1, self.in_features)  # ((N+S)*r, d_in)
            B = self.lora_B[0].repeat(1, self.lora_C.shape[0])  # (d_out, (N+S)*r)
            return A, B
        A = self.lora_A.view(-1, self.in_features)  # ((N+S)*r or r, d_in), a view
        B = self.lora_B.permute(1, 0, 2).reshape(self.out_features, -1)  # (d_out, (N+S)*r), a view
        return A, B

    def _inference_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B^T) views for the no-grad path, cached while the parameters keep their storage (in-place
        updates show through a view; a new tensor or ``.data`` swap, e.g. ``.to()``, changes the pointer);
        None for core experts, whose A and B are computed."""
        if self.lora_C is not None:
            return None
        key = (self.lora_A.data_ptr(), self.lora_B.data_ptr())
        cached = self.__dict__.get("_views")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                A, B = self.stacked_weights()
            cached = (key, (A, B.t()))
            self.__dict__["_views"] = cached  # a plain attribute: not a buffer, not saved
        return cached[1]

    def _forward_inference(self, x: torch.Tensor, y: torch.Tensor, views) -> torch.Tensor:
        """No grad, one dtype, no dropout: the fewest ops per call (generation runs this per token per layer)."""
        A, Bt = views
        flat = x.reshape(-1, self.in_features)
        t = flat.shape[0]
        router = self.router
        if self._plain_softmax and router is not None and flat.dtype == router.weight.dtype:
            logits = F.linear(flat, router.weight)
            gates = logits.softmax(dim=-1)
            self.last_routing = (logits, gates)
        else:
            gates = self.gates(flat)
            if self.shared_experts:
                gates = torch.cat([gates, gates.new_ones(t, self.shared_experts)], dim=-1)
            gates = gates.to(A.dtype)
        h = F.linear(flat, A)
        h = h.reshape(t, -1, self.rank)  # (T, N, r), or (T, 1, r) for a shared A
        if self._factor:
            z = gates.unsqueeze(-1) * (h * gates.unsqueeze(-1)).sum(dim=1, keepdim=True)
        else:
            z = h * gates.view(t, -1, 1)
        return torch.addmm(y.reshape(t, -1), z.view(t, -1), Bt, alpha=self.scaling).view(y.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        if not torch.is_grad_enabled() and y.dtype == x.dtype == self.lora_A.dtype and not (
                self.training and self.config.dropout > 0) and not torch.is_autocast_enabled(x.device.type):
            views = self._inference_weights()
            if views is not None:
                return self._forward_inference(x, y, views)
        flat = x.reshape(-1, self.in_features)  # (T, d_in)
        if self._route_dropped:  # LD-MoLE: the router and the lam MLP read the experts' dropped-out input
            xd = self.dropout(flat) if self.config.dropout > 0 else flat
            gates = self.gates(xd)
        else:
            gates = self.gates(flat)  # (T, N)
        if self.shared_experts:
            gates = torch.cat([gates, gates.new_ones(gates.shape[0], self.shared_experts)], dim=-1)  # (T, N+S)
        A, B = self.stacked_weights()
        if not self._route_dropped:
            xd = self.dropout(flat) if self.config.dropout > 0 else flat
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            # Cast once, as autocast would for each GEMM; the fused Function then runs in that dtype.
            dtype = torch.get_autocast_dtype(dev)
            with torch.autocast(dev, enabled=False):
                delta = mixture(xd.to(dtype), A.to(dtype), B.to(dtype), gates.to(dtype), self.scaling,
                                self.config.composition)
            return y + delta.view(*x.shape[:-1], self.out_features).to(y.dtype)
        dtype = A.dtype
        xd, gates = xd.to(dtype), gates.to(dtype)  # no-ops unless the base runs in another dtype (quantised)
        if not torch.is_grad_enabled() and y.dtype == dtype:
            # Inference with computed weights (core experts) or mixed input dtypes: the add folded into the GEMM.
            t = flat.shape[0]
            z, _ = _gate((xd @ A.t()).view(t, -1, self.rank), gates, 1.0, self._factor)
            return torch.addmm(y.reshape(t, -1), z.view(t, -1), B.t(), alpha=self.scaling).view(y.shape)
        delta = mixture(xd, A, B, gates, self.scaling, self.config.composition)
        return y + delta.view(*x.shape[:-1], self.out_features).to(y.dtype)

    def extra_repr(self) -> str:
        c = self.config
        router = c.router + (f"(k={c.top_k})" if c.router in TOPK_ROUTERS + ("hard_soft",) else "")
        router += f"(capacity_factor={c.capacity_factor})" if c.router == "switch" else ""
        router += (f"(hidden={c.sparsegen_hidden}{', shared' if self.sparsegen_owner is not None else ''})"
                   if c.router == "sparsegen" else "")
        router += (f"(k={c.top_k}, top_p={c.top_p}, threshold={c.entropy_threshold}, q={c.tsallis_q})"
                   if c.router == "dynmole" else "")
        extra = (f", shared_experts={self.shared_experts}" if self.shared_experts else "") + (
            ", share_A=True" if c.share_A else "") + (", core_experts=True" if c.core_experts else "") + (
            ", frozen_sparse_A" if c.frozen_sparse_A is not None else "") + (
            ", router shared" if self.router_owner is not None else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}"
                f"{extra}, rank={self.rank}, router={router}, composition={c.composition}, scaling={self.scaling:g}")
