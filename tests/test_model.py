"""LMoEModel on a tiny seeded Llama (2 layers, 64 dims): injection, losses, save/load, training, generate."""

from __future__ import annotations

import json
import math
import os
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import TwoLinears, random_ids, randomize_lora_B, tiny_llama
from safetensors.torch import load_file, save_file

from lmoe import LMoEConfig, LMoELinear, LMoEModel, get_lmoe_model
from lmoe.routing import load_balancing_loss, z_loss

# (in, out) of every Linear in one decoder layer of tiny_llama (head_dim 16, 2 KV heads).
LAYER_SHAPES = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32), "self_attn.v_proj": (64, 32),
                "self_attn.o_proj": (64, 64), "mlp.gate_proj": (64, 128), "mlp.up_proj": (64, 128),
                "mlp.down_proj": (128, 64)}
QV = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def wrap(seed=0, **kw):
    kw.setdefault("num_experts", 4)
    kw.setdefault("rank", 4)
    return get_lmoe_model(tiny_llama(seed), LMoEConfig(**kw))


# ------------------------------------------------------------------ identity at init, freezing, disabling


def test_logits_equal_base_at_init_and_differ_with_nonzero_B():
    ids = random_ids()
    base_logits = tiny_llama(0)(ids).logits
    model = wrap()
    assert torch.equal(model(ids).logits, base_logits)
    randomize_lora_B(model)
    assert (model(ids).logits - base_logits).abs().max() > 1e-2


def test_disable_adapter_gives_base_logits_and_restores():
    ids = random_ids()
    base_logits = tiny_llama(0)(ids).logits
    model = wrap(router="topk", top_k=2, composition="factor")
    randomize_lora_B(model)
    adapted = model(ids).logits
    with model.disable_adapter():
        assert torch.equal(model(ids).logits, base_logits)
    assert torch.equal(model(ids).logits, adapted)
    with pytest.raises(RuntimeError, match="boom"), model.disable_adapter():
        raise RuntimeError("boom")
    assert torch.equal(model(ids).logits, adapted)  # re-enabled even after an exception


def test_only_adapter_parameters_are_trainable_and_counted():
    n, r = 3, 2
    model = wrap(num_experts=n, rank=r)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith((".lora_A", ".lora_B", ".router.weight")) for name in trainable)
    assert len(trainable) == 3 * 7 * 2  # 3 tensors x 7 Linears x 2 decoder layers
    # N*r*(in+out) + N*in per adapted Linear: sum(in+out) = 1024, sum(in) = 512 per decoder layer.
    per_layer = sum(n * r * (i + o) + n * i for i, o in LAYER_SHAPES.values())
    assert per_layer == n * r * 1024 + n * 512 == 7680
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == 2 * per_layer == 15360
    assert model.num_parameters_split()[0] == 15360
    assert not model.lm_head.weight.requires_grad  # __getattr__ reaches the base model; it stays frozen
    assert not model.base_model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad


# ------------------------------------------------------------------ target matching


