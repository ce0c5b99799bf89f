"""LoRAMoE and LoRA-Mixer, each against a deliberately dumb loop of its defining equation (float64, tiny sizes),
small cases of their losses by hand (with and without task types, padding masked), the collator's task types,
save / load and the exact validation messages:

* LoRAMoE (Dou et al. 2023, code Ablustrund/LoRAMoE ``peft/tuners/lora.py``): a dense softmax over LoRA experts;
  localised balancing constraint per layer ``cv_squared(flatten(Q * I))`` with ``Q_bi = sum_t g_bti`` (padding
  masked) and ``I_bi = 1 + delta`` where expert i's group (first half: world knowledge, task type 1; second half:
  downstream, type 0) matches sample b's type, ``1 - delta`` where not (1 for an unknown type or no types);
  ``cv_squared(x) = var(x) / (mean(x)^2 + 1e-10)``.
* LoRA-Mixer (Li et al., ICLR 2026; no code released, our reading, docs/methods.md): ``hard_soft`` gates = the
  top-k router's values with the dense softmax's gradient; routing specialisation loss
  ``mean_t H(p_t) / log N + 1 - H(mean_t p_t) / log N``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lmoe import LMoEConfig, LMoELinear, LMoEModel, get_lmoe_model
from lmoe.dataset import BUNDLED_TASK_TYPES, DataCollator
from lmoe.routing import cv_squared, hard_soft_gates, localized_balance_loss, route, specialization_loss
from lmoe.train import LOG_COLUMNS, LMoETrainer
from tests.helpers import (assert_matches_reference, float64_input, float64_layer, random_ids, randomize_lora_B,
                           tiny_llama)
from tests.test_cli import workdir  # noqa: F401  (the module-scoped tiny model folder + data)

D_IN, D_OUT, T = 12, 10, 9
F64 = torch.float64


def _layer(seed=0, router_scale=1.0, **kw) -> LMoELinear:
    return float64_layer(D_IN, D_OUT, seed, router_scale, **kw)


def _mixture_row(layer, x_t, gates_t):
    """s * sum_i g_i B_i A_i x for one token, expert by expert."""
    return layer.scaling * sum(gates_t[i] * (layer.lora_B[i] @ (layer.lora_A[i] @ x_t)) for i in range(len(gates_t)))


# ------------------------------------------------------------------ LoRAMoE: the layer


def test_loramoe_layer_vs_loop():
    """LoRAMoE's Linear: y = W0 x + b + s sum_i softmax(W_r x)_i B_i A_i x (peft/tuners/lora.py), here at the
    preset's sizes except d."""
    cfg = LMoEConfig.from_preset("loramoe", dropout=0.0).to_dict()
    cfg.pop("target_modules")
    layer = _layer(**cfg, router_scale=3.0)
    x = float64_input(T, D_IN)
    y = layer(x)
    rows = []
    for t in range(T):
        z = layer.router.weight @ x[t]
        e = torch.stack([torch.exp(z[i] - z.max()) for i in range(len(z))])
        rows.append(layer.base_layer(x[t]) + _mixture_row(layer, x[t], e / e.sum()))
    assert_matches_reference(layer, y, torch.stack(rows), x, all_grads=True)


# ------------------------------------------------------------------ LoRAMoE: the localised balancing constraint


