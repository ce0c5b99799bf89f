"""LMoELinear, the routers and LMoEConfig against deliberately dumb references (CPU, tiny, seeded)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from lmoe import LMoEConfig, LMoELinear, mixture
from lmoe.routing import route

D_IN, D_OUT, N, R, ALPHA = 12, 10, 4, 3, 6.0  # s = alpha / r = 2


def make_layer(composition="delta", router="softmax", num_experts=N, rank=R, top_k=2, seed=0, d_in=D_IN,
               d_out=D_OUT, random_b=True):
    torch.manual_seed(seed)
    cfg = LMoEConfig(num_experts=num_experts, rank=rank, alpha=ALPHA, router=router, top_k=top_k,
                     composition=composition, target_modules=["proj"])
    layer = LMoELinear(nn.Linear(d_in, d_out), cfg)
    if random_b:
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape) * 0.5)
    return layer


# ------------------------------------------------------------------ the dumb reference


def loop_reference(x, W0, b, A, B, Wg, scaling, router, k, composition, gates=None):
    """y for every token, building the full d_out x d_in matrix dW_t with a Python loop over experts.

    x: (..., d_in). If ``gates`` (T, N) is given it is used as is, else computed from Wg token by token.
    """
    n = A.shape[0]
    flat = x.reshape(-1, x.shape[-1])
    ys = []
    for t in range(flat.shape[0]):
        xt = flat[t]
        if gates is None:
            logits = Wg.to(xt.dtype) @ xt  # (N,); the layer keeps W_g in float32
            if router == "softmax":
                keep = list(range(n))
            else:
                keep = sorted(range(n), key=lambda i: float(logits[i].detach()), reverse=True)[:k]
            e = torch.exp(logits[keep] - logits[keep].max())
            g = [logits.new_zeros(())] * n
            for j, i in enumerate(keep):
                g[i] = e[j] / e.sum()
        else:
            g = [gates[t, i] for i in range(n)]
        if composition == "delta":
            dW = torch.zeros(B.shape[1], A.shape[2], dtype=x.dtype)
            for i in range(n):
                dW = dW + g[i] * (B[i] @ A[i])
        else:
            Bbar = sum(g[i] * B[i] for i in range(n))
            Abar = sum(g[i] * A[i] for i in range(n))
            dW = Bbar @ Abar
        ys.append(W0 @ xt + b + scaling * (dW @ xt))
    return torch.stack(ys).reshape(*x.shape[:-1], -1)


def grads_of(out, tensors, proj):
    return torch.autograd.grad((out * proj).sum(), tensors)


@pytest.mark.parametrize("router", ["softmax", "topk"])
@pytest.mark.parametrize("composition", ["delta", "factor"])
def test_forward_and_grads_match_loop_reference(composition, router):
    layer = make_layer(composition, router).double()
    # The router runs in float32 by design (it casts x and W_g): make x and W_g float32-exact so the only
    # difference left from the all-float64 reference is float32 rounding of the logits (~1e-7 relative).
    torch.manual_seed(1)
    x = torch.randn(2, 3, D_IN).double().requires_grad_(True)  # (batch, seq, d_in)
    with torch.no_grad():
        layer.router.weight.copy_(layer.router.weight.float().double() * 3)  # sharper gates than at init
    proj = torch.randn(2, 3, D_OUT, dtype=torch.float64)

    y = layer(x)
    assert y.shape == (2, 3, D_OUT) and y.dtype == torch.float64
    params = [x, layer.lora_A, layer.lora_B, layer.router.weight]
    g_layer = grads_of(y, params, proj)

    W0 = layer.base_layer.weight.detach()
    b = layer.base_layer.bias.detach()
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    Wg = layer.router.weight.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    y_ref = loop_reference(xr, W0, b, A, B, Wg, ALPHA / R, router, 2, composition)
    g_ref = grads_of(y_ref, [xr, A, B, Wg], proj)

    # The update is not negligible, so the comparison really tests the mixture.
    assert (y_ref - layer.base_layer(xr)).abs().max() > 0.5
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    for name, got, want in zip(["x", "lora_A", "lora_B", "router.weight"], g_layer, g_ref):
        assert want.abs().max() > 1e-3, name  # every gradient is really exercised
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("router", ["softmax", "topk"])
@pytest.mark.parametrize("composition", ["delta", "factor"])
def test_mixture_matches_loop_given_gates_float64_tight(composition, router):
    """The expert math alone, all in float64, to 1e-12: gates are taken from the layer's own routing."""
    layer = make_layer(composition, router).double()
    torch.manual_seed(1)
    x = torch.randn(2, 3, D_IN, dtype=torch.float64)
    y = layer(x)
    gates = layer.last_routing[1].double()  # (T, N)
    if router == "topk":
        assert ((gates > 0).sum(-1) == 2).all()
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    y_ref = loop_reference(x, layer.base_layer.weight.detach(), layer.base_layer.bias.detach(), A, B, None,
                           ALPHA / R, router, 2, composition, gates=gates)
    torch.testing.assert_close(y.detach(), y_ref, rtol=1e-12, atol=1e-12)
    # The free function, on the stacked layout, gives the same update.
    delta = mixture(x.reshape(-1, D_IN), A.reshape(-1, D_IN), B.permute(1, 0, 2).reshape(D_OUT, -1), gates,
                    ALPHA / R, composition)
    torch.testing.assert_close(delta.view(2, 3, D_OUT), y_ref - layer.base_layer(x).detach(),
                               rtol=1e-12, atol=1e-12)