@pytest.mark.parametrize("target, expected", [
    (r".*\.(q_proj|v_proj)", QV),
    (["q_proj", "v_proj"], QV),
    (["self_attn.q_proj", "mlp.down_proj"],
     [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.down_proj")]),
    (["model.layers.1.self_attn.k_proj"], ["model.layers.1.self_attn.k_proj"]),
    (r"model\.layers\.0\..*", [f"model.layers.0.{p}" for p in LAYER_SHAPES]),
])
def test_target_modules_regex_and_list(target, expected):
    model = wrap(target_modules=target)
    assert sorted(model.lmoe_layers()) == sorted(expected)
    wrapped = {n for n, m in model.base_model.named_modules() if isinstance(m, LMoELinear)}
    assert wrapped == set(expected)


def test_list_target_does_not_match_partial_names():
    # "proj" is neither an exact path nor a ".proj" suffix of any Linear: nothing matches.
    with pytest.raises(ValueError, match="matched no Linear module"):
        wrap(target_modules=["proj"])


def test_nothing_matched_lists_existing_linears():
    with pytest.raises(ValueError) as e:
        wrap(target_modules="q_proj")  # a string is a full-match regex: "q_proj" is not a full path
    msg = str(e.value)
    assert msg.startswith("target_modules='q_proj' matched no Linear module. Linear modules: "
                          "model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj")
    assert "... (15 in all)" in msg
    assert msg.endswith("their names end in: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, "
                        "v_proj")


def test_custom_module_and_sequential_are_injected():
    torch.manual_seed(0)
    custom = TwoLinears(8)
    x = torch.randn(3, 8)
    ref = custom(x)
    model = get_lmoe_model(custom, LMoEConfig(num_experts=2, rank=2, target_modules=["up"]))
    assert list(model.lmoe_layers()) == ["up"] and isinstance(custom.down, nn.Linear)
    assert torch.equal(custom(x), ref)
    randomize_lora_B(model)
    custom(x).sum().backward()
    assert custom.up.lora_B.grad.abs().sum() > 0 and custom.down.weight.grad is None

    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))  # top-level children: no parent path
    x = torch.randn(3, 4)
    ref = seq(x)
    model = get_lmoe_model(seq, LMoEConfig(num_experts=2, rank=2, target_modules=r"\d+"))
    assert sorted(model.lmoe_layers()) == ["0", "2"]
    assert torch.equal(seq(x), ref)
    with pytest.raises(ValueError, match=r"Linear modules: 0, 1; their names end in: 0, 1"):
        get_lmoe_model(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), LMoEConfig(target_modules=["x"]))


def test_wrapper_forward_passes_through_for_plain_modules():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(3, 4)
    ref = seq(x)
    model = get_lmoe_model(seq, LMoEConfig(num_experts=2, rank=2, target_modules=r"\d+"))
    assert torch.equal(model(x), ref)


def test_wrapping_twice_is_refused():
    model = wrap(target_modules=["q_proj"])
    with pytest.raises(ValueError, match="model already holds LMoELinear layers"):
        get_lmoe_model(model.base_model, LMoEConfig())


# ------------------------------------------------------------------ routing losses


def test_balance_and_z_loss_on_hand_computed_example():
    ln = math.log
    # 4 tokens, 2 experts; softmax probabilities [3/4, 1/4], [3/4, 1/4], [1/4, 3/4], [1/10, 9/10];
    # every logsumexp is ln 4 except the last, ln 10. The last token is padding.
    logits = torch.tensor([[ln(3), 0.0], [ln(3), 0.0], [0.0, ln(3)], [0.0, ln(9)]])
    mask = torch.tensor([True, True, True, False])
    # masked: f = [2/3, 1/3] (arg-max), P = [(3/4+3/4+1/4)/3, (1/4+1/4+3/4)/3] = [7/12, 5/12]
    #         balance = 2 * (2/3 * 7/12 + 1/3 * 5/12) = 2 * 19/36 = 19/18
    torch.testing.assert_close(load_balancing_loss(logits, 1, mask), torch.tensor(19 / 18))
    # unmasked: f = [1/2, 1/2], so balance = 2 * 1/2 * (P_0 + P_1) = 1
    torch.testing.assert_close(load_balancing_loss(logits, 1), torch.tensor(1.0))
    # z: masked mean of (ln 4)^2 = 1.921812...; unmasked (3 (ln 4)^2 + (ln 10)^2) / 4 = 2.766834...
    torch.testing.assert_close(z_loss(logits, mask), torch.tensor(ln(4) ** 2))
    torch.testing.assert_close(z_loss(logits), torch.tensor((3 * ln(4) ** 2 + ln(10) ** 2) / 4))
    assert abs(z_loss(logits).item() - 2.766834) < 1e-5


