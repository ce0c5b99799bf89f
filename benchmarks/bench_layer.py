"""Layer benchmark: one adapted Linear, fwd+bwd, L-MoE against LoRA and the usual MoE-of-LoRA codes.

    python benchmarks/bench_layer.py                      # the tables and the targets (a few minutes)
    python benchmarks/bench_layer.py --sweep --plot docs/img/layer_vs_n.png --json /tmp/layer.json

Every variant wraps the same frozen base ``nn.Linear(d_in, d_out, bias=False)`` (as in Llama) and one
step is: ``y = layer(x)``, ``loss = (y * R).sum()`` with a fixed random R, backward to x (which requires
grad) and to every trainable parameter. Variants (N experts of rank r, scaling s = alpha / r):

* ``lmoe-delta`` / ``lmoe-factor`` / ``lmoe-top2``: ``lmoe.LMoELinear`` (softmax router; top-k k=2).
* ``lora-<R>``: plain LoRA of rank R, ``W0 x + s * B (A x)``; ``lora-<N*r>`` is the floor: same GEMM
  shapes as the mixture without the router and the gating.
* ``loop``: the per-expert Python loop of LoRAMoE / MoE-PEFT: ``out += g[:, i:i+1] * B_i(A_i(x)) * s``
  with the experts as 2N separate ``nn.Linear``.
* ``base``: the frozen Linear alone (backward to x only); "adapter ms" in the tables is a variant's
  median minus this one, the adapter's own cost.
* ``einsum-TNout``: materialises every expert's output, ``einsum('tnr,nor->tno', h, B)`` (T x N x d_out),
  then sums it weighted by g (a batched matmul, ``einsum('tno,tn->to')``).
* ``proto-fused``: a proposed forward for ``LMoELinear`` (``ProtoLMoE``), the router's GEMM folded into
  the experts' A GEMM; same parameters, same output.

All variants of one (shape, N, r) share the same weights (B is random, not zero, so nothing is
skipped), and the script checks that their outputs and gradients agree before timing them. Numbers
are only comparable inside one run: see ``benchmarks/common.py``. By default torch runs one thread and
the tables report CPU time, which is what stays steady while other jobs share the cores
(``--threads 2`` reports wall time, noisy under load). Results and their reading: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_times, iqr, machine_info, markdown_table, median, saved_tensor_bytes  # noqa: E402

from lmoe import LMoEConfig, LMoELinear  # noqa: E402
from lmoe.routing import route  # noqa: E402

SMOLLM2_SHAPES = ((576, 576), (576, 1536), (1536, 576))  # q/o, gate/up, down of SmolLM2-135M
ALPHA = 16.0


# ---------------------------------------------------------------- reference variants
class LoRALinear(nn.Module):
    """Plain LoRA, as PEFT computes it: ``base(x) + B(A(x)) * s``."""

    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, scaling: float):
        super().__init__()
        self.base_layer, self.scaling = base, scaling
        self.A = nn.Parameter(A.clone())  # (R, d_in)
        self.B = nn.Parameter(B.clone())  # (d_out, R)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + F.linear(F.linear(x, self.A), self.B) * self.scaling


class LoopMoE(nn.Module):
    """LoRAMoE / MoE-PEFT style: softmax router, then a Python loop over N separate expert Linears."""

    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, Wg: torch.Tensor, scaling: float):
        super().__init__()
        n, r, d_in = A.shape
        d_out = B.shape[1]
        self.base_layer, self.scaling = base, scaling
        self.router = nn.Linear(d_in, n, bias=False)
        self.lora_A = nn.ModuleList(nn.Linear(d_in, r, bias=False) for _ in range(n))
        self.lora_B = nn.ModuleList(nn.Linear(r, d_out, bias=False) for _ in range(n))
        with torch.no_grad():
            self.router.weight.copy_(Wg)
            for i in range(n):
                self.lora_A[i].weight.copy_(A[i])
                self.lora_B[i].weight.copy_(B[i])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        g = self.router(x).softmax(dim=-1)  # (T, N)
        for i in range(len(self.lora_A)):
            out = out + g[:, i:i + 1] * self.lora_B[i](self.lora_A[i](x)) * self.scaling
        return out


class EinsumTNout(nn.Module):
    """Stacked experts, but every expert's (T, d_out) output is materialised before the gated sum."""

    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, Wg: torch.Tensor, scaling: float):
        super().__init__()
        self.base_layer, self.scaling = base, scaling
        self.A = nn.Parameter(A.clone())  # (N, r, d_in)
        self.B = nn.Parameter(B.clone())  # (N, d_out, r)
        self.router = nn.Parameter(Wg.clone())  # (N, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, r, d_in = self.A.shape
        g = F.linear(x, self.router).softmax(dim=-1)  # (T, N)
        h = (x @ self.A.view(n * r, d_in).t()).view(-1, n, r)  # (T, N, r)
        d = torch.einsum("tnr,nor->tno", h, self.B)  # (T, N, d_out): the big one
        return self.base_layer(x) + torch.einsum("tno,tn->to", d, g) * self.scaling