def _official_blc(route_weight, task_types, n, alpha):
    """LoRAMoE's code, peft/tuners/lora.py Linear.forward, verbatim up to names (route_weight (B, S, N))."""
    task_types = task_types.view(-1, 1)
    weight = torch.where(torch.concat(((task_types == 1).repeat(1, n // 2), (task_types == 0).repeat(1, n // 2)),
                                      dim=-1), 1.0 + alpha, 1.0 - alpha)
    x = (route_weight.sum(dim=1) * weight).flatten()
    return x.var() / (x.mean() ** 2 + 1e-10)


def _lbc_loop(gates, batch, n_world, delta, task_type=None, keep=None):
    """The constraint sample by sample, expert by expert, with Python loops."""
    t, n = gates.shape
    s = t // batch
    z = []
    for b in range(batch):
        for i in range(n):
            q = sum(gates[b * s + j, i] for j in range(s) if keep is None or keep[b * s + j])
            typ = None if task_type is None else int(task_type[b])
            if typ in (0, 1):
                group = 1 if i < n_world else 0
                q = q * ((1 + delta) if group == typ else (1 - delta))
            z.append(q)
    z = torch.stack(z)
    mean = sum(z) / len(z)
    var = sum((v - mean) ** 2 for v in z) / (len(z) - 1)
    return var / (mean ** 2 + 1e-10)


def test_lbc_by_hand():
    # 2 samples of 2 tokens, 2 experts (expert 0: world knowledge, expert 1: downstream); sample 1's 2nd token is padding
    gates = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [1.0, 0.0]], dtype=F64)
    keep = torch.tensor([True, True, True, False])
    # Q = [[1.25, 0.75], [0.25, 0.75]]; types [1, 0], delta 0.5: Z = [1.875, 0.375, 0.125, 1.125], mean 7/8,
    # unbiased var 1.875 / 3 = 5/8, CV^2 = (5/8) / (49/64) = 40/49
    tt = torch.tensor([1, 0])
    assert math.isclose(localized_balance_loss(gates, 2, 1, 0.5, tt, keep).item(), 40 / 49, rel_tol=1e-9)
    # no task types: Z = Q = [1.25, 0.75, 0.25, 0.75], mean 3/4, var (1/2) / 3, CV^2 = (1/6) / (9/16) = 8/27
    assert math.isclose(localized_balance_loss(gates, 2, 1, 0.5, None, keep).item(), 8 / 27, rel_tol=1e-9)
    assert math.isclose(localized_balance_loss(gates, 2, 1, 0.0, tt, keep).item(), 8 / 27, rel_tol=1e-9)  # delta 0
    # sample 0 of unknown type (-1): weight 1 there; Z = [1.25, 0.75, 0.125, 1.125], mean 13/16, CV^2 = 196/507
    tt = torch.tensor([-1, 0])
    assert math.isclose(localized_balance_loss(gates, 2, 1, 0.5, tt, keep).item(), 196 / 507, rel_tol=1e-9)
    # padding counted (no mask): Q = [[1.25, 0.75], [1.25, 0.75]], mean 1, var 4 * (1/16) / 3, CV^2 = 1/12
    assert math.isclose(localized_balance_loss(gates, 2, 1, 0.5, None).item(), 1 / 12, rel_tol=1e-9)
    # one sample, one expert: a single entry has no variation
    assert localized_balance_loss(gates[:2, :1], 1, 0, 0.5).item() == 0.0
    assert cv_squared(torch.tensor([3.0])).item() == 0.0
    with pytest.raises(ValueError, match="cannot split 4 routed tokens into 3 samples"):
        localized_balance_loss(gates, 3, 1, 0.5)