def test_topk_balance_loss_on_hand_computed_example():
    ln = math.log
    # 3 tokens, 3 experts, k = 2; probabilities [.6, .3, .1], [.1, .6, .3], [.6, .3, .1] (logsumexp = ln 10).
    logits = torch.tensor([[ln(6), ln(3), 0.0], [0.0, ln(6), ln(3)], [ln(6), ln(3), 0.0]])
    # top-2 sets {0,1}, {1,2}, {0,1}: counts [2, 3, 1] / (k T = 6) -> f = [2/6, 3/6, 1/6]
    # P (full softmax) = [1.3/3, 1.2/3, 0.5/3]; balance = 3 * (2*1.3 + 3*1.2 + 1*0.5) / 18 = 6.7 / 6
    torch.testing.assert_close(load_balancing_loss(logits, 2), torch.tensor(6.7 / 6))
    torch.testing.assert_close(z_loss(logits), torch.tensor(ln(10) ** 2))


def ref_balance(logits, k, keep=None):
    """Switch balance loss written out: f from top-k membership / k, P from the full softmax, float64."""
    rows = logits.detach().double()
    if keep is not None:
        rows = rows[keep]
    t, n = rows.shape
    f = torch.zeros(n, dtype=torch.float64)
    for row in rows:
        for i in row.topk(k).indices.tolist():
            f[i] += 1.0 / (k * t)
    return n * float((f * rows.softmax(-1).mean(0)).sum())


def ref_z(logits, keep=None):
    rows = logits.detach().double()
    if keep is not None:
        rows = rows[keep]
    return float(rows.logsumexp(-1).square().mean())


def _sharpen_routers(model, factor=20.0):
    with torch.no_grad():
        for m in model.lmoe_layers().values():
            m.router.weight.mul_(factor)


@pytest.mark.parametrize("router", ["softmax", "topk"])
def test_joint_loss_is_lm_plus_weighted_aux_and_z(router):
    model = wrap(router=router, top_k=2, aux_loss_coef=0.3, z_loss_coef=0.05, target_modules=["q_proj", "down_proj"])
    randomize_lora_B(model)
    _sharpen_routers(model)
    ids = random_ids()
    out = model(ids, labels=ids)
    # The LM loss is plain next-token cross-entropy on the adapted logits.
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, lm)
    k = 2 if router == "topk" else 1
    layers = list(model.lmoe_layers().values())
    assert len(layers) == 4
    aux = sum(ref_balance(m.last_routing[0], k) for m in layers) / 4
    z = sum(ref_z(m.last_routing[0]) for m in layers) / 4
    assert abs(out.aux_loss.item() - aux) < 1e-5 and abs(out.z_loss.item() - z) < 1e-4
    assert out.aux_loss.item() > 1.05  # sharp routers at init are unbalanced: the term is not trivially 1
    torch.testing.assert_close(out.loss, out.lm_loss + 0.3 * out.aux_loss + 0.05 * out.z_loss)
    assert out.loss.item() > out.lm_loss.item() + 0.05
    # The aux losses carry gradient to the routers.
    (0.3 * out.aux_loss + 0.05 * out.z_loss).backward()
    assert all(m.router.weight.grad.abs().sum() > 0 for m in layers)


def test_no_labels_returns_plain_output_and_zero_z_coef_is_omitted():
    model = wrap(target_modules=["q_proj"], z_loss_coef=0.0, aux_loss_coef=0.5)
    ids = random_ids()
    assert model(ids).loss is None
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.aux_loss)
    assert out.z_loss.item() > 0  # still reported


