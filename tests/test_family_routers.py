"""The two routers with a per-token number of active experts, each against a deliberately dumb per-token loop of
its defining equation (outputs and gradients, float64, tiny sizes), small cases by hand, their losses by hand,
save / load and the exact validation messages:

* ``sparsegen`` (LD-MoLE, code eshentw/LD-MoLE ``peft/utils/sparsegen.py``): lam = logsigmoid(MLP(x)) + 1 - eps,
  g = sparsemax(l / (1 - lam)) in the closed form: sort l descending, K = #{j : 1 - lam + j l_(j) > sum_{i<=j}
  l_(i)}, tau = (sum_{i<=K} l_(i) - 1 + lam) / K, g = max(l - tau, 0) / (1 - lam); sparsity loss
  relu(lam_k - lam), lam_k = 1 - (sum_{i<=k} l_(i) - k l_(k+1)) (``loss/loss.py``);
* ``dynmole`` (DynMoLE, code mikecovlee/DynMoLE ``moe_peft/adapters/dynmole/model.py``): p = softmax(l),
  H = normalised Tsallis entropy of p + 1e-5; H > threshold: g = p; else g = p on the experts (by p, descending)
  whose cumulative p <= top_p, and on at least the first top_k; entropy loss = mean H.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmoe import LMoEConfig, LMoELinear, LMoEModel, get_lmoe_model
from lmoe.routing import (dispatch_fraction, dynmole_gates, entropy_loss, load_balancing_loss, route, sparsegen_lin,
                          sparsity_lower_bound, sparsity_loss, tsallis_entropy)
from tests.helpers import (assert_matches_reference, float64_input, float64_layer, random_ids, randomize_lora_B,
                           tiny_llama)

D_IN, D_OUT, T = 12, 10, 9
MLP_KEYS = {"sparsegen_mlp.0.weight", "sparsegen_mlp.0.bias", "sparsegen_mlp.2.weight", "sparsegen_mlp.2.bias"}


def _layer(seed=0, router_scale=1.0, **kw) -> LMoELinear:
    return float64_layer(D_IN, D_OUT, seed, router_scale, **kw)


def _x(seed=1):
    return float64_input(T, D_IN, seed)


def _check(layer, y, y_ref, x):
    assert_matches_reference(layer, y, y_ref, x, all_grads=True)


def _mixture_row(layer, x_t, gates_t):
    """s * sum_i g_i B_i A_i x for one token, expert by expert."""
    return layer.scaling * sum(gates_t[i] * (layer.lora_B[i] @ (layer.lora_A[i] @ x_t)) for i in range(len(gates_t)))


# ------------------------------------------------------------------ sparsegen (LD-MoLE)


def _sparsegen_loop(z, lam):
    """One token: the closed form of LD-MoLE's GlobalSparsegen._compute_prob, with Python loops."""
    n = len(z)
    order = sorted(range(n), key=lambda i: -float(z[i].detach()))
    k, total = 0, 0.0
    for j in range(1, n + 1):
        total = total + z[order[j - 1]]
        if 1 - lam + j * z[order[j - 1]] > total:
            k = j
    tau = (sum(z[order[j]] for j in range(k)) - 1 + lam) / k
    return torch.stack([torch.relu(z[i] - tau) / (1 - lam) for i in range(n)])