def make_lmoe(base: nn.Module, A: torch.Tensor, B: torch.Tensor, Wg: torch.Tensor, composition: str = "delta",
              router: str = "softmax", top_k: int = 2) -> LMoELinear:
    n, r, _ = A.shape
    cfg = LMoEConfig(num_experts=n, rank=r, alpha=ALPHA, router=router, top_k=top_k, composition=composition)
    layer = LMoELinear(base, cfg)
    with torch.no_grad():
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
        layer.router.weight.copy_(Wg)
    return layer


class _RouterFusedMixture(torch.autograd.Function):
    """Prototype: ``lmoe``'s fused mixture Function (delta, softmax router) with the router's GEMM folded
    into the experts' A GEMM: ``[h | logits] = x [A; W_g]^T`` is one GEMM forward and the backward's
    ``d[h | logits]`` gives ``dx`` and ``d[A; W_g]`` in one GEMM each. Saves x, h|logits, the gates and the
    weights; z is recomputed in backward, as in ``lmoe.layer._Mixture``.
    """

    @staticmethod
    def forward(ctx, x, W, B, n: int, scaling: float):
        t, nr = x.shape[0], W.shape[0] - n
        hl = x @ W.t()  # (T, N*r + N): every expert's A_i x, then the router logits
        h, logits = hl[:, :nr], hl[:, nr:]
        gates = logits.softmax(dim=-1)  # (T, N)
        z = h.view(t, n, -1) * (scaling * gates).unsqueeze(-1)  # (T, N, r)
        ctx.save_for_backward(x, W, B, hl, gates)
        ctx.n, ctx.scaling = n, scaling
        return z.view(t, nr) @ B.t(), logits.detach(), gates.detach()  # (T, d_out), routing for telemetry

    @staticmethod
    def backward(ctx, dy, _dlogits, _dgates):
        x, W, B, hl, gates = ctx.saved_tensors
        n, s = ctx.n, ctx.scaling
        t, nr = x.shape[0], W.shape[0] - n
        hv = hl[:, :nr].view(t, n, -1)  # (T, N, r)
        g = gates.unsqueeze(-1)  # (T, N, 1)
        dz = (dy @ B).view(t, n, -1)  # (T, N, r)
        dB = dy.t() @ (hv * (s * g)).view(t, nr)  # z recomputed; (d_out, N*r)
        dhl = torch.empty_like(hl)  # (T, N*r + N)
        torch.mul(dz, s * g, out=dhl[:, :nr].view(t, n, -1))  # dh
        dg = s * (dz * hv).sum(-1)  # (T, N)
        dhl[:, nr:] = gates * (dg - (dg * gates).sum(-1, keepdim=True))  # softmax backward: dlogits
        return dhl @ W, dhl.t() @ x, dB, None, None  # dx (T, d_in), dW (N*r + N, d_in), dB


class ProtoLMoE(nn.Module):
    """A proposed forward for ``LMoELinear`` (same parameters, same output), measured beside it: when the
    router and the experts share a dtype (fp32 training; softmax router, delta composition), concatenate
    ``[A; W_g]`` and run ``_RouterFusedMixture``: the three skinny (.., N) router GEMMs disappear into the
    experts' GEMMs and x receives one gradient fewer (one (T, d_in) add fewer)."""

    def __init__(self, layer: LMoELinear):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = self.layer
        n, d_in, d_out = L.num_experts, L.in_features, L.out_features
        y = L.base_layer(x)
        W = torch.cat([L.lora_A.view(-1, d_in), L.router.weight])  # (N*r + N, d_in)
        B = L.lora_B.permute(1, 0, 2).reshape(d_out, -1)  # (d_out, N*r), a view
        delta, logits, gates = _RouterFusedMixture.apply(x.reshape(-1, d_in), W, B, n, L.scaling)
        L.last_routing = (logits, gates)
        return y + delta.view(*x.shape[:-1], d_out)