def test_padding_is_masked_out_of_the_routing_losses():
    model = wrap(target_modules=["q_proj", "v_proj"], z_loss_coef=1e-2)
    randomize_lora_B(model)
    _sharpen_routers(model)
    ids = random_ids(2, 10)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding: 4 pad tokens in row 1
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, attention_mask=mask, labels=labels)
    keep = mask.reshape(-1).bool()
    layers = list(model.lmoe_layers().values())
    padded_logits = [m.last_routing[0].detach() for m in layers]
    aux_masked = sum(ref_balance(lg, 1, keep) for lg in padded_logits) / len(layers)
    aux_all = sum(ref_balance(lg, 1) for lg in padded_logits) / len(layers)
    z_masked = sum(ref_z(lg, keep) for lg in padded_logits) / len(layers)
    assert abs(out.aux_loss.item() - aux_masked) < 1e-5
    assert abs(out.z_loss.item() - z_masked) < 1e-4
    assert abs(aux_masked - aux_all) > 1e-3  # the mask really changes the number

    # Same value from the real tokens alone: run each row unpadded and pool their routing logits.
    pooled = [[] for _ in layers]
    for row, length in ((0, 10), (1, 6)):
        model(ids[row:row + 1, :length])
        for j, m in enumerate(layers):
            pooled[j].append(m.last_routing[0].detach())
    aux_unpadded = sum(load_balancing_loss(torch.cat(p), 1).item() for p in pooled) / len(layers)
    z_unpadded = sum(z_loss(torch.cat(p)).item() for p in pooled) / len(layers)
    assert abs(out.aux_loss.item() - aux_unpadded) < 1e-5
    assert abs(out.z_loss.item() - z_unpadded) < 1e-4


# ------------------------------------------------------------------ save / load


def _saved(tmp_path, seed=0, **kw):
    kw.setdefault("target_modules", ["q_proj", "v_proj"])
    model = wrap(seed=seed, **kw)
    randomize_lora_B(model, seed=3)
    d = tmp_path / "adapter"
    model.save_pretrained(d)
    return model, d