def test_sparsegen_by_hand():
    z = torch.tensor([[2.0, 1.0, 0.5, -1.0]] * 4, dtype=torch.float64)
    lam = torch.tensor([0.5, 0.0, -1.0, -3.0], dtype=torch.float64)
    g = sparsegen_lin(z, lam)
    # lam = 0: sparsemax(z) = [1, 0, 0, 0]; lam = 0.5: sparsemax(2 z), the same; lam = -1: sparsemax(z / 2):
    # support {0, 1}, tau = (3 - 1 - 1) / 2 = 0.5, g = (z - 0.5) / 2; lam = -3: sparsemax(z / 4): support {0, 1, 2},
    # tau = (3.5 - 1 - 3) / 3 = -1/6, g = (z + 1/6) / 4.
    expected = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0.75, 0.25, 0, 0],
                             [13 / 24, 7 / 24, 4 / 24, 0]], dtype=torch.float64)
    assert torch.allclose(g, expected, atol=1e-15)
    assert torch.allclose(g.sum(-1), torch.ones(4, dtype=torch.float64))  # always on the simplex
    # lam_k: the smallest lam with at most k active experts. k = 2: 1 - (3 - 2 * 0.5) = -1 (just 2 at lam = -1).
    assert torch.equal(sparsity_lower_bound(z[:1], 2), torch.tensor([-1.0], dtype=torch.float64))
    assert torch.equal(sparsity_lower_bound(z[:1], 1), torch.tensor([0.0], dtype=torch.float64))
    assert sparsity_lower_bound(z[:1], 4).item() == -math.inf  # k = N: no constraint
    # sparsity loss: relu(lam_2 - lam) = relu(-1 - lam) -> [0, 0, 0, 2], mean over the tokens the mask keeps
    assert torch.equal(sparsity_loss(z, lam, 2), torch.tensor(0.5, dtype=torch.float64))
    keep = torch.tensor([False, True, True, True])
    assert torch.allclose(sparsity_loss(z, lam, 2, keep), torch.tensor(2 / 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="router 'sparsegen' needs lam"):
        route(z, "sparsegen", 2)


def test_sparsity_bound_is_the_k_expert_threshold():
    """Just above lam_k at most k experts are active; just below it, more than k (random logits, every k)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 6, generator=g, dtype=torch.float64)
    for k in range(1, 6):
        low = sparsity_lower_bound(z, k)
        assert ((sparsegen_lin(z, low + 1e-9) > 0).sum(-1) <= k).all()
        assert ((sparsegen_lin(z, low - 1e-9) > 0).sum(-1) > k).all()


def test_sparsegen_layer_vs_loop():
    layer = _layer(num_experts=5, rank=2, router="sparsegen", sparsegen_hidden=7, router_scale=6.0)
    assert layer.sparsegen_mlp[0].weight.shape == (7, D_IN) and layer.sparsegen_mlp[2].weight.shape == (1, 7)
    x = _x()
    y = layer(x)
    mlp = layer.sparsegen_mlp
    rows, active = [], []
    for t in range(T):
        h = torch.relu(mlp[0].weight @ x[t] + mlp[0].bias)
        lam = F.logsigmoid(mlp[2].weight @ h + mlp[2].bias)[0] + 0.99
        g = _sparsegen_loop(layer.router.weight @ x[t], lam)
        active.append(int((g > 0).sum()))
        rows.append(layer.base_layer(x[t]) + _mixture_row(layer, x[t], g))
    assert len(set(active)) > 1  # the number of active experts really varies per token
    assert torch.equal((layer.last_routing[1] > 0).sum(-1), torch.tensor(active))
    _check(layer, y, torch.stack(rows), x)


def test_sparsegen_routes_on_the_dropped_out_input():
    """As in LD-MoLE's code, the router and the lam MLP read the experts' dropped-out input (one draw)."""
    layer = _layer(num_experts=4, rank=2, router="sparsegen", sparsegen_hidden=5, dropout=0.3, router_scale=4.0)
    layer.train()
    x = _x()
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    xd = F.dropout(x, 0.3, training=True)
    lam = layer.sparsity(xd)
    gates = sparsegen_lin(xd @ layer.router.weight.t(), lam)
    y_ref = layer.base_layer(x) + torch.stack([_mixture_row(layer, xd[t], gates[t]) for t in range(T)])
    _check(layer, y, y_ref, x)
    assert torch.equal(layer.last_lambda, lam)


# ------------------------------------------------------------------ dynmole (DynMoLE)


def _tsallis_loop(p, q, eps=1e-5):
    """DynMoLE's moe_utils.tsallis_entropy (normalised), term by term."""
    n = len(p)
    if q == 1.0:
        return -sum((pi + eps) * torch.log(pi + eps) for pi in p) / math.log(n)
    return ((1 - sum((pi + eps) ** q for pi in p)) / (q - 1)) / ((1 - n ** (1 - q)) / (q - 1))


def _dynmole_loop(z, k, top_p, threshold, q):
    p = torch.softmax(z, dim=-1)
    n = len(p)
    if threshold < 1.0 and _tsallis_loop(p, q) > threshold:
        return p  # high entropy: every expert
    order = sorted(range(n), key=lambda i: -float(p[i].detach()))
    keep, total = set(), 0.0
    for rank, i in enumerate(order):
        total = total + float(p[i])
        if total <= top_p or rank < k:
            keep.add(i)
    return torch.stack([p[i] if i in keep else p[i] * 0 for i in range(n)])


def test_tsallis_entropy_by_hand():
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]], dtype=torch.float64)
    # q = 2, no eps: S = 1 - sum p^2, max 1 - 1/4 = 3/4 -> [1, 0, (1 - 1/2) / (3/4) = 2/3]
    assert torch.allclose(tsallis_entropy(p, 2.0, eps=0.0), torch.tensor([1.0, 0.0, 2 / 3], dtype=torch.float64))
    # q = 1: Shannon / log N -> [1, 0, log 2 / log 4 = 1/2]
    assert torch.allclose(tsallis_entropy(p, 1.0, eps=0.0), torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64))
    # with DynMoLE's eps = 1e-5 added to p (its default), exactly its formula
    for q in (0.5, 1.0, 1.1, 1.5, 2.0):
        want = torch.stack([_tsallis_loop(row, q) for row in p])
        assert torch.allclose(tsallis_entropy(p, q), want, atol=1e-12)
    assert torch.equal(tsallis_entropy(torch.ones(3, 1), 1.5), torch.zeros(3))  # one expert: no entropy