def test_lbc_equals_loramoes_code_and_the_loop():
    g = torch.Generator().manual_seed(0)
    batch, seq, n = 4, 5, 6
    gates = torch.randn(batch * seq, n, generator=g, dtype=F64).softmax(-1)
    tt = torch.tensor([1, 0, 0, 1])
    ours = localized_balance_loss(gates, batch, n // 2, 0.3, tt)
    torch.testing.assert_close(ours, _official_blc(gates.view(batch, seq, n), tt, n, 0.3))
    torch.testing.assert_close(ours, _lbc_loop(gates, batch, n // 2, 0.3, tt))
    keep = torch.rand(batch * seq, generator=g) > 0.3
    tt = torch.tensor([1, -1, 0, 1])
    torch.testing.assert_close(localized_balance_loss(gates, batch, 2, 0.3, tt, keep),
                               _lbc_loop(gates, batch, 2, 0.3, tt, keep))
    torch.testing.assert_close(localized_balance_loss(gates, batch, 2, 0.3, None, keep),
                               _lbc_loop(gates, batch, 2, 0.3, None, keep))
    # an odd N: floor(0.5 * 5) = 2 world-knowledge experts (LoRAMoE's code needs an even N)
    assert LMoEConfig(lbc_world_fraction=0.5).lbc_world_experts(5) == 2
    assert LMoEConfig(lbc_world_fraction=0.75).lbc_world_experts(8) == 6


def _masked(ids):
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return mask


@pytest.mark.parametrize("with_types", [True, False])
def test_lbc_in_a_model_by_hand(with_types):
    cfg = LMoEConfig.from_preset("loramoe", num_experts=4, rank=2, lbc_loss_coef=0.3, lbc_delta=0.2,
                                 aux_loss_coef=0.1, target_modules=["q_proj", "down_proj"])
    model = get_lmoe_model(tiny_llama(), cfg)
    randomize_lora_B(model)
    ids = random_ids()
    mask = _masked(ids)
    keep = mask.reshape(-1).bool()
    tt = torch.tensor([1, 0]) if with_types else None
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids, task_type=tt)
    per_layer = [_lbc_loop(m.last_routing[1], 2, 2, 0.2, tt, keep) for m in model.lmoe_layers().values()]
    torch.testing.assert_close(out.lbc_loss, torch.stack(per_layer).mean())
    torch.testing.assert_close(out.loss, out.lm_loss + 0.1 * out.aux_loss + 0.3 * out.lbc_loss)
    assert out.rsl_loss is None and out.sparsity_loss is None and out.entropy_loss is None
    out.loss.backward()
    assert all(m.router.weight.grad.abs().sum() > 0 for m in model.lmoe_layers().values())
    # the coefficient 0: not computed, not added
    off = get_lmoe_model(tiny_llama(), LMoEConfig.from_preset("loramoe", lbc_loss_coef=0.0))
    o = off(input_ids=ids, attention_mask=mask, labels=ids, task_type=torch.tensor([1, 0]))
    assert o.lbc_loss is None
    torch.testing.assert_close(o.loss, o.lm_loss)


def test_task_type_never_reaches_the_base_model_and_is_checked():
    model = get_lmoe_model(tiny_llama(), LMoEConfig.from_preset("loramoe", lbc_loss_coef=1.0, lbc_delta=0.1))
    seen = []
    model.base_model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    ids = random_ids()
    model(input_ids=ids, labels=ids, task_type=torch.tensor([0, 1]))
    assert seen == [{"input_ids", "labels"}]
    with pytest.raises(ValueError) as e:
        model(input_ids=ids, labels=ids, task_type=torch.tensor([0, 1, 1]))
    assert str(e.value) == "task_type has 3 entries for a batch of 2 samples"
    with pytest.raises(ValueError) as e:
        model(input_ids=ids, labels=ids, task_type=torch.tensor([[0], [1]]))
    assert str(e.value) == "task_type must be a 1-D tensor of one value per sample (1, 0 or -1), got torch.Size([2, 1])"


# ------------------------------------------------------------------ the collator's task types


def test_collator_emits_task_types():
    features = [{"input_ids": [5, 6], "labels": [5, 6], "task": "arc_easy"},
                {"input_ids": [7], "labels": [7], "task": "boolq"},
                {"input_ids": [8, 9, 10], "labels": [8, 9, 10], "task": "my_task"},
                {"input_ids": [4], "labels": [4]}]
    batch = DataCollator(0, task_types=BUNDLED_TASK_TYPES)(features)
    assert torch.equal(batch["task_type"], torch.tensor([1, 0, -1, -1])) and batch["task_type"].dtype == torch.long
    assert "task_type" not in DataCollator(0)(features)  # off by default: the batch keys are unchanged
    assert torch.equal(DataCollator(0, task_types={"my_task": 1})(features)["task_type"], torch.tensor([-1, -1, 1, -1]))
    assert BUNDLED_TASK_TYPES == {"arc_easy": 1, "boolq": 0, "gsm8k": 0, "mbpp": 0, "tinyshakespeare": 0}
    for bad, message in [({"a": 2}, "task_types maps task names to 1 (world knowledge) or 0 (downstream task), "
                                     "got 'a': 2"),
                         ({"a": True}, "task_types maps task names to 1 (world knowledge) or 0 (downstream task), "
                                       "got 'a': True"),
                         ([("a", 1)], "task_types must be a dict of task name to 0 or 1, got list")]:
        with pytest.raises(ValueError) as e:
            DataCollator(0, task_types=bad)
        assert str(e.value) == message
    # the batch goes straight into the model
    model = get_lmoe_model(tiny_llama(), LMoEConfig.from_preset("loramoe", lbc_loss_coef=0.5, lbc_delta=0.1))
    out = model(**DataCollator(0, task_types=BUNDLED_TASK_TYPES)(features))
    assert out.lbc_loss is not None and torch.isfinite(out.loss)


# ------------------------------------------------------------------ LoRA-Mixer: hard-soft gates


def _hard_soft_loop(z, k):
    """One token: p = softmax(z); the top-k router's values (softmax over the k largest), the dense p's gradient."""
    n = len(z)
    e = torch.stack([torch.exp(z[i] - z.max()) for i in range(n)])
    p = e / e.sum()
    top = sorted(range(n), key=lambda i: -float(z[i].detach()))[:k]
    ez = sum(torch.exp(z[i] - z.max()) for i in top)
    hard = torch.stack([(torch.exp(z[i] - z.max()) / ez).detach() if i in top else z[i].detach() * 0 for i in range(n)])
    return torch.stack([p[i] + (hard[i] - p[i]).detach() for i in range(n)])


def test_hard_soft_by_hand():
    z = torch.tensor([[2.0, 0.0, 1.0, -1.0]], dtype=F64, requires_grad=True)
    g = hard_soft_gates(z, 2)
    # values: exactly the top-2 router's
    torch.testing.assert_close(g, route(z.detach(), "topk", 2), rtol=0, atol=1e-15)
    assert g[0, 1].item() == 0.0 and g[0, 3].item() == 0.0
    # gradient: the dense softmax's (every expert's logit), not the top-k's
    w = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=F64)
    (grad,) = torch.autograd.grad((g * w).sum(), z)
    zz = z.detach().clone().requires_grad_(True)
    (dense,) = torch.autograd.grad((zz.softmax(-1) * w).sum(), zz)
    torch.testing.assert_close(grad, dense, rtol=0, atol=1e-15)
    assert (grad != 0).all()


def test_hard_soft_layer_vs_loop():
    layer = _layer(num_experts=5, rank=2, router="hard_soft", top_k=2, router_scale=3.0)
    x = float64_input(T, D_IN)
    y = layer(x)
    rows = [layer.base_layer(x[t]) + _mixture_row(layer, x[t], _hard_soft_loop(layer.router.weight @ x[t], 2))
            for t in range(T)]
    assert_matches_reference(layer, y, torch.stack(rows), x, all_grads=True)
    assert ((layer.last_routing[1] != 0).sum(-1) == 2).all()
    # unlike top-k, the router rows of the experts a token did not select still learn
    layer.router.weight.grad = None
    y = layer(x[:1].detach())
    (y * torch.randn_like(y)).sum().backward()
    unused = (layer.last_routing[1][0] == 0).nonzero().flatten().tolist()
    assert len(unused) == 3 and all(layer.router.weight.grad[i].abs().sum() > 0 for i in unused)


# ------------------------------------------------------------------ LoRA-Mixer: routing specialisation loss


def _rsl_loop(logits, keep=None):
    n = logits.shape[-1]
    rows = [logits[t].softmax(-1) for t in range(len(logits)) if keep is None or keep[t]]
    h = lambda p: -sum(float(pi) * math.log(float(pi)) for pi in p if pi > 0)  # noqa: E731
    mean = [sum(float(r[i]) for r in rows) / len(rows) for i in range(n)]
    return (sum(h(r) for r in rows) / len(rows) + math.log(n) - h(mean)) / math.log(n)


def test_rsl_by_hand():
    uniform = torch.zeros(2, 4, dtype=F64)
    assert math.isclose(specialization_loss(uniform).item(), 1.0)  # H(p_t) = log N, H(mean) = log N: 1 + 1 - 1
    big = 60.0
    split = torch.tensor([[big, -big], [-big, big]], dtype=F64)  # certain tokens on different experts: 0
    assert abs(specialization_loss(split).item()) < 1e-12
    same = torch.tensor([[big, -big], [big, -big]], dtype=F64)  # certain but all on one expert: 0 + 1 - 0
    assert math.isclose(specialization_loss(same).item(), 1.0)
    three = torch.tensor([[big, -big], [-big, big], [big, -big]], dtype=F64)
    keep = torch.tensor([True, True, False])
    assert abs(specialization_loss(three, keep).item()) < 1e-12  # the padded third token does not count
    # unmasked: mean p = [2/3, 1/3], loss 1 - H(2/3, 1/3) / log 2
    h = -(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3)
    assert math.isclose(specialization_loss(three).item(), 1 - h / math.log(2), rel_tol=1e-12)
    assert specialization_loss(torch.zeros(3, 1)).item() == 0.0  # one expert: nothing to balance
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(7, 5, generator=g, dtype=F64) * 2
    keep = torch.tensor([True, False, True, True, True, False, True])
    assert math.isclose(specialization_loss(logits, keep).item(), _rsl_loop(logits, keep), rel_tol=1e-12)
    assert math.isclose(specialization_loss(logits).item(), _rsl_loop(logits), rel_tol=1e-12)


def test_lora_mixer_losses_in_a_model_by_hand():
    cfg = LMoEConfig.from_preset("lora-mixer", num_experts=4, rank=2, rsl_loss_coef=0.3, aux_loss_coef=0.2,
                                 target_modules=["q_proj", "o_proj"])
    model = get_lmoe_model(tiny_llama(), cfg)
    randomize_lora_B(model)
    ids = random_ids()
    mask = _masked(ids)
    keep = mask.reshape(-1).bool()
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    per_layer, bal = [], []
    for m in model.lmoe_layers().values():
        logits = m.last_routing[0].detach().double()
        per_layer.append(_rsl_loop(logits, keep))
        f = torch.zeros(4, dtype=F64)  # Switch balance loss: top-2 membership / 2, mean softmax, padding masked
        for row in logits[keep]:
            f[row.topk(2).indices] += 0.5
        bal.append(4 * (f / keep.sum() * logits[keep].softmax(-1).mean(0)).sum())
    assert math.isclose(out.rsl_loss.item(), sum(per_layer) / len(per_layer), rel_tol=1e-5)
    assert math.isclose(out.aux_loss.item(), torch.stack(bal).mean().item(), rel_tol=1e-5)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.2 * out.aux_loss + 0.3 * out.rsl_loss)
    assert out.lbc_loss is None and out.entropy_loss is None
    out.loss.backward()
    assert all(m.router.weight.grad.abs().sum() > 0 for m in model.lmoe_layers().values())


