"""Top-k routing: masked dense (what ``LMoELinear`` does) against a sparse grouped path, and the family's
new layer pieces, fwd+bwd on one SmolLM2-shaped Linear.

    python benchmarks/bench_topk.py --json /tmp/topk.json

Masked dense computes every expert's A_i x and B_i z_i for every token and zeroes the gates of the
unselected experts: cost ~ T * N*r * (d_in + d_out), whatever k is. The sparse path does only the selected
work, T * k*r * (d_in + d_out), but must move tokens: it sorts the (token, expert) pairs by expert, gathers
the tokens, runs one pair of GEMMs per expert on its tokens (a loop over experts: the scattermoe grouping,
without its fused kernel) and scatters the results back with ``index_add_``. Both give the same output and
gradients (checked before timing). Where the sparse path wins, it is worth adding to the layer; the
crossover in N (for k=2, r=8 and for rank-1 experts with k=8) is the table this prints.

Also timed: ``lora-<N*r>`` (the dense floor), ``lora-<k*r>`` (the ideal sparse floor: the selected work
with no routing), and the new pieces at N=8, r=8: ``core`` (CoMoL), ``shared-router follower`` (gates
given, no router), ``implicit`` (FlyLoRA, rank-1 experts, N=32, k=8).

One thread, CPU time of this process (steady while other jobs share the cores), medians of interleaved
rounds; ratios only compare variants of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_times, machine_info, markdown_table, median  # noqa: E402

from lmoe import LMoEConfig, LMoELinear  # noqa: E402


class SparseTopK(nn.Module):
    """Top-k mixture that only computes the selected experts (grouped by expert), for the crossover."""

    def __init__(self, dense: LMoELinear):
        super().__init__()
        self.d = dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, c = self.d, self.d.config
        y = d.base_layer(x)
        logits = d.router_logits(x)
        vals, idx = logits.topk(c.top_k, dim=-1)  # (T, k)
        gates = vals.softmax(dim=-1).reshape(-1)  # (T*k,)
        expert = idx.reshape(-1)
        order = expert.argsort(stable=True)
        token = order // c.top_k
        counts = torch.bincount(expert, minlength=d.num_experts).tolist()
        xs = x.index_select(0, token)  # (T*k, d_in), grouped by expert
        g = gates.index_select(0, order).unsqueeze(-1)
        outs, start = [], 0
        for i, n in enumerate(counts):  # the sparse path's loop: each expert on its own tokens only
            if n:
                seg = slice(start, start + n)
                outs.append(((xs[seg] @ d.lora_A[i].t()) * g[seg]) @ d.lora_B[i].t())
            start += n
        return y.index_add(0, token, torch.cat(outs) * d.scaling)


class LoRA(nn.Module):
    def __init__(self, base: nn.Module, rank: int, gen: torch.Generator):
        super().__init__()
        self.base_layer = base
        self.A = nn.Parameter(torch.randn(rank, base.in_features, generator=gen) / base.in_features ** 0.5)
        self.B = nn.Parameter(torch.randn(base.out_features, rank, generator=gen) * 0.02)

    def forward(self, x):
        return self.base_layer(x) + 2.0 * ((x @ self.A.t()) @ self.B.t())


def lmoe_layer(base: nn.Module, gen: torch.Generator, **kw) -> LMoELinear:
    layer = LMoELinear(base, LMoEConfig(target_modules=["x"], **kw))
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.02)
    return layer


def step_fn(module: nn.Module, x: torch.Tensor, R: torch.Tensor):
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        (module(x) * R).sum().backward()
    return step


def check_same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    R = torch.randn(x.shape[0], a.d.out_features if isinstance(a, SparseTopK) else b.out_features)
    ya, yb = a(x), b(x)
    assert torch.allclose(ya, yb, atol=1e-4), (ya - yb).abs().max()
    ga = torch.autograd.grad((ya * R).sum(), [b.lora_A, b.lora_B, b.router.weight])
    gb = torch.autograd.grad((yb * R).sum(), [b.lora_A, b.lora_B, b.router.weight])
    for u, v in zip(ga, gb):
        assert torch.allclose(u, v, atol=1e-4), (u - v).abs().max()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-out", type=int, default=1536)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--json", default=None)
    p.add_argument("--pieces-only", action="store_true", help="only the family's layer pieces")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    info = machine_info()
    print(f"# bench_topk  {info}  shape {a.d_in}->{a.d_out}, T={a.tokens}", flush=True)
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(a.d_in, a.d_out, bias=False).requires_grad_(False)
    x = torch.randn(a.tokens, a.d_in, generator=gen, requires_grad=True)
    R = torch.randn(a.tokens, a.d_out, generator=gen)
    results = {"machine": info, "args": vars(a), "crossover": [], "pieces": {}}
    rows = []
    for n, r, k in [] if a.pieces_only else [(8, 8, 2), (16, 8, 2), (32, 8, 2), (64, 8, 2), (16, 1, 8), (64, 1, 8),
                                             (128, 1, 8)]:
        dense = lmoe_layer(base, gen, num_experts=n, rank=r, router="topk", top_k=k)
        sparse = SparseTopK(dense)
        check_same(sparse, dense, x.detach()[:256].requires_grad_())
        fns = {"dense": step_fn(dense, x, R), "sparse": step_fn(sparse, x, R),
               "lora-Nr": step_fn(LoRA(base, n * r, gen), x, R), "lora-kr": step_fn(LoRA(base, k * r, gen), x, R),
               "base": step_fn(base, x, R)}
        t = interleaved_times(fns, repeats=a.repeats, warmup=2)
        ms = {name: 1e3 * median(v["cpu"]) for name, v in t.items()}
        paired = median(s / d for s, d in zip(t["sparse"]["cpu"], t["dense"]["cpu"]))
        results["crossover"].append({"N": n, "r": r, "k": k, "ms": ms, "sparse_vs_dense_paired": paired})
        rows.append([n, r, k, f"{ms['dense']:.2f}", f"{ms['sparse']:.2f}", f"{paired:.2f}", f"{ms['lora-Nr']:.2f}",
                     f"{ms['lora-kr']:.2f}", f"{ms['base']:.2f}"])
        print(f"  N={n} r={r} k={k}: sparse/dense {paired:.2f}", flush=True)
    if rows:
        print("\nfwd+bwd CPU ms per step (1 thread), medians; sparse/dense = median of per-round ratios")
        print(markdown_table(["N", "r", "k", "masked dense", "sparse grouped", "sparse / dense", "lora-N·r",
                              "lora-k·r", "base"], rows))

    pieces = {
        "lmoe (N=8, r=8)": lmoe_layer(base, gen),
        "core (CoMoL, N=8, r=8)": lmoe_layer(base, gen, core_experts=True),
        "implicit (FlyLoRA, N=32, r=1, k=8)": lmoe_layer(base, gen, num_experts=32, rank=1, alpha=2.0,
                                                         router="implicit", top_k=8, frozen_sparse_A=0.25),
        "sigmoid_topk (SMoRA, N=64, r=1, k=8)": lmoe_layer(base, gen, num_experts=64, rank=1, alpha=2.0,
                                                           router="sigmoid_topk", top_k=8),
        "sparsegen (LD-MoLE, N=8, r=8, lam-MLP 512)": lmoe_layer(base, gen, router="sparsegen"),
        "dynmole (N=8, r=8)": lmoe_layer(base, gen, router="dynmole"),
        "hard_soft (LoRA-Mixer, N=8, r=8, k=2)": lmoe_layer(base, gen, router="hard_soft", top_k=2),
        "lora-64": LoRA(base, 64, gen),
        "base": base,
    }
    t = interleaved_times({k_: step_fn(m, x, R) for k_, m in pieces.items()}, repeats=a.repeats, warmup=2)
    ref = t["lora-64"]["cpu"]
    prow = []
    for name, v in t.items():
        ms = 1e3 * median(v["cpu"])
        paired = median(u / w for u, w in zip(v["cpu"], ref))
        results["pieces"][name] = {"ms": ms, "vs_lora64_paired": paired}
        prow.append([name, f"{ms:.2f}", f"{paired:.2f}"])
    print("\nThe family's layer pieces, fwd+bwd CPU ms per step (1 thread)")
    print(markdown_table(["layer", "ms", "vs lora-64 (paired)"], prow))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