def test_dynmole_by_hand():
    # a near-uniform token (normalised entropy ~1 > 0.9) uses ALL experts with gates p
    z = torch.tensor([[0.0, 0.01, 0.0, -0.01]], dtype=torch.float64)
    assert torch.equal(dynmole_gates(z, 1, 0.5, 0.9, 1.1), z.softmax(-1))
    # a confident token: p = [0.7, 0.2, 0.06, 0.04], normalised entropy (q = 1.1) ~0.6 < 0.9: top-p
    p = torch.tensor([[0.7, 0.2, 0.06, 0.04]], dtype=torch.float64)
    z = p.log()
    assert tsallis_entropy(z.softmax(-1), 1.1).item() < 0.9
    p = z.softmax(-1)
    keep = lambda *i: torch.tensor([[p[0, j] if j in i else 0.0 for j in range(4)]], dtype=torch.float64)  # noqa: E731
    # cumulative p = [0.7, 0.9, 0.96, 1]: top_p 0.75 keeps only the first, the minimum k = 2 adds the second;
    # the gates are p itself, not renormalised
    assert torch.equal(dynmole_gates(z, 2, 0.75, 0.9, 1.1), keep(0, 1))
    assert torch.equal(dynmole_gates(z, 1, 0.75, 0.9, 1.1), keep(0))
    assert torch.equal(dynmole_gates(z, 1, 0.95, 0.9, 1.1), keep(0, 1))  # 0.96 > 0.95: the third is out
    assert torch.equal(dynmole_gates(z, 3, 0.5, 0.9, 1.1), keep(0, 1, 2))  # k = 3 whatever top_p says
    assert torch.equal(dynmole_gates(z, 1, 0.75, 0.5, 1.1), p)  # a lower threshold: all experts
    assert torch.equal(dynmole_gates(z, 1, 0.75, 1.0, 1.1), keep(0))  # threshold 1: never all experts
    # order does not matter: the same token with its experts permuted
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(dynmole_gates(z[:, perm], 2, 0.75, 0.9, 1.1), keep(0, 1)[:, perm])
    with pytest.raises(ValueError, match="router 'dynmole' needs top_p, entropy_threshold and tsallis_q"):
        route(z, "dynmole", 2, top_p=0.5)


def test_dynmole_layer_vs_loop():
    layer = _layer(num_experts=6, rank=2, router="dynmole", top_k=2, top_p=0.6, entropy_threshold=0.8,
                   tsallis_q=1.5, router_scale=5.0)
    x = _x()
    y = layer(x)
    rows, active = [], []
    for t in range(T):
        g = _dynmole_loop(layer.router.weight @ x[t], 2, 0.6, 0.8, 1.5)
        active.append(int((g > 0).sum()))
        rows.append(layer.base_layer(x[t]) + _mixture_row(layer, x[t], g))
    assert 6 in active and min(active) < 6  # both branches: all experts and top-p
    assert torch.equal((layer.last_routing[1] > 0).sum(-1), torch.tensor(active))
    _check(layer, y, torch.stack(rows), x)


# ------------------------------------------------------------------ the losses in a model, by hand


def _masked(ids):
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return mask


def _balance_by_hand(logits, gates, keep, probs):
    """N sum_i f_i P_i with f_i = #tokens with g_i != 0 / sum_t #active(t), over the kept tokens."""
    n = logits.shape[-1]
    active = (gates[keep] != 0).double()
    f = active.sum(0) / active.sum()
    P = probs[keep].double().mean(0)
    return n * (f * P).sum()