def test_factor_differs_from_delta():
    """Same weights, two compositions: the cross terms B_i A_j make them different."""
    x = torch.randn(2, 3, D_IN)
    delta, factor = make_layer("delta"), make_layer("factor")
    factor.load_state_dict(delta.state_dict())
    assert (delta(x) - factor(x)).abs().max() > 1e-2


# ------------------------------------------------------------------ init and identity at start


@pytest.mark.parametrize("router", ["softmax", "topk"])
@pytest.mark.parametrize("composition", ["delta", "factor"])
def test_zero_B_at_init_gives_exactly_the_base_output(composition, router):
    layer = make_layer(composition, router, random_b=False)
    x = torch.randn(2, 5, D_IN)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_initialisation_shapes_bounds_and_router():
    d_in, d_out, n, r = 256, 48, 4, 8
    torch.manual_seed(0)
    layer = LMoELinear(nn.Linear(d_in, d_out), LMoEConfig(num_experts=n, rank=r, target_modules=["x"]))
    assert layer.lora_A.shape == (n, r, d_in)
    assert layer.lora_B.shape == (n, d_out, r)
    bound = 1 / math.sqrt(d_in)  # nn.Linear's kaiming_uniform(a=sqrt(5)) bound: fan_in = d_in, per expert
    for i in range(n):
        a = layer.lora_A[i].detach()
        assert a.abs().max() <= bound
        assert a.abs().max() > 0.9 * bound  # uniform on [-bound, bound] with 2048 draws: not all tiny
        assert abs(a.std().item() - bound / math.sqrt(3)) < 0.1 * bound
    assert not torch.equal(layer.lora_A[0], layer.lora_A[1])  # experts are not copies of each other
    assert torch.equal(layer.lora_B, torch.zeros(n, d_out, r))
    assert type(layer.router) is nn.Linear
    assert (layer.router.in_features, layer.router.out_features) == (d_in, n)
    assert layer.router.bias is None
    assert layer.router.weight.dtype == torch.float32


def test_router_stays_float32_and_experts_follow_base_dtype():
    base = nn.Linear(D_IN, D_OUT).to(torch.bfloat16)
    layer = LMoELinear(base, LMoEConfig(num_experts=N, rank=R, target_modules=["x"]))
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
    assert layer.router.weight.dtype == torch.float32
    y = layer(torch.randn(3, D_IN, dtype=torch.bfloat16))
    logits, gates = layer.last_routing
    assert y.dtype == torch.bfloat16 and logits.dtype == torch.float32 and gates.dtype == torch.float32