# ---------------------------------------------------------------- building and checking one shape
@dataclass
class Variant:
    name: str
    kind: str  # base, lmoe-delta, lmoe-factor, lmoe-top2, lora, loop, einsum, proto
    n: int
    r: int
    module: nn.Module
    result: dict = field(default_factory=dict)


def expert_weights(d_in: int, d_out: int, n: int, r: int, gen: torch.Generator):
    A = torch.randn(n, r, d_in, generator=gen) / math.sqrt(d_in)  # (N, r, d_in)
    B = torch.randn(n, d_out, r, generator=gen) * 0.02  # (N, d_out, r): not zero, so nothing is trivial
    Wg = torch.randn(n, d_in, generator=gen) / math.sqrt(d_in)  # (N, d_in)
    return A, B, Wg


def lora_of(base: nn.Module, A: torch.Tensor, B: torch.Tensor, rank_scale: int) -> LoRALinear:
    """A LoRA of rank N*r built from the stacked experts (so its output equals the ungated sum)."""
    n, r, d_in = A.shape
    return LoRALinear(base, A.reshape(n * r, d_in), B.permute(1, 0, 2).reshape(-1, n * r), ALPHA / rank_scale)


def build_variants(d_in: int, d_out: int, configs: list[tuple[int, int]], seed: int, primary_extras: bool = True,
                   proto: bool = True,
                   kinds: tuple[str, ...] = ("lmoe-delta", "lmoe-factor", "lmoe-top2", "loop", "lora"),
                   ) -> list[Variant]:
    """Variants for each (N, r) in ``configs``. The first config is the primary one: it has no name suffix
    and (with ``primary_extras``) also gets ``einsum-TNout``, ``lora-<r>`` and (with ``proto``) the
    ``ProtoLMoE`` forward (``proto-fused``)."""
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d_out, d_in, generator=gen) / math.sqrt(d_in))
    base.requires_grad_(False)
    out: list[Variant] = [Variant("base", "base", 0, 0, base)] if primary_extras or "base" in kinds else []
    lora_ranks: set[int] = set()
    for j, (n, r) in enumerate(configs):
        A, B, Wg = expert_weights(d_in, d_out, n, r, gen)
        sfx = "" if j == 0 else f"@N{n}r{r}"
        s = ALPHA / r
        if "lmoe-delta" in kinds:
            out.append(Variant("lmoe-delta" + sfx, "lmoe-delta", n, r, make_lmoe(base, A, B, Wg, "delta")))
        if "lmoe-factor" in kinds:
            out.append(Variant("lmoe-factor" + sfx, "lmoe-factor", n, r, make_lmoe(base, A, B, Wg, "factor")))
        if "lmoe-top2" in kinds and n >= 2:
            out.append(Variant("lmoe-top2" + sfx, "lmoe-top2", n, r, make_lmoe(base, A, B, Wg, "delta", "topk", 2)))
        if "loop" in kinds:
            out.append(Variant("loop" + sfx, "loop", n, r, LoopMoE(base, A, B, Wg, s)))
        if j == 0 and primary_extras:
            out.append(Variant("einsum-TNout", "einsum", n, r, EinsumTNout(base, A, B, Wg, s)))
            if proto:
                out.append(Variant("proto-fused", "proto", n, r, ProtoLMoE(make_lmoe(base, A, B, Wg))))
        if "lora" in kinds and n * r not in lora_ranks:
            lora_ranks.add(n * r)
            out.append(Variant(f"lora-{n * r}", "lora", 1, n * r, lora_of(base, A, B, r)))
        if j == 0 and primary_extras and r not in lora_ranks:
            lora_ranks.add(r)
            out.append(Variant(f"lora-{r}", "lora", 1, r, lora_of(base, A[:1], B[:1], r)))
    return out


def _lmoe_grads(module: nn.Module) -> dict[str, torch.Tensor] | None:
    layer = module.layer if isinstance(module, ProtoLMoE) else module
    if not isinstance(layer, LMoELinear):
        return None
    return {"lora_A": layer.lora_A.grad, "lora_B": layer.lora_B.grad, "router": layer.router.weight.grad}