@pytest.mark.parametrize("router", ["sparsegen", "dynmole"])
def test_losses_of_the_dynamic_routers_by_hand(router):
    kw = ({"sparsity_loss_coef": 0.3, "sparsegen_hidden": 16} if router == "sparsegen"
          else {"entropy_loss_coef": 0.3, "entropy_threshold": 0.95, "top_p": 0.5})
    cfg = LMoEConfig(num_experts=4, rank=2, router=router, top_k=2, target_modules=["q_proj", "down_proj"],
                     aux_loss_coef=0.2, **kw)
    model = get_lmoe_model(tiny_llama(), cfg)
    randomize_lora_B(model)
    with torch.no_grad():
        for m in model.lmoe_layers().values():
            m.router.weight.mul_(20.0)  # confident routing: sparse sets, several sizes
    ids = random_ids()
    mask = _masked(ids)
    keep = mask.reshape(-1).bool()
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    bal, extra = [], []
    for m in model.lmoe_layers().values():
        logits, gates = m.last_routing
        probs = gates if router == "sparsegen" else logits.softmax(-1)  # LD-MoLE's P averages its gates
        bal.append(_balance_by_hand(logits, gates, keep, probs))
        torch.testing.assert_close(load_balancing_loss(logits, None, keep, gates, probs), bal[-1].float())
        if router == "sparsegen":
            u = logits.detach().sort(-1, descending=True).values
            low = 1 - (u[:, 0] + u[:, 1] - 2 * u[:, 2])
            extra.append(torch.relu(low - m.last_lambda)[keep].mean())
        else:
            p = logits.softmax(-1)
            extra.append(torch.stack([_tsallis_loop(p[t], cfg.tsallis_q) for t in range(len(p))])[keep].mean())
    n_active = [int((m.last_routing[1] != 0).sum(-1).max()) for m in model.lmoe_layers().values()]
    assert min(n_active) < 4 or router == "dynmole"
    torch.testing.assert_close(out.aux_loss, torch.stack(bal).mean().float())
    name = "sparsity_loss" if router == "sparsegen" else "entropy_loss"
    other = "entropy_loss" if router == "sparsegen" else "sparsity_loss"
    torch.testing.assert_close(out[name], torch.stack(extra).mean().float())
    assert out.get(other) is None
    torch.testing.assert_close(out.loss, out.lm_loss + 0.2 * out.aux_loss + 0.3 * out[name])
    assert out[name].requires_grad
    out.loss.backward()
    if router == "sparsegen":  # lam gets gradients (at LD-MoLE's init the hidden ReLUs are off: only b2 moves)
        assert all(m.sparsegen_mlp[2].bias.grad.abs().sum() > 0 for m in model.lmoe_layers().values()
                   if m.sparsegen_mlp is not None)
    # routing statistics: the same f, summing to 1 per layer
    model.eval()
    model.track_routing()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for s in model.routing_stats().values():
        assert abs(sum(s["load"]) - 1) < 1e-6 and s["tokens"] == int(keep.sum())


def test_dispatch_fraction_of_a_varying_number_of_experts():
    gates = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    logits = torch.zeros(4, 3)
    # 7 activations in all: expert 0 has 3, expert 1 has 2, expert 2 has 2
    assert torch.allclose(dispatch_fraction(logits, None, None, gates), torch.tensor([3 / 7, 2 / 7, 2 / 7]))
    keep = torch.tensor([True, True, False, True])  # 4 activations: 2, 1, 1
    assert torch.allclose(dispatch_fraction(logits, None, keep, gates), torch.tensor([0.5, 0.25, 0.25]))
    with pytest.raises(ValueError, match="needs the selected gates"):
        dispatch_fraction(logits, None)


def test_entropy_loss_function_masks_padding():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 4, generator=g, dtype=torch.float64)
    h = torch.stack([_tsallis_loop(row, 1.1) for row in logits.softmax(-1)])
    keep = torch.tensor([True, False, True, True, False])
    assert torch.allclose(entropy_loss(logits, 1.1), h.mean())
    assert torch.allclose(entropy_loss(logits, 1.1, keep), h[keep].mean())


# ------------------------------------------------------------------ sharing the lam MLP, save / load