def test_one_expert_equals_peft_lora_with_same_weights():
    peft = pytest.importorskip("peft")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(D_IN, D_OUT)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    tiny = Tiny()
    ours = LMoELinear(nn.Linear(D_IN, D_OUT), LMoEConfig(num_experts=1, rank=R, alpha=ALPHA, target_modules=["proj"]))
    ours.base_layer.load_state_dict(tiny.proj.state_dict())
    with torch.no_grad():
        ours.lora_B.normal_()
        ours.router.weight.normal_()  # any router: with one expert the gate is identically 1
    theirs = peft.get_peft_model(tiny, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                       target_modules=["proj"]))
    lora = theirs.base_model.model.proj
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(ours.lora_A[0])
        lora.lora_B["default"].weight.copy_(ours.lora_B[0])
    assert lora.scaling["default"] == ours.scaling == ALPHA / R

    x1 = torch.randn(2, 5, D_IN, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y_ours, y_theirs = ours(x1), theirs(x2)
    assert torch.equal(ours.last_routing[1], torch.ones(10, 1))
    assert (y_theirs - tiny.proj.base_layer(x2)).abs().max() > 0.1  # the LoRA update is non-trivial
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    proj = torch.randn(2, 5, D_OUT)
    torch.testing.assert_close(torch.autograd.grad((y_ours * proj).sum(), x1)[0],
                               torch.autograd.grad((y_theirs * proj).sum(), x2)[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ storage layout


def _b_is_stacked_view(layer):
    bt = layer.lora_B.permute(1, 0, 2)  # (d_out, N, r)
    flat = bt.reshape(layer.out_features, -1)  # what forward uses
    return bt.is_contiguous() and flat.data_ptr() == layer.lora_B.data_ptr()


def test_lora_B_layout_survives_adamw_and_load_state_dict():
    layer = make_layer()
    assert _b_is_stacked_view(layer)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    before = layer.lora_B.detach().clone()
    layer(torch.randn(4, D_IN)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(layer.lora_B, before)  # the step really changed B
    assert _b_is_stacked_view(layer)

    other = make_layer(seed=5)
    sd = {k: v.contiguous() for k, v in other.state_dict().items()}  # plain (N, d_out, r) contiguous tensors
    assert not sd["lora_B"].permute(1, 0, 2).is_contiguous()
    layer.load_state_dict(sd)
    assert torch.equal(layer.lora_B, other.lora_B)
    assert _b_is_stacked_view(layer)
    layer.double()
    assert _b_is_stacked_view(layer)


# ------------------------------------------------------------------ routers


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_gates_have_k_nonzeros_summing_to_one(k):
    torch.manual_seed(0)
    logits = torch.randn(50, 6)
    gates = route(logits, "topk", k)
    assert gates.shape == (50, 6)
    assert ((gates != 0).sum(-1) == k).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(50))
    top = logits.topk(k, dim=-1)
    # The kept experts are the k largest logits, weighted by a softmax over just those.
    torch.testing.assert_close(gates.gather(-1, top.indices), top.values.softmax(-1))


def test_softmax_gates_are_the_full_softmax():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(4.0), 0.0]])
    torch.testing.assert_close(route(logits, "softmax", 2), torch.tensor([[0.25, 0.75], [0.8, 0.2]]))
    with pytest.raises(ValueError, match="unknown router 'nope'"):
        route(logits, "nope", 1)


# ------------------------------------------------------------------ no Python loop over experts


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _op_counts(num_experts, composition, router):
    layer = make_layer(composition, router, num_experts=num_experts)
    x = torch.randn(2, 3, D_IN, requires_grad=True)
    with _CountOps() as c:
        layer(x).sum().backward()
    return c.counts


@pytest.mark.parametrize("router", ["softmax", "topk"])
@pytest.mark.parametrize("composition", ["delta", "factor"])
def test_forward_and_backward_op_counts_do_not_depend_on_num_experts(composition, router):
    c2, c16 = _op_counts(2, composition, router), _op_counts(16, composition, router)
    assert c2 == c16  # a loop over experts would multiply some count by 8
    gemms = c2["mm"] + c2["addmm"] + c2["bmm"] + c2["matmul"]
    assert 4 <= gemms <= 12, c2  # base, router, x A^T, z B^T forward + their backward


# ------------------------------------------------------------------ config validation


@pytest.mark.parametrize("kwargs, message", [
    ({"num_experts": 0}, "LMoEConfig.num_experts must be an integer >= 1, got 0"),
    ({"num_experts": 2.0}, "LMoEConfig.num_experts must be an integer >= 1, got 2.0"),
    ({"rank": 0}, "LMoEConfig.rank must be an integer >= 1, got 0"),
    ({"alpha": 0}, "LMoEConfig.alpha must be a finite number > 0, got 0"),
    ({"alpha": float("nan")}, "LMoEConfig.alpha must be a finite number > 0, got nan"),
    ({"dropout": 1.0}, "LMoEConfig.dropout must be a number in [0, 1), got 1.0"),
    ({"router": "foo"}, "LMoEConfig.router must be one of softmax, topk, noisy_topk, switch, sigmoid_topk, implicit, "
                        "static, sparsegen, dynmole, hard_soft, got 'foo'"),
    ({"composition": "bar"}, "LMoEConfig.composition must be one of delta, factor, got 'bar'"),
    ({"router": "topk", "num_experts": 4, "top_k": 5}, "LMoEConfig.top_k must be <= num_experts (4), got 5"),
    ({"top_k": 0}, "LMoEConfig.top_k must be an integer >= 1, got 0"),
    ({"aux_loss_coef": -1}, "LMoEConfig.aux_loss_coef must be a finite number >= 0, got -1"),
    ({"z_loss_coef": -0.5}, "LMoEConfig.z_loss_coef must be a finite number >= 0, got -0.5"),
    ({"target_modules": []}, "LMoEConfig.target_modules must be a non-empty regex or list of names, got []"),
    ({"target_modules": ""}, "LMoEConfig.target_modules must be a non-empty regex or list of names, got ''"),
])
def test_bad_config_values_raise_with_exact_message(kwargs, message):
    with pytest.raises(ValueError) as e:
        LMoEConfig(**kwargs)
    assert str(e.value) == message