def check_equivalence(variants: list[Variant], x: torch.Tensor) -> None:
    """Same (N, r) => lmoe-delta, proto-fused, loop and einsum-TNout must give the same output and the same
    gradient of x; lmoe-delta and proto-fused also the same parameter gradients."""
    groups: dict[tuple[int, int], list[Variant]] = {}
    for v in variants:
        if v.kind in ("lmoe-delta", "loop", "einsum", "proto"):
            groups.setdefault((v.n, v.r), []).append(v)

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())

    for (n, r), vs in groups.items():
        ref = ref_grads = None
        for v in vs:
            xx = x.detach().clone().requires_grad_(True)
            y = v.module(xx)
            y.square().sum().backward()
            grads = _lmoe_grads(v.module)
            if ref is None:
                ref, ref_grads = (v.name, y.detach(), xx.grad), grads
                continue
            pairs = [("output", ref[1], y.detach()), ("grad x", ref[2], xx.grad)]
            if grads is not None and ref_grads is not None:
                pairs += [(f"grad {k}", ref_grads[k], grads[k]) for k in grads]
            for what, a, b in pairs:
                if not close(a, b):
                    raise AssertionError(f"N={n} r={r}: {v.name} {what} differs from {ref[0]} "
                                         f"(max abs diff {(a - b).abs().max().item():.3g})")
        for v in vs:
            v.module.zero_grad(set_to_none=True)


def make_step(module: nn.Module, x: torch.Tensor, R: torch.Tensor):
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        (module(x) * R).sum().backward()

    return step


def measure(variants: list[Variant], d_in: int, d_out: int, tokens: int, repeats: int, warmup: int, inner: int,
            seed: int, label: str, clock: str = "cpu") -> None:
    """Fill ``v.result`` with timing samples (ms) and saved-activation bytes, all variants interleaved."""
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, d_in, generator=gen).requires_grad_(True)
    R = torch.randn(tokens, d_out, generator=gen)
    check_equivalence(variants, x[: min(tokens, 64)])
    for v in variants:
        params = list(v.module.parameters())
        with_x = saved_tensor_bytes(lambda: v.module(x), exclude=params)
        no_x = saved_tensor_bytes(lambda: v.module(x), exclude=params + [x])
        v.result.update(saved_bytes=with_x["bytes"], saved_bytes_beyond_x=no_x["bytes"],
                        saved_storages=with_x["tensors"],
                        trainable_params=sum(p.numel() for p in params if p.requires_grad))
    fns = {v.name: make_step(v.module, x, R) for v in variants}

    def progress(rnd: int) -> None:
        print(f"  [{label}] round {rnd + 1}/{repeats}", file=sys.stderr, end="\r" if rnd + 1 < repeats else "\n")

    times = interleaved_times(fns, repeats=repeats, warmup=warmup, inner=inner, progress=progress)
    for v in variants:
        wall, cpu = ([t * 1e3 for t in times[v.name][c]] for c in ("wall", "cpu"))
        ms = cpu if clock == "cpu" else wall
        v.result.update(clock=clock, samples_ms=ms, median_ms=median(ms), iqr_ms=iqr(ms), samples_wall_ms=wall,
                        samples_cpu_ms=cpu, median_wall_ms=median(wall), median_cpu_ms=median(cpu))


def paired_ratio(a: Variant, b: Variant) -> float:
    """Median over rounds of a's time / b's time in the same round (immune to drift between rounds)."""
    return median(x / y for x, y in zip(a.result["samples_ms"], b.result["samples_ms"]))