def test_save_then_load_is_bit_exact(tmp_path):
    model, d = _saved(tmp_path, router="topk", top_k=2, composition="factor")
    assert sorted(os.listdir(d)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files left
    meta = json.loads((d / "adapter_config.json").read_text())
    assert meta["format_version"] == 1 and meta["config"] == model.lmoe_config.to_dict()
    saved = load_file(str(d / "adapter_model.safetensors"))
    assert set(saved) == {f"{m}.{k}" for m in QV for k in ("lora_A", "lora_B", "router.weight")}
    assert "model.layers.0.self_attn.q_proj.lora_A" in saved
    assert saved["model.layers.0.self_attn.q_proj.lora_B"].shape == (4, 64, 4)

    loaded = LMoEModel.from_pretrained(tiny_llama(0), d)
    assert loaded.lmoe_config == model.lmoe_config
    for k, v in model.adapter_state_dict().items():
        assert torch.equal(loaded.adapter_state_dict()[k], v), k
        assert torch.equal(saved[k], v), k
    assert all(m.lora_B.permute(1, 0, 2).is_contiguous() for m in loaded.lmoe_layers().values())
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not loaded.training
    ids = random_ids()
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    trainable = LMoEModel.from_pretrained(tiny_llama(0), d, is_trainable=True)
    # q: N r (64+64) + N 64 = 2304, v: N r (64+32) + N 64 = 1792, per decoder layer, N = r = 4
    assert trainable.num_parameters_split()[0] == 2 * (2304 + 1792)


def _from(d):
    return LMoEModel.from_pretrained(tiny_llama(0), d)


def test_load_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        _from(tmp_path / "nope")
    assert str(e.value) == f"adapter directory '{tmp_path / 'nope'}' does not exist"


def test_load_missing_config(tmp_path):
    _, d = _saved(tmp_path)
    (d / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError) as e:
        _from(d)
    assert str(e.value) == f"'{d}' is not an lmoe adapter: adapter_config.json is missing"


def test_load_corrupt_json(tmp_path):
    _, d = _saved(tmp_path)
    (d / "adapter_config.json").write_text('{"format_version": 1, "config": {"rank": ')
    with pytest.raises(ValueError) as e:
        _from(d)
    assert str(e.value).startswith(f"{d / 'adapter_config.json'}: not a valid lmoe adapter config (JSONDecodeError: ")


def test_load_config_without_config_section(tmp_path):
    _, d = _saved(tmp_path)
    (d / "adapter_config.json").write_text('{"format_version": 1}')
    with pytest.raises(ValueError, match=r"not a valid lmoe adapter config \(KeyError: 'config'\)"):
        _from(d)


def test_load_missing_safetensors(tmp_path):
    _, d = _saved(tmp_path)
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as e:
        _from(d)
    assert str(e.value) == f"'{d}' has no adapter_model.safetensors"


def test_load_truncated_safetensors(tmp_path):
    _, d = _saved(tmp_path)
    p = d / "adapter_model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as e:
        _from(d)
    assert str(e.value).startswith(f"{p}: corrupt or truncated safetensors file (")


class _Trap:
    """Unpickling this creates a marker file: proves whether a loader ever unpickled it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_refuses_pickle(tmp_path):
    _, d = _saved(tmp_path)
    (d / "adapter_model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (d / "adapter_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(FileNotFoundError) as e:
        _from(d)
    assert str(e.value) == (f"'{d}' has no adapter_model.safetensors; refusing to load pickle file(s) "
                            "adapter_model.bin (safetensors only)")
    assert not marker.exists()


def test_load_unexpected_key(tmp_path):
    _, d = _saved(tmp_path)
    p = d / "adapter_model.safetensors"
    sd = load_file(str(p))
    sd["model.layers.0.self_attn.q_proj.extra"] = torch.zeros(2)
    save_file(sd, str(p))
    with pytest.raises(ValueError) as e:
        _from(d)
    assert str(e.value) == (f"{p} does not match this model and config: 0 missing key(s) [], "
                            "1 unexpected key(s) [model.layers.0.self_attn.q_proj.extra]")


def test_load_missing_key(tmp_path):
    _, d = _saved(tmp_path)
    p = d / "adapter_model.safetensors"
    sd = load_file(str(p))
    del sd["model.layers.1.self_attn.v_proj.router.weight"]
    save_file(sd, str(p))
    with pytest.raises(ValueError) as e:
        _from(d)
    assert str(e.value) == (f"{p} does not match this model and config: 1 missing key(s) "
                            "[model.layers.1.self_attn.v_proj.router.weight], 0 unexpected key(s) []")


def test_load_shape_mismatch(tmp_path):
    _, d = _saved(tmp_path)  # rank 4
    c = d / "adapter_config.json"
    meta = json.loads(c.read_text())
    meta["config"]["rank"] = 8
    c.write_text(json.dumps(meta))
    with pytest.raises(ValueError) as e:
        _from(d)
    msg = str(e.value)
    assert msg.startswith(f"{d / 'adapter_model.safetensors'}: shape mismatch for 8 tensor(s): "
                          "[model.layers.0.self_attn.q_proj.lora_A: saved (4, 4, 64) vs model (4, 8, 64), "
                          "model.layers.0.self_attn.q_proj.lora_B: saved (4, 64, 4) vs model (4, 64, 8), ")
    assert msg.endswith(", ...]")  # only the first 5 are listed
    assert "router.weight" not in msg  # the router does not depend on the rank


def test_load_into_wrong_targets_reports_keys(tmp_path):
    _, d = _saved(tmp_path)
    c = d / "adapter_config.json"
    meta = json.loads(c.read_text())
    meta["config"]["target_modules"] = ["q_proj"]
    c.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"0 missing key\(s\) \[\], 6 unexpected key\(s\) "
                                         r"\[model\.layers\.0\.self_attn\.v_proj\.lora_A, "):
        _from(d)


def test_failed_load_leaves_base_model_usable(tmp_path):
    _, d = _saved(tmp_path)
    c = d / "adapter_config.json"
    good = c.read_text()
    meta = json.loads(good)
    meta["config"]["rank"] = 8
    c.write_text(json.dumps(meta))
    base = tiny_llama(0)
    with pytest.raises(ValueError, match="shape mismatch"):
        LMoEModel.from_pretrained(base, d)
    c.write_text(good)
    assert not any(isinstance(m, LMoELinear) for m in base.modules())
    LMoEModel.from_pretrained(base, d)


# ------------------------------------------------------------------ training, generation, statistics


@pytest.mark.parametrize("composition", ["delta", "factor"])
def test_thirty_adamw_steps_lower_the_loss(composition):
    torch.manual_seed(0)
    model = wrap(composition=composition, target_modules=["q_proj", "v_proj", "down_proj"], z_loss_coef=1e-3)
    model.train()
    ids = random_ids(2, 16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.lm_loss.item())
    assert 4.6 < losses[0] < 5.1  # ~ln(128) = 4.85 for an untrained 128-token model
    assert losses[-1] < losses[0] - 0.6, losses
    assert min(losses[-5:]) < 4.2


def test_generate_with_and_without_kv_cache_agree():
    ids = random_ids(1, 5)
    base_tokens = tiny_llama(0).generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    model = wrap(router="topk", top_k=2)
    randomize_lora_B(model)
    cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape == (1, 13)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, base_tokens)  # the adapter really changes what is generated


def _check_stats(stats, names, n, tokens):
    assert set(stats) == set(names)
    for s in stats.values():
        assert len(s["load"]) == n and len(s["mean_gate"]) == n
        assert abs(sum(s["load"]) - 1) < 1e-5 and abs(sum(s["mean_gate"]) - 1) < 1e-5
        assert 0.0 <= s["entropy"] <= 1.0
        assert s["tokens"] == tokens


def _ref_load(logits, k, keep=None):
    rows = logits.detach() if keep is None else logits.detach()[keep]
    f = torch.zeros(rows.shape[1])
    for row in rows:
        f[row.topk(k).indices] += 1.0 / k
    return f, rows.shape[0]


def test_routing_stats_and_tracking():
    model = wrap(router="topk", top_k=2, target_modules=["q_proj", "v_proj"])
    _sharpen_routers(model, 5.0)
    ids = random_ids(2, 10)
    model(ids)
    stats = model.routing_stats()
    _check_stats(stats, QV, 4, 20)
    layer = model.lmoe_layers()["model.layers.0.self_attn.q_proj"]
    f, t = _ref_load(layer.last_routing[0], 2)
    torch.testing.assert_close(torch.tensor(stats["model.layers.0.self_attn.q_proj"]["load"]), f / t)
    g = layer.last_routing[1].detach()
    ent = float((-(g * g.clamp_min(1e-20).log()).sum(-1) / math.log(4)).mean())
    assert abs(stats["model.layers.0.self_attn.q_proj"]["entropy"] - ent) < 1e-5
    assert 0.0 < ent < 0.5  # top-2 of 4: entropy of the kept pair, at most log 2 / log 4

    model.track_routing(True)
    model(ids)
    model(ids)
    tracked = model.routing_stats()
    _check_stats(tracked, QV, 4, 40)  # two forwards: twice the tokens, same shares
    for name in QV:
        torch.testing.assert_close(torch.tensor(tracked[name]["load"]), torch.tensor(stats[name]["load"]))
        assert abs(tracked[name]["entropy"] - stats[name]["entropy"]) < 1e-5

    # A padded forward adds only its real tokens, and the shares are pooled over all forwards.
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    model(ids, attention_mask=mask)
    pooled = model.routing_stats()
    _check_stats(pooled, QV, 4, 57)
    f_pad, t_pad = _ref_load(layer.last_routing[0], 2, mask.reshape(-1).bool())
    want = (f * 2 + f_pad) / (2 * t + t_pad)
    torch.testing.assert_close(torch.tensor(pooled["model.layers.0.self_attn.q_proj"]["load"]), want)

    model.track_routing(False)
    model(ids)
    _check_stats(model.routing_stats(), QV, 4, 20)  # back to the last forward only