# ------------------------------------------------------------------ training log, save / load, inference path


def test_trainer_collects_and_logs_the_new_losses():
    assert LOG_COLUMNS[-2:] == ("rsl_loss", "lbc_loss")  # appended: the older columns keep their places
    assert LOG_COLUMNS[:13] == ("step", "epoch", "loss", "lm_loss", "aux_loss", "z_loss", "router_entropy",
                                "learning_rate", "grad_norm", "eval_loss", "num_input_tokens_seen", "sparsity_loss",
                                "entropy_loss")
    model = get_lmoe_model(tiny_llama(), LMoEConfig.from_preset("loramoe", lbc_loss_coef=0.5, lbc_delta=0.1,
                                                                router="hard_soft", rsl_loss_coef=0.1)).train()
    ids = random_ids()
    fake = SimpleNamespace(_extra={}, _extra_n=0)
    loss = LMoETrainer.compute_loss(fake, model, {"input_ids": ids, "labels": ids, "task_type": torch.tensor([1, 0])})
    assert {"lm_loss", "aux_loss", "z_loss", "rsl_loss", "lbc_loss"} == set(fake._extra) and fake._extra_n == 1
    assert torch.isfinite(loss)


def _randomize_routers(model, seed=4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.lmoe_layers().values():
            m.router.weight.copy_(torch.randn(m.router.weight.shape, generator=g) * 0.5)


@pytest.mark.parametrize("preset, kw", [("loramoe", {"lbc_loss_coef": 0.01, "lbc_delta": 0.1}), ("lora-mixer", {})])
def test_round_trip(preset, kw, tmp_path):
    model = get_lmoe_model(tiny_llama(), LMoEConfig.from_preset(preset, **kw))
    randomize_lora_B(model)
    _randomize_routers(model)
    model.save_pretrained(tmp_path)
    loaded = LMoEModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.lmoe_config == model.lmoe_config
    for name, m in model.lmoe_layers().items():
        theirs = loaded.lmoe_layers()[name].adapter_tensors()
        assert set(theirs) == {"lora_A", "lora_B", "router.weight"}  # no new tensors
        assert all(torch.equal(theirs[k], v) for k, v in m.adapter_tensors().items()), name
    ids = random_ids()
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("preset", ["loramoe", "lora-mixer"])
def test_inference_path_equals_training_path(preset):
    model = get_lmoe_model(tiny_llama(), LMoEConfig.from_preset(preset, dropout=0.0)).eval()
    randomize_lora_B(model)
    _randomize_routers(model)
    ids = random_ids()
    with torch.no_grad():
        fast = model(input_ids=ids).logits
    slow = model(input_ids=ids).logits
    assert torch.allclose(fast, slow.detach(), atol=1e-5)


# ------------------------------------------------------------------ presets and validation


def test_presets():
    lm = LMoEConfig.from_preset("loramoe")
    assert (lm.router, lm.num_experts, lm.rank, lm.alpha, lm.dropout, lm.target_modules, lm.aux_loss_coef,
            lm.lbc_loss_coef, lm.lbc_delta, lm.lbc_world_fraction) == (
        "softmax", 8, 4, 32.0, 0.05, ["gate_proj", "up_proj", "down_proj"], 0.0, 1e-2, 0.1, 0.5)
    mix = LMoEConfig.from_preset("lora-mixer")
    assert (mix.router, mix.num_experts, mix.top_k, mix.rank, mix.alpha, mix.target_modules, mix.aux_loss_coef,
            mix.rsl_loss_coef) == ("hard_soft", 8, 2, 8, 16.0, ["q_proj", "k_proj", "v_proj", "o_proj"], 0.0, 1e-2)
    d = LMoEConfig().to_dict()  # the new fields never change a config that does not use them
    assert (d["lbc_loss_coef"], d["lbc_delta"], d["lbc_world_fraction"], d["rsl_loss_coef"]) == (0.0, 0.0, 0.5, 0.0)
    assert LMoEConfig.from_dict({k: v for k, v in d.items() if not k.startswith(("lbc_", "rsl_"))}) == LMoEConfig()


@pytest.mark.parametrize("kwargs, message", [
    ({"lbc_loss_coef": -0.1}, "LMoEConfig.lbc_loss_coef must be a finite number >= 0, got -0.1"),
    ({"lbc_loss_coef": float("nan")}, "LMoEConfig.lbc_loss_coef must be a finite number >= 0, got nan"),
    ({"rsl_loss_coef": "1"}, "LMoEConfig.rsl_loss_coef must be a finite number >= 0, got '1'"),
    ({"lbc_delta": 1.5}, "LMoEConfig.lbc_delta must be a number in [0, 1], got 1.5"),
    ({"lbc_delta": -0.1}, "LMoEConfig.lbc_delta must be a number in [0, 1], got -0.1"),
    ({"lbc_world_fraction": 0}, "LMoEConfig.lbc_world_fraction must be a number in (0, 1), got 0"),
    ({"lbc_world_fraction": 1.0}, "LMoEConfig.lbc_world_fraction must be a number in (0, 1), got 1.0"),
    ({"lbc_world_fraction": True}, "LMoEConfig.lbc_world_fraction must be a number in (0, 1), got True"),
    ({"lbc_loss_coef": 0.1, "router": "static"},
     "LMoEConfig.lbc_loss_coef needs per-token gates of a learned router, got router='static'"),
    ({"rsl_loss_coef": 0.1}, "LMoEConfig.rsl_loss_coef needs router='hard_soft', got router='softmax'"),
    ({"router": "hard_soft", "num_experts": 2, "top_k": 3}, "LMoEConfig.top_k must be <= num_experts (2), got 3"),
    ({"router": "hard_soft", "balance_bias_rate": 0.1},
     "LMoEConfig.balance_bias_rate needs a top-k router (topk, noisy_topk, sigmoid_topk, implicit), "
     "got router='hard_soft'"),
])
def test_bad_fields(kwargs, message):
    with pytest.raises(ValueError) as e:
        LMoEConfig(**kwargs)
    assert str(e.value) == message


def test_cli_trains_loramoe_with_task_types_and_logs_the_loss(workdir, tmp_path):  # noqa: F811
    """``lmoe train --method loramoe --lbc-loss-coef ...``: the collator sends the bundled task types (the
    test rows' tasks, qa and lm, are unknown: -1), the model uses them, and log.csv carries ``lbc_loss``."""
    import csv
    import json

    from lmoe import cli
    from tests.test_cli import _train  # noqa: F811

    out = tmp_path / "run"
    assert _train(workdir, out, "--method", "loramoe", "--lbc-loss-coef", "0.5", "--lbc-delta", "0.1") == 0
    saved = json.loads((out / "adapter_config.json").read_text())["config"]
    assert (saved["lbc_loss_coef"], saved["lbc_delta"], saved["router"]) == (0.5, 0.1, "softmax")
    rows = list(csv.DictReader(open(out / "log.csv")))
    train_rows = [r for r in rows if r["loss"]]
    assert train_rows and all(float(r["lbc_loss"]) >= 0 for r in train_rows)
    assert all(r["rsl_loss"] == "" for r in train_rows)
    args = cli.build_parser().parse_args(["train", "--method", "lora-mixer"])
    assert cli._lmoe_config(args) == LMoEConfig.from_preset("lora-mixer")