# ---------------------------------------------------------------- reporting
def shape_table(variants: list[Variant], tokens: int, floor: Variant) -> str:
    by_name = {v.name: v for v in variants}
    base = by_name.get("base")
    rows = []
    for v in variants:
        res = v.result
        lora_same = by_name.get(f"lora-{v.n * v.r}")
        loop = next((u for u in variants if u.kind == "loop" and (u.n, u.r) == (v.n, v.r)), None)
        unit = tokens * v.n * v.r * 4  # bytes of one fp32 (T, N*r) activation
        adapter = res["median_ms"] - base.result["median_ms"] if base else float("nan")
        rows.append([
            v.name, v.n, v.r, f"{res['median_ms']:.2f}", f"{res['iqr_ms'][0]:.1f}-{res['iqr_ms'][1]:.1f}",
            f"{min(res['samples_ms']):.2f}", f"{adapter:.2f}" if base and v is not base else "",
            f"{adapter / (floor.result['median_ms'] - base.result['median_ms']):.2f}" if base and v is not base else "",
            f"{res['median_ms'] / floor.result['median_ms']:.3f}",
            f"{res['median_ms'] / lora_same.result['median_ms']:.3f}" if lora_same else "",
            f"{loop.result['median_ms'] / res['median_ms']:.2f}x" if loop and v.kind.startswith("lmoe") else "",
            f"{res['saved_bytes'] / 2**20:.1f}", f"{res['saved_bytes_beyond_x'] / 2**20:.1f}",
            f"{res['saved_bytes_beyond_x'] / unit:.2f}" if unit else "",
        ])
    headers = ["variant", "N", "r", "median ms", "IQR ms", "min ms", "adapter ms", f"adapter vs {floor.name}",
               f"vs {floor.name}", "vs lora-(N·r)", "loop / this",
               "saved MiB", "saved MiB beyond x", "beyond x / T·N·r"]
    return markdown_table(headers, rows)


def targets(per_shape: dict[str, list[Variant]], n16: int) -> list[dict]:
    """The issue's targets, per shape and for the worst shape."""
    checks = []
    for shape, vs in per_shape.items():
        by = {v.name: v for v in vs}
        prim = by.get("lmoe-delta") or by.get("lmoe-factor")  # the primary (N, r)
        if prim is None:
            continue
        floor = by[f"lora-{prim.n * prim.r}"]
        for name in ("lmoe-delta", "lmoe-factor"):
            if name in by:
                checks.append(dict(shape=shape, target=f"{name} (N={prim.n}, r={prim.r}) <= 1.10x {floor.name}",
                                   ratio=by[name].result["median_ms"] / floor.result["median_ms"],
                                   paired=paired_ratio(by[name], floor), bound=1.10, kind="le"))
        d16 = next((v for v in vs if v.kind == "lmoe-delta" and v.n == n16), None)
        l16 = next((v for v in vs if v.kind == "loop" and v.n == n16 and d16 and v.r == d16.r), None)
        if d16 and l16:
            for bound, src in ((3.0, "issue"), (5.0, "issue 4")):
                checks.append(dict(shape=shape, target=f"lmoe-delta >= {bound:g}x faster than loop at N={n16} ({src})",
                                   ratio=l16.result["median_ms"] / d16.result["median_ms"],
                                   paired=1.0 / paired_ratio(d16, l16), bound=bound, kind="ge"))
    worst = {}
    for c in checks:
        w = worst.get(c["target"])
        bad = (lambda a, b: a > b) if c["kind"] == "le" else (lambda a, b: a < b)
        if w is None or bad(c["ratio"], w["ratio"]):
            worst[c["target"]] = dict(c, shape="worst shape (" + c["shape"] + ")")
    out = checks + list(worst.values())
    for c in out:
        c["pass"] = c["ratio"] <= c["bound"] if c["kind"] == "le" else c["ratio"] >= c["bound"]
    return out


def targets_table(checks: list[dict]) -> str:
    rows = [[c["shape"], c["target"], f"{c['ratio']:.3f}", f"{c['paired']:.3f}", "PASS" if c["pass"] else "MISS"]
            for c in checks]
    return markdown_table(["shape", "target", "ratio (medians)", "ratio (paired per round)", "result"], rows)


def sweep_table(vs: list[Variant]) -> str:
    by = {(v.kind, v.n, v.r): v for v in vs}
    loras = {v.r: v for v in vs if v.kind == "lora"}
    rows = []
    for (kind, n, r), v in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        if kind != "lmoe-delta":
            continue
        lo, lp = loras[n * r], by[("loop", n, r)]
        rows.append([n, r, n * r, f"{v.result['median_ms']:.2f}", f"{lo.result['median_ms']:.2f}",
                     f"{lp.result['median_ms']:.2f}", f"{v.result['median_ms'] / lo.result['median_ms']:.3f}",
                     f"{lp.result['median_ms'] / v.result['median_ms']:.2f}x"])
    headers = ["N", "r", "N·r", "lmoe-delta ms", "lora-(N·r) ms", "loop ms", "lmoe / lora", "loop / lmoe"]
    table = markdown_table(headers, rows)
    base = next((v for v in vs if v.kind == "base"), None)
    return table + (f"\n\nfrozen base Linear alone: {base.result['median_ms']:.2f} ms" if base else "")