def test_lambda_mlp_is_shared_per_input_width():
    model = get_lmoe_model(tiny_llama(), LMoEConfig.from_preset("ld-mole"))
    layers = model.lmoe_layers()
    q0, down0 = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.0.mlp.down_proj"]
    for name, m in layers.items():  # width 64: q, k, v, o, gate, up; width 128: down
        owner = down0 if name.endswith("down_proj") else q0
        assert (m.sparsegen_mlp is not None) == (m is owner)
        assert m.sparsegen_owner is (None if m is owner else owner)
    sd = model.adapter_state_dict()
    assert {k for k in sd if "sparsegen_mlp" in k} == {f"{p}.{k}" for p in ("model.layers.0.self_attn.q_proj",
                                                                           "model.layers.0.mlp.down_proj")
                                                       for k in MLP_KEYS}
    # a follower's lam is its owner's MLP on its own input; gradients of every layer reach the one MLP
    k1 = layers["model.layers.1.self_attn.k_proj"]
    x = torch.randn(3, 64)
    assert torch.equal(k1.sparsity(x), q0.sparsity(x))
    k1.sparsity(x).sum().backward()
    assert q0.sparsegen_mlp[2].bias.grad.abs().sum() > 0
    # unshared: one MLP per routed layer
    own = get_lmoe_model(tiny_llama(), LMoEConfig.from_preset("ld-mole", sparsegen_shared=False))
    assert all(m.sparsegen_mlp is not None and m.sparsegen_owner is None for m in own.lmoe_layers().values())


def test_shared_lambda_mlp_refuses_a_sharded_owner():
    model = get_lmoe_model(tiny_llama(), LMoEConfig.from_preset("ld-mole"))
    layers = model.lmoe_layers()
    layers["model.layers.0.self_attn.q_proj"].sparsegen_mlp[0].weight.data = torch.empty(0)  # as FSDP leaves it
    with pytest.raises(RuntimeError) as e:
        layers["model.layers.1.self_attn.q_proj"](torch.randn(3, 64))
    assert str(e.value) == ("sparsegen_shared=True: this layer uses the lam MLP of another layer, which is sharded "
                            "here (FSDP shards per decoder layer); set sparsegen_shared=False or use DDP")


def test_lambda_mlp_init_is_ld_moles():
    """LD-MoLE's init "kaiming": both weights like nn.Linear, both biases -2.5; lam = logsigmoid(.) + 0.99."""
    torch.manual_seed(0)
    layer = LMoELinear(nn.Linear(D_IN, D_OUT), LMoEConfig(target_modules=["x"], router="sparsegen", num_experts=4,
                                                          sparsegen_hidden=6))
    mlp = layer.sparsegen_mlp
    assert torch.equal(mlp[0].bias, torch.full((6,), -2.5)) and torch.equal(mlp[2].bias, torch.full((1,), -2.5))
    bound = 1 / math.sqrt(D_IN)
    assert mlp[0].weight.abs().max() <= bound and mlp[0].weight.std() > bound / 3
    with torch.no_grad():
        mlp[0].weight.zero_()
    lam = layer.sparsity(torch.randn(5, D_IN))
    assert torch.allclose(lam, torch.full((5,), F.logsigmoid(torch.tensor(-2.5)).item() + 0.99))


def test_lambda_mlp_stays_float32():
    model = get_lmoe_model(tiny_llama(), LMoEConfig.from_preset("ld-mole")).to(torch.bfloat16)
    m = model.lmoe_layers()["model.layers.0.self_attn.q_proj"]
    assert all(p.dtype == torch.float32 for p in m.sparsegen_mlp.parameters()) and m.lora_A.dtype == torch.bfloat16
    ids = random_ids()
    with torch.no_grad():
        out = model(input_ids=ids)
    assert torch.isfinite(out.logits).all() and m.last_lambda.dtype == torch.float32


