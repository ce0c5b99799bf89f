"""The method-family pieces added for MixLoRA, SMoRA, FlyLoRA and CoMoL, each against a deliberately dumb
per-token loop of its defining equation (outputs and gradients, float64, tiny sizes):

* ``sigmoid_topk`` + the balance bias (SMoRA): g_i = sigmoid(l_i) on the k largest sigmoid(l) + b, else 0;
* ``implicit`` router + ``frozen_sparse_A`` (FlyLoRA): y = W0 x + s * B (mask * A x), mask = top-k of
  |A x + b|, A frozen and sparse;
* ``core_experts`` (CoMoL): y = W0 x + s * B (sum_i g_i C_i) A x;
* ``lora_modules`` (a plain LoRA: equal to PEFT's LoRA) and ``shared_router_modules`` (MixLoRA: gate, up and
  down of one MLP use the gates computed from the MLP input);
* the aux-loss-free bias update b_i += rate * sign(mean(c) - c_i), applied at the next training forward;
* ``static`` gates (CAT): one learned weight per expert and layer.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lmoe import LMoEConfig, LMoELinear, LMoEModel, get_lmoe_model
from lmoe.routing import balance_bias_step, route
from tests.helpers import (assert_matches_reference, float64_input, float64_layer, random_ids, randomize_lora_B,
                           tiny_llama)

D_IN, D_OUT, T = 12, 10, 9


def _layer(seed=0, **kw) -> LMoELinear:
    return float64_layer(D_IN, D_OUT, seed, **kw)


def _x(seed=1):
    return float64_input(T, D_IN, seed)


_check_grads = assert_matches_reference


# ------------------------------------------------------------------ routers


def test_sigmoid_topk_with_bias_by_hand():
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0]])
    s = logits.sigmoid()
    assert torch.equal(route(logits, "sigmoid_topk", 2), torch.tensor([[0, s[0, 1], 0, s[0, 3]]]))
    # the bias changes which experts are selected, never the gate values
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])
    assert torch.equal(route(logits, "sigmoid_topk", 2, bias=bias), torch.tensor([[0, s[0, 1], s[0, 2], 0]]))
    # softmax top-k with a bias: renormalised over the selected experts' *unbiased* logits
    g = route(logits, "topk", 2, bias=bias)
    p = torch.tensor([2.0, -1.0]).softmax(-1)
    assert torch.allclose(g, torch.tensor([[0, p[0], p[1], 0]]))


def test_sigmoid_topk_layer_vs_loop():
    layer = _layer(num_experts=6, rank=2, router="sigmoid_topk", top_k=3, balance_bias_rate=0.1)
    with torch.no_grad():
        layer.routing_bias.copy_(torch.tensor([0.0, 0.3, -0.2, 0.5, 0.0, -0.4], dtype=torch.float64))
    x = _x()
    y = layer(x)
    rows = []
    for t in range(T):  # the dumb loop: per token, per expert
        s = (layer.router.weight @ x[t]).sigmoid()
        chosen = torch.topk(s + layer.routing_bias, 3).indices.tolist()
        upd = sum(s[i] * (layer.lora_B[i] @ (layer.lora_A[i] @ x[t])) for i in chosen)
        rows.append(layer.base_layer(x[t]) + layer.scaling * upd)
    _check_grads(layer, y, torch.stack(rows), x)


def test_implicit_router_flylora_vs_loop():
    layer = _layer(num_experts=8, rank=1, alpha=2.0, router="implicit", top_k=3, frozen_sparse_A=0.25,
                   balance_bias_rate=1e-3)
    a = layer.lora_A.view(8, D_IN)
    assert not layer.lora_A.requires_grad and layer.router is None
    assert ((a != 0).sum(1) == int(0.25 * D_IN)).all()  # exactly p = density * d_in nonzeros per row
    with torch.no_grad():
        layer.routing_bias.copy_(torch.linspace(-0.5, 0.5, 8, dtype=torch.float64))
    x = _x()
    y = layer(x)
    h = x @ a.t()  # (T, N): the rank-1 experts' activations A x
    mask = torch.zeros_like(h).scatter(-1, (h + layer.routing_bias).abs().topk(3, dim=-1).indices, 1.0)
    b = layer.lora_B[:, :, 0].t()  # (d_out, N)
    y_ref = layer.base_layer(x) + layer.scaling * ((h * mask) @ b.t())  # FlyLoRA: B (mask * A x) * alpha / r
    _check_grads(layer, y, y_ref, x)
    assert layer.lora_A.grad is None


def test_core_experts_comol_vs_loop():
    layer = _layer(num_experts=4, rank=3, core_experts=True)
    assert layer.lora_A.shape == (1, 3, D_IN) and layer.lora_B.shape == (1, D_OUT, 3)
    assert layer.lora_C.shape == (4, 3, 3)
    x = _x()
    y = layer(x)
    rows = []
    for t in range(T):
        g = (layer.router.weight @ x[t]).softmax(-1)
        core = sum(g[i] * layer.lora_C[i] for i in range(4))  # the per-token merged r x r core
        rows.append(layer.base_layer(x[t]) + layer.scaling * (layer.lora_B[0] @ (core @ (layer.lora_A[0] @ x[t]))))
    _check_grads(layer, y, torch.stack(rows), x)


def test_fresh_core_layer_equals_base():
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT)
    layer = LMoELinear(base, LMoEConfig(target_modules=["x"], core_experts=True, num_experts=3))
    x = torch.randn(T, D_IN)
    assert torch.equal(layer(x), base(x))
    assert torch.equal(layer.lora_C[1], torch.eye(8))


def test_static_gates_cat():
    layer = _layer(num_experts=3, rank=2, router="static")
    assert layer.router is None and torch.equal(layer.static_gate, torch.ones(3))
    with torch.no_grad():
        layer.static_gate.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x = _x()
    y = layer(x)
    y_ref = layer.base_layer(x) + layer.scaling * sum(
        w * (x @ layer.lora_A[i].t() @ layer.lora_B[i].t()) for i, w in enumerate(layer.static_gate))
    _check_grads(layer, y, y_ref, x)
    assert layer.last_routing is None  # nothing per token: no balance loss, no routing statistics


# ------------------------------------------------------------------ bias balancing


def test_balance_bias_step_by_hand():
    b = torch.zeros(4)
    balance_bias_step(b, torch.tensor([5.0, 1.0, 3.0, 3.0]), 0.1)  # mean 3
    assert torch.equal(b, torch.tensor([-0.1, 0.1, 0.0, 0.0]))


def test_bias_updates_apply_at_the_next_training_forward():
    cfg = LMoEConfig(num_experts=4, rank=2, router="sigmoid_topk", top_k=1, balance_bias_rate=0.01,
                     target_modules=["q_proj"])
    model = get_lmoe_model(tiny_llama(), cfg)
    ids = random_ids(2, 6)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # padding is not counted
    layer = model.lmoe_layers()["model.layers.0.self_attn.q_proj"]
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids)
    assert torch.equal(layer.routing_bias, torch.zeros(4))  # not yet: backward may re-run the layer
    gates = layer.last_routing[1]
    counts = ((gates != 0).float() * mask.reshape(-1, 1)).sum(0)
    assert counts.sum() == 10  # 10 real tokens, top-1
    expected = 0.01 * torch.sign(counts.mean() - counts)
    model.eval()
    model(input_ids=ids, attention_mask=mask)  # eval forwards leave the bias alone
    assert torch.equal(layer.routing_bias, torch.zeros(4))
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids)
    assert torch.equal(layer.routing_bias, expected)


# ------------------------------------------------------------------ MixLoRA: plain LoRA modules, shared router


def test_lora_modules_equal_peft_lora():
    from peft import LoraConfig, get_peft_model

    cfg = LMoEConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"], lora_modules=["q_proj", "v_proj"])
    ours = get_lmoe_model(tiny_llama(), cfg)
    peft = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora_B(ours)
    for name, m in ours.lmoe_layers().items():
        assert m.router is None and m.num_experts == 0 and m.lora_A.shape == (1, 4, 64)
        pm = peft.get_submodule("base_model.model." + name)
        with torch.no_grad():
            pm.lora_A["default"].weight.copy_(m.lora_A[0])
            pm.lora_B["default"].weight.copy_(m.lora_B[0])
    ids = random_ids()
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, peft(input_ids=ids).logits, atol=1e-5)
    out = ours(input_ids=ids, labels=ids)
    assert out.loss is not None and not hasattr(out, "aux_loss")  # no router anywhere: the LM loss


def test_shared_router_mixlora_vs_loop():
    cfg = LMoEConfig.from_preset("mixlora", dropout=0.0)
    model = get_lmoe_model(tiny_llama(), cfg).double()
    randomize_lora_B(model)
    layers = model.lmoe_layers()
    mlp = model.base_model.model.layers[1].mlp
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    assert gate.router is not None and up.router is None and down.router is None
    assert up.router_owner is gate and down.router_owner is gate
    assert layers["model.layers.1.self_attn.q_proj"].num_experts == 0  # attention: plain LoRA
    gate.router.double()  # float32 by design; float64 so that the loop matches to 1e-12
    x = torch.randn(1, 5, 64, dtype=torch.float64, requires_grad=True)
    y = mlp(x)
    flat = x.reshape(5, 64)
    logits = flat @ gate.router.weight.t()
    vals, idx = logits.topk(2, dim=-1)
    g = torch.zeros_like(logits).scatter(-1, idx, vals.softmax(-1))  # ONE routing from the MLP input

    def mixed(m, inp):
        upd = sum(g[:, i:i + 1] * (inp @ m.lora_A[i].t() @ m.lora_B[i].t()) for i in range(8))
        return m.base_layer(inp) + m.scaling * upd

    h = torch.nn.functional.silu(mixed(gate, flat)) * mixed(up, flat)
    y_ref = mixed(down, h)
    assert torch.allclose(y.reshape(5, 64), y_ref, atol=1e-12)
    w = torch.randn_like(y_ref)
    params = [gate.router.weight, gate.lora_A, up.lora_B, down.lora_A, x]
    for a, b in zip(torch.autograd.grad((y.reshape(5, 64) * w).sum(), params),
                    torch.autograd.grad((y_ref * w).sum(), params)):
        assert torch.allclose(a, b, atol=1e-10)


def test_shared_router_errors():
    with pytest.raises(ValueError) as e:
        get_lmoe_model(tiny_llama(), LMoEConfig(target_modules=["q_proj"], shared_router_modules=["gate_proj",
                                                                                                   "up_proj"]))
    assert str(e.value).startswith("shared_router_modules=['gate_proj', 'up_proj']: no parent module has two of "
                                   "them adapted with routed experts; adapted layers: [model.layers.0.self_attn")
    model = get_lmoe_model(tiny_llama(), LMoEConfig(target_modules=["gate_proj", "up_proj"],
                                                    shared_router_modules=["gate_proj", "up_proj"]))
    up = model.base_model.model.layers[0].mlp.up_proj
    with pytest.raises(RuntimeError, match="ran before the layer that owns the router"):
        up(torch.randn(3, 64))


@pytest.mark.parametrize("kwargs, message", [
    ({"core_experts": 1}, "LMoEConfig.core_experts must be true or false, got 1"),
    ({"core_experts": True, "share_A": True}, "LMoEConfig.core_experts already shares A (and B); set share_A=False"),
    ({"frozen_sparse_A": 0.0}, "LMoEConfig.frozen_sparse_A must be a density in (0, 1] or None, got 0.0"),
    ({"balance_bias_rate": -1.0}, "LMoEConfig.balance_bias_rate must be a finite number >= 0, got -1.0"),
    ({"balance_bias_rate": 0.1}, "LMoEConfig.balance_bias_rate needs a top-k router (topk, noisy_topk, "
                                 "sigmoid_topk, implicit), got router='softmax'"),
    ({"router": "implicit", "rank": 2}, "LMoEConfig.router='implicit' (FlyLoRA) routes on each expert's own "
                                        "rank-1 activation and needs rank=1, got rank=2"),
    ({"router": "implicit", "rank": 1, "share_A": True},
     "LMoEConfig.router='implicit' needs each expert's own A (share_A and core_experts off)"),
    ({"lora_modules": []}, "LMoEConfig.lora_modules must be None, a non-empty regex or a non-empty list of names, "
                           "got []"),
    ({"shared_router_modules": ["up_proj"]}, "LMoEConfig.shared_router_modules must be None or a list of at least "
                                             "2 module names (no dots), got ['up_proj']"),
    ({"shared_router_modules": ["a", "b"], "router": "static"},
     "LMoEConfig.shared_router_modules needs a learned router, got router='static'"),
    ({"router_init_std": 0}, "LMoEConfig.router_init_std must be a finite number > 0 or None, got 0"),
])
def test_bad_family_fields(kwargs, message):
    with pytest.raises(ValueError) as e:
        LMoEConfig(**kwargs)
    assert str(e.value) == message


def test_router_init_std():
    torch.manual_seed(0)
    layer = LMoELinear(nn.Linear(256, 8), LMoEConfig(target_modules=["x"], num_experts=64, router_init_std=0.02))
    assert abs(layer.router.weight.std().item() - 0.02) < 0.001


def test_bias_and_cores_round_trip(tmp_path):
    for preset in ("smora", "flylora", "comol", "mixlora"):
        model = get_lmoe_model(tiny_llama(), LMoEConfig.from_preset(preset))
        randomize_lora_B(model)
        for m in model.lmoe_layers().values():
            if m.routing_bias is not None:
                m.routing_bias.normal_()
        model.save_pretrained(tmp_path / preset)
        loaded = LMoEModel.from_pretrained(tiny_llama(), tmp_path / preset)
        for name, m in model.lmoe_layers().items():
            theirs = loaded.lmoe_layers()[name].adapter_tensors()
            assert theirs.keys() == m.adapter_tensors().keys()
            assert all(torch.equal(theirs[k], v) for k, v in m.adapter_tensors().items()), (preset, name)
        ids = random_ids()
        model.eval()
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("preset", ["lmoe", "lmoe-factor", "hydralora", "shared-expert", "mixlora", "smora",
                                    "flylora", "comol", "switch"])
def test_inference_path_equals_training_path(preset):
    """The no-grad path (cached weight views, generation) gives the autograd path's output, also after an
    in-place update (seen through the views) and after a dtype change (which swaps the storage)."""
    model = get_lmoe_model(tiny_llama(), LMoEConfig.from_preset(preset, dropout=0.0)).eval()
    randomize_lora_B(model)
    ids = random_ids()
    for step in range(3):
        with torch.no_grad():
            fast = model(input_ids=ids).logits
        slow = model(input_ids=ids).logits  # grad enabled: the fused autograd path
        assert torch.allclose(fast, slow.detach(), atol=1e-5), (preset, step)
        if step == 0:
            randomize_lora_B(model, seed=5)  # in place
        elif step == 1:
            model.double()
            assert fast.dtype == torch.float32
    assert slow.dtype == torch.float64