def plot(vs: list[Variant], r: int, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({v.n for v in vs if v.kind == "lmoe-delta" and v.r == r})
    loras = {v.r: v for v in vs if v.kind == "lora"}
    series = {
        "lmoe-delta (L-MoE)": [next(v for v in vs if v.kind == "lmoe-delta" and (v.n, v.r) == (n, r)) for n in ns],
        "LoRA of rank N·r": [loras[n * r] for n in ns],
        "per-expert loop": [next(v for v in vs if v.kind == "loop" and (v.n, v.r) == (n, r)) for n in ns],
    }
    fig, ax = plt.subplots(figsize=(6, 4))
    for (label, row), mk in zip(series.items(), "osv"):
        med = [v.result["median_ms"] for v in row]
        lo = [v.result["median_ms"] - v.result["iqr_ms"][0] for v in row]
        hi = [v.result["iqr_ms"][1] - v.result["median_ms"] for v in row]
        ax.errorbar(ns, med, yerr=[lo, hi], marker=mk, capsize=3, label=label)
    base = next((v for v in vs if v.kind == "base"), None)
    if base is not None:
        ax.axhline(base.result["median_ms"], color="gray", ls="--", lw=1, label="frozen base Linear alone")
    ax.set_xlabel("N (experts)")
    ax.set_ylabel(f"fwd+bwd ms, {vs[0].result['clock']} time (median, IQR bars)")
    ax.set_xticks(ns)
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def profile(variants: list[Variant], d_in: int, d_out: int, tokens: int, names: list[str], reps: int = 8,
            steps: int = 3, rows: int = 16) -> str:
    """torch.profiler self-CPU time per (op, input shapes), in ms per step, for the named variants.

    The variants are profiled in turn, ``reps`` times ``steps`` steps each; each op's time is its minimum
    over the reps (the least disturbed one: the host is shared), so the per-op rows are comparable
    across variants even when the totals drift.
    """
    from collections import defaultdict

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    x = torch.randn(tokens, d_in).requires_grad_(True)
    R = torch.randn(tokens, d_out)
    chosen = [v for v in variants if v.name in names]
    fns = {v.name: make_step(v.module, x, R) for v in chosen}
    for fn in fns.values():
        fn(), fn()
    best: dict[str, dict] = {n: defaultdict(lambda: math.inf) for n in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            with tprofile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(steps):
                    fn()
            for e in prof.key_averages(group_by_input_shape=True):
                key = (e.key, str(e.input_shapes))
                best[name][key] = min(best[name][key], e.self_cpu_time_total / steps / 1e3)
    out = []
    for name, ops in best.items():
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:rows]
        out.append(f"--- {name} {d_in}->{d_out}, T={tokens}: sum over ops of the per-op minimum "
                   f"{sum(ops.values()):.2f} ms/step\n"
                   + markdown_table(["op", "input shapes", "ms/step"], [[k[0], k[1][:60], f"{v:.3f}"] for k, v in top]))
    return "\n\n".join(out)


# ---------------------------------------------------------------- main
def parse_shapes(s: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in part.split("x")) for part in s.split(",")]  # type: ignore[misc]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", "-T", type=int, default=1024, help="tokens per step (batch x sequence)")
    p.add_argument("--n", type=int, nargs="+", default=[8, 16], help="expert counts; the first is the primary one")
    p.add_argument("--r", type=int, nargs="+", default=[8], help="expert ranks; the first is the primary one")
    p.add_argument("--shapes", type=parse_shapes, default=list(SMOLLM2_SHAPES),
                   help="d_in x d_out list, e.g. 576x576,576x1536")
    p.add_argument("--repeats", type=int, default=15, help="rounds (samples per variant); the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--inner", type=int, default=2, help="steps per sample (the sample is their mean)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: torch's default); 1 keeps the numbers steady on a shared machine")
    p.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                   help="what the tables report: process CPU time or wall time (auto: cpu with 1 thread, else wall)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", action="store_true", help="also sweep N x r on one shape: lmoe-delta, lora(N·r), loop")
    p.add_argument("--sweep-n", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--sweep-r", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--sweep-shape", type=parse_shapes, default=[(576, 1536)])
    p.add_argument("--sweep-repeats", type=int, default=0, help="rounds for the sweep (0: --repeats)")
    p.add_argument("--plot", metavar="PATH.png", help="plot step time vs N at r=8 (implies --sweep)")
    p.add_argument("--skip-main", action="store_true", help="only the sweep")
    p.add_argument("--no-proto", action="store_true", help="leave out the proposed forward (proto-fused)")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="time only these variants of the main tables (e.g. base lmoe-delta lora-64): shorter rounds")
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler op tables (per-op minimum over 8 profiles) for lmoe-delta, "
                        "proto-fused and the lora floor")
    p.add_argument("--json", metavar="PATH", help="write every number (samples included) to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plot:
        args.sweep = True
    if args.clock == "auto":
        args.clock = "cpu" if torch.get_num_threads() == 1 else "wall"
    torch.manual_seed(args.seed)

    info = machine_info()
    print(f"# bench_layer: {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
          f"({info['torch_threads']} threads), {info['date']}, lmoe at {info['git']}")
    print(f"# T={args.tokens}, fp32, repeats={args.repeats} x inner={args.inner}, warmup={args.warmup}, "
          f"N={args.n}, r={args.r}, clock={args.clock} (ms per fwd+bwd step)")
    report: dict = {"machine": info, "args": dict(vars(args)), "shapes": {}, "targets": [], "sweep": {}}
    configs = [(args.n[0], args.r[0])] + [(n, r) for n in args.n for r in args.r if (n, r) != (args.n[0], args.r[0])]

    per_shape: dict[str, list[Variant]] = {}
    if not args.skip_main:
        for d_in, d_out in args.shapes:
            key = f"{d_in}->{d_out}"
            vs = build_variants(d_in, d_out, configs, args.seed, proto=not args.no_proto)
            if args.only:
                vs = [v for v in vs if v.name in args.only]
            measure(vs, d_in, d_out, args.tokens, args.repeats, args.warmup, args.inner, args.seed, key, args.clock)
            per_shape[key] = vs
            floor = next((v for v in vs if v.name == f"lora-{configs[0][0] * configs[0][1]}"), None)
            if floor is None:
                raise SystemExit(f"--only must keep lora-{configs[0][0] * configs[0][1]} (the reference)")
            print(f"\n## {key}, T={args.tokens}\n")
            print(shape_table(vs, args.tokens, floor))
            sys.stdout.flush()
            report["shapes"][key] = {v.name: dict(kind=v.kind, n=v.n, r=v.r, **v.result) for v in vs}
            if args.profile:
                print("\n" + profile(vs, d_in, d_out, args.tokens, ["lmoe-delta", "proto-fused", floor.name]))
        n16 = next((n for n in args.n[1:] if n == 16), args.n[-1] if len(args.n) > 1 else args.n[0])
        checks = targets(per_shape, n16)
        print("\n## Targets\n")
        print(targets_table(checks))
        report["targets"] = checks

    if args.sweep:
        for d_in, d_out in args.sweep_shape:
            key = f"{d_in}->{d_out}"
            cfgs = [(n, r) for n in args.sweep_n for r in args.sweep_r]
            vs = build_variants(d_in, d_out, cfgs, args.seed + 7, primary_extras=False,
                                kinds=("base", "lmoe-delta", "loop", "lora"))
            measure(vs, d_in, d_out, args.tokens, args.sweep_repeats or args.repeats, args.warmup, args.inner,
                    args.seed, "sweep " + key, args.clock)
            print(f"\n## Sweep {key}, T={args.tokens}\n")
            print(sweep_table(vs))
            report["sweep"][key] = [dict(name=v.name, kind=v.kind, n=v.n, r=v.r, **v.result) for v in vs]
            if args.plot:
                r_plot = 8 if 8 in args.sweep_r else args.sweep_r[0]
                plot(vs, r_plot, args.plot, f"one Linear {key}, T={args.tokens}, r={r_plot}, fp32 fwd+bwd, "
                                            f"{torch.get_num_threads()} thread(s), {args.clock} time")
                print(f"\nplot: {args.plot}")

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"json: {args.json}")
    return report


if __name__ == "__main__":
    main()