@pytest.mark.parametrize("preset, kw", [("ld-mole", {}), ("ld-mole", {"sparsegen_shared": False}), ("dynmole", {})])
def test_round_trip(preset, kw, tmp_path):
    model = get_lmoe_model(tiny_llama(), LMoEConfig.from_preset(preset, **kw))
    randomize_lora_B(model)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in model.lmoe_layers().values():
            for p in m.adapter_tensors().values():
                if p.requires_grad and p.dim() < 3:  # routers and lam MLPs: random, so that they matter
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(tmp_path)
    loaded = LMoEModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.lmoe_config == model.lmoe_config
    for name, m in model.lmoe_layers().items():
        theirs = loaded.lmoe_layers()[name].adapter_tensors()
        assert theirs.keys() == m.adapter_tensors().keys()
        assert all(torch.equal(theirs[k], v) for k, v in m.adapter_tensors().items()), name
        assert (m.sparsegen_owner is None) == (loaded.lmoe_layers()[name].sparsegen_owner is None)
    ids = random_ids()
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("preset", ["ld-mole", "dynmole"])
def test_inference_path_equals_training_path(preset):
    model = get_lmoe_model(tiny_llama(), LMoEConfig.from_preset(preset, dropout=0.0)).eval()
    randomize_lora_B(model)
    ids = random_ids()
    with torch.no_grad():
        fast = model(input_ids=ids).logits
    slow = model(input_ids=ids).logits
    assert torch.allclose(fast, slow.detach(), atol=1e-5)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("kwargs, message", [
    ({"sparsegen_hidden": 0}, "LMoEConfig.sparsegen_hidden must be an integer >= 1, got 0"),
    ({"sparsegen_hidden": 8.0}, "LMoEConfig.sparsegen_hidden must be an integer >= 1, got 8.0"),
    ({"sparsegen_shared": 1}, "LMoEConfig.sparsegen_shared must be true or false, got 1"),
    ({"sparsity_loss_coef": -1.0}, "LMoEConfig.sparsity_loss_coef must be a finite number >= 0, got -1.0"),
    ({"entropy_loss_coef": float("inf")}, "LMoEConfig.entropy_loss_coef must be a finite number >= 0, got inf"),
    ({"sparsity_loss_coef": 0.1}, "LMoEConfig.sparsity_loss_coef needs router='sparsegen', got router='softmax'"),
    ({"entropy_loss_coef": 0.1, "router": "sparsegen"},
     "LMoEConfig.entropy_loss_coef needs router='dynmole', got router='sparsegen'"),
    ({"top_p": 0}, "LMoEConfig.top_p must be a number in (0, 1], got 0"),
    ({"top_p": 1.5}, "LMoEConfig.top_p must be a number in (0, 1], got 1.5"),
    ({"entropy_threshold": 0.0}, "LMoEConfig.entropy_threshold must be a number in (0, 1], got 0.0"),
    ({"entropy_threshold": "0.9"}, "LMoEConfig.entropy_threshold must be a number in (0, 1], got '0.9'"),
    ({"tsallis_q": 2.5}, "LMoEConfig.tsallis_q must be a number in (0, 2], got 2.5"),
    ({"tsallis_q": float("nan")}, "LMoEConfig.tsallis_q must be a number in (0, 2], got nan"),
    ({"router": "dynmole", "num_experts": 2, "top_k": 3}, "LMoEConfig.top_k must be <= num_experts (2), got 3"),
    ({"router": "sparsegen", "num_experts": [4, 2], "top_k": 3},
     "LMoEConfig.top_k must be <= the smallest num_experts (2), got 3"),
    ({"router": "sparsegen", "balance_bias_rate": 0.1},
     "LMoEConfig.balance_bias_rate needs a top-k router (topk, noisy_topk, sigmoid_topk, implicit), "
     "got router='sparsegen'"),
])
def test_bad_router_fields(kwargs, message):
    with pytest.raises(ValueError) as e:
        LMoEConfig(**kwargs)
    assert str(e.value) == message


def test_presets_and_defaults():
    ld = LMoEConfig.from_preset("ld-mole")
    assert (ld.router, ld.num_experts, ld.rank, ld.alpha, ld.dropout, ld.top_k, ld.sparsegen_hidden,
            ld.sparsegen_shared, ld.aux_loss_coef, ld.sparsity_loss_coef) == (
        "sparsegen", 8, 8, 16.0, 0.1, 2, 512, True, 1.0, 0.0)
    dyn = LMoEConfig.from_preset("dynmole")
    assert (dyn.router, dyn.num_experts, dyn.rank, dyn.alpha, dyn.dropout, dyn.target_modules, dyn.top_k, dyn.top_p,
            dyn.entropy_threshold, dyn.tsallis_q, dyn.aux_loss_coef, dyn.entropy_loss_coef) == (
        "dynmole", 6, 24, 48.0, 0.05, ["gate_proj", "up_proj", "down_proj"], 2, 0.75, 0.9, 1.1, 1e-3, 1e-2)
    # the new fields never change a config that does not use them
    d = LMoEConfig().to_dict()
    assert (d["sparsity_loss_coef"], d["entropy_loss_coef"]) == (0.0, 0.0)
    assert LMoEConfig.from_dict({k: v for k, v in d.items()
                                 if k not in ("sparsegen_hidden", "sparsegen_shared", "sparsity_loss_coef", "top_p",
                                              "entropy_threshold", "tsallis_q", "entropy_loss_coef")}) == LMoEConfig()