def test_top_k_above_num_experts_is_fine_for_softmax_router():
    assert LMoEConfig(router="softmax", num_experts=2, top_k=5).top_k == 5


def test_from_dict_rejects_unknown_key_and_round_trips():
    with pytest.raises(ValueError) as e:
        LMoEConfig.from_dict({"rank": 4, "num_expert": 2})
    assert str(e.value) == ("LMoEConfig: unknown field(s) num_expert; known: alpha, aux_loss_coef, balance_bias_rate, "
                            "capacity_factor, composition, core_experts, dropout, entropy_loss_coef, "
                            "entropy_threshold, frozen_sparse_A, lbc_delta, lbc_loss_coef, lbc_world_fraction, "
                            "lora_modules, num_experts, rank, router, router_init_std, rsl_loss_coef, share_A, "
                            "shared_experts, shared_router_modules, sparsegen_hidden, "
                            "sparsegen_shared, sparsity_loss_coef, target_modules, top_k, top_p, tsallis_q, "
                            "z_loss_coef")
    cfg = LMoEConfig(num_experts=3, rank=2, target_modules=("q_proj",), router="topk", top_k=3)
    assert cfg.target_modules == ["q_proj"]
    assert LMoEConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.scaling == 16.0 / 2


def test_router_stays_float32_after_module_dtype_casts():
    layer = make_layer()
    layer.to(torch.bfloat16)
    assert layer.router.weight.dtype == torch.float32 and layer.lora_A.dtype == torch.bfloat16
    layer.double()
    assert layer.router.weight.dtype == torch.float32 and layer.lora_B.dtype == torch.float64
    assert layer.lora_B.permute(1, 0, 2).is_contiguous()


@pytest.mark.parametrize("composition", ["delta", "factor"])
def test_fused_mixture_matches_autograd_reference_and_gradcheck(composition):
    from lmoe import mixture_reference

    torch.manual_seed(0)
    t, n, r, d_in, d_out = 7, 4, 3, 5, 6
    x, A, B = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((t, d_in), (n * r, d_in), (d_out, n * r)))
    g = torch.rand(t, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: mixture(*a, 2.0, composition), (x, A, B, g))
    y, y_ref = mixture(x, A, B, g, 2.0, composition), mixture_reference(x, A, B, g, 2.0, composition)
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), (x, A, B, g))
    grads_ref = torch.autograd.grad((y_ref * w).sum(), (x, A, B, g))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fused_mixture_saves_one_activation_of_size_T_by_Nr():
    # Saved-for-backward bytes: the fused Function keeps x, h and the gates; plain autograd also keeps z.
    from lmoe import mixture_reference

    t, n, r, d_in, d_out = 64, 8, 4, 16, 16
    x = torch.randn(t, d_in, requires_grad=True)
    A, B = torch.randn(n * r, d_in, requires_grad=True), torch.randn(d_out, n * r, requires_grad=True)
    g = torch.rand(t, n, requires_grad=True)

    def saved_activation_numel(fn):
        seen = {}

        def pack(tensor):
            if tensor.data_ptr() not in (x.data_ptr(), A.data_ptr(), B.data_ptr(), g.data_ptr()):
                seen[tensor.data_ptr()] = tensor.numel()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            fn(x, A, B, g, 2.0, "delta")
        return sum(seen.values())

    assert saved_activation_numel(mixture) == t * n * r  # h only
    assert saved_activation_numel(mixture_reference) >= 2 * t * n * r  # h and z


@pytest.mark.parametrize("composition", ["delta", "factor"])
def test_bf16_autocast_on_cpu_keeps_gate_float32_and_matches_fp32(composition):
    layer = make_layer(composition)
    torch.manual_seed(3)
    x = torch.randn(2, 5, D_IN, requires_grad=True)
    y32 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x)
    logits, gates = layer.last_routing
    assert logits.dtype == gates.dtype == torch.float32 and y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.05)
    y16.float().sum().backward()
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
    assert layer.router.weight.grad.dtype == torch.float32 and torch.isfinite(layer.lora_A.grad).all()


@pytest.mark.parametrize("router", ["softmax", "topk"])
@pytest.mark.parametrize("composition", ["delta", "factor"])
def test_inference_path_equals_training_path(composition, router):
    layer = make_layer(composition, router)
    x = torch.randn(2, 5, D_IN)
    y_train = layer(x)
    with torch.no_grad():
        y_infer = layer(x)
        with torch.no_grad():
            layer.lora_B.zero_()
            y_zero = layer(x)
    torch.testing.assert_close(y_infer, y_train, rtol=1e-5, atol=1e-6)
    assert not torch.equal(y_infer, layer.base_layer(x))
    assert torch.equal(y_zero, layer.base_layer(x))  # B = 0 is exactly the base on the inference path too
