"""Method presets: LMoEConfig.from_preset, per-layer expert counts, save/load of every preset, the routing
losses of the new routers, and ``lmoe train --method`` (tiny local Llama, CPU).

The layer maths of each new piece is checked against a dumb loop in tests/test_variants.py, which also
holds the bit-for-bit pin of the default path (test_default_path_unchanged)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmoe import LMoEConfig, LMoEModel, cli, get_lmoe_model
from lmoe.presets import PRESETS
from lmoe.routing import load_balancing_loss
from tests.helpers import random_ids, randomize_lora_B, tiny_llama
from tests.test_cli import _train, workdir  # noqa: F401  (the module-scoped tiny model folder + data)

NAMES = ["lmoe", "lmoe-factor", "mola", "hydralora", "shared-expert", "llava-mole", "switch", "noisy-topk", "mixlora",
         "smora", "flylora", "comol", "ld-mole", "dynmole", "loramoe", "lora-mixer"]
MLP = ["gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------ from_preset


def test_preset_names_and_values():
    assert list(PRESETS) == NAMES
    assert LMoEConfig.from_preset("lmoe") == LMoEConfig()
    assert LMoEConfig.from_preset("lmoe-factor") == LMoEConfig(composition="factor")
    mola = LMoEConfig.from_preset("mola")
    assert (mola.num_experts, mola.router, mola.top_k, mola.rank, mola.alpha, mola.dropout) == (
        [2, 4, 6, 8], "topk", 2, 8, 16.0, 0.05)
    assert mola.target_modules == LMoEConfig().target_modules  # all 7 projections
    hydra = LMoEConfig.from_preset("hydralora")
    assert (hydra.share_A, hydra.num_experts, hydra.router, hydra.rank, hydra.alpha, hydra.target_modules) == (
        True, 4, "softmax", 4, 32.0, MLP)
    shared = LMoEConfig.from_preset("shared-expert")
    assert (shared.shared_experts, shared.num_experts, shared.rank, shared.router, shared.top_k) == (1, 8, 4, "topk", 2)
    assert shared.rank < LMoEConfig().rank and shared.scaling == LMoEConfig().scaling
    mole = LMoEConfig.from_preset("llava-mole")
    assert (mole.router, mole.capacity_factor, mole.target_modules) == ("switch", None, MLP)
    switch = LMoEConfig.from_preset("switch")
    assert (switch.router, switch.capacity_factor, switch.aux_loss_coef) == ("switch", 1.25, 1e-2)
    noisy = LMoEConfig.from_preset("noisy-topk")
    assert (noisy.router, noisy.top_k) == ("noisy_topk", 2)
    mix = LMoEConfig.from_preset("mixlora")
    assert (mix.num_experts, mix.router, mix.top_k, mix.lora_modules, mix.shared_router_modules,
            mix.router_init_std, mix.aux_loss_coef) == (8, "topk", 2, ["q_proj", "k_proj", "v_proj", "o_proj"], MLP,
                                                        0.02, 1e-3)
    smora = LMoEConfig.from_preset("smora")
    assert (smora.num_experts, smora.rank, smora.router, smora.top_k, smora.balance_bias_rate, smora.aux_loss_coef,
            smora.scaling) == (64, 1, "sigmoid_topk", 8, 1e-3, 0.0, 2.0)
    fly = LMoEConfig.from_preset("flylora")
    assert (fly.num_experts, fly.rank, fly.router, fly.top_k, fly.frozen_sparse_A, fly.balance_bias_rate,
            fly.scaling) == (32, 1, "implicit", 8, 0.25, 1e-3, 2.0)
    comol = LMoEConfig.from_preset("comol")
    assert (comol.core_experts, comol.num_experts, comol.router) == (True, 8, "softmax")
    ld = LMoEConfig.from_preset("ld-mole")
    assert (ld.router, ld.num_experts, ld.rank, ld.alpha, ld.dropout, ld.top_k, ld.sparsegen_hidden, ld.sparsegen_shared,
            ld.aux_loss_coef, ld.sparsity_loss_coef) == ("sparsegen", 8, 8, 16.0, 0.1, 2, 512, True, 1.0, 0.0)
    assert ld.target_modules == LMoEConfig().target_modules  # all 7 projections
    dyn = LMoEConfig.from_preset("dynmole")
    assert (dyn.router, dyn.num_experts, dyn.rank, dyn.alpha, dyn.dropout, dyn.target_modules, dyn.top_k, dyn.top_p,
            dyn.entropy_threshold, dyn.tsallis_q, dyn.aux_loss_coef, dyn.entropy_loss_coef) == (
        "dynmole", 6, 24, 48.0, 0.05, MLP, 2, 0.75, 0.9, 1.1, 1e-3, 1e-2)
    lm = LMoEConfig.from_preset("loramoe")
    assert (lm.router, lm.num_experts, lm.rank, lm.alpha, lm.dropout, lm.target_modules, lm.aux_loss_coef,
            lm.lbc_loss_coef, lm.lbc_delta, lm.lbc_world_fraction) == (
        "softmax", 8, 4, 32.0, 0.05, MLP, 0.0, 1e-2, 0.1, 0.5)
    mix = LMoEConfig.from_preset("lora-mixer")
    assert (mix.router, mix.num_experts, mix.top_k, mix.rank, mix.alpha, mix.target_modules, mix.aux_loss_coef,
            mix.rsl_loss_coef) == ("hard_soft", 8, 2, 8, 16.0, ["q_proj", "k_proj", "v_proj", "o_proj"], 0.0, 1e-2)


def test_from_preset_overrides_and_errors():
    cfg = LMoEConfig.from_preset("mola", rank=4, num_experts=(2, 3))
    assert cfg.rank == 4 and cfg.num_experts == [2, 3] and cfg.router == "topk"
    cfg.num_experts.append(3)  # the preset table is not shared with the configs built from it
    assert PRESETS["mola"]["num_experts"] == [2, 4, 6, 8]
    with pytest.raises(ValueError) as e:
        LMoEConfig.from_preset("nope")
    assert str(e.value) == ("unknown preset 'nope'; known: lmoe, lmoe-factor, mola, hydralora, shared-expert, "
                            "llava-mole, switch, noisy-topk, mixlora, smora, flylora, comol, ld-mole, dynmole, loramoe, "
                            "lora-mixer")
    with pytest.raises(ValueError, match=r"LMoEConfig: unknown field\(s\) ranks; known: "):
        LMoEConfig.from_preset("switch", ranks=4)
    with pytest.raises(ValueError, match=r"LMoEConfig.top_k must be <= the smallest num_experts \(2\), got 3"):
        LMoEConfig.from_preset("mola", top_k=3)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_experts": []}, "LMoEConfig.num_experts must be an integer >= 1 or a non-empty list of them, got []"),
    ({"num_experts": [2, 0]}, "LMoEConfig.num_experts must be an integer >= 1 or a non-empty list of them, got [2, 0]"),
    ({"capacity_factor": 0}, "LMoEConfig.capacity_factor must be a finite number > 0 or None, got 0"),
    ({"capacity_factor": float("inf")}, "LMoEConfig.capacity_factor must be a finite number > 0 or None, got inf"),
    ({"shared_experts": -1}, "LMoEConfig.shared_experts must be an integer >= 0, got -1"),
    ({"shared_experts": 1.0}, "LMoEConfig.shared_experts must be an integer >= 0, got 1.0"),
    ({"share_A": 1}, "LMoEConfig.share_A must be true or false, got 1"),
    ({"router": "noisy_topk", "num_experts": 2, "top_k": 3}, "LMoEConfig.top_k must be <= num_experts (2), got 3"),
])
def test_bad_new_fields_raise_with_exact_message(kwargs, message):
    with pytest.raises(ValueError) as e:
        LMoEConfig(**kwargs)
    assert str(e.value) == message


def test_experts_for_layer():
    cfg = LMoEConfig(num_experts=[2, 4, 6, 8])
    # 32 layers: exactly the MoLA scripts' list (8 layers of 2, of 4, of 6, of 8).
    assert [cfg.experts_for_layer(i, 32) for i in range(32)] == [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8
    assert [cfg.experts_for_layer(i, 30) for i in range(30)] == [2] * 8 + [4] * 7 + [6] * 8 + [8] * 7
    assert [cfg.experts_for_layer(i, 2) for i in range(2)] == [2, 6]
    assert cfg.experts_for_layer(None, 30) == 8  # a module outside any `layers.<i>.`: the largest
    assert LMoEConfig(num_experts=5).experts_for_layer(3, 4) == 5
    with pytest.raises(ValueError, match=r"layer_index must be in \[0, 4\), got 4"):
        cfg.experts_for_layer(4, 4)


# ------------------------------------------------------------------ per-layer counts in a model


def test_per_layer_expert_counts_shapes_and_round_trip(tmp_path):
    cfg = LMoEConfig(num_experts=[2, 5], rank=2, router="topk", top_k=2, target_modules=["q_proj", "down_proj",
                                                                                         "lm_head"])
    model = get_lmoe_model(tiny_llama(), cfg)
    shapes = {n: tuple(m.lora_A.shape) for n, m in model.lmoe_layers().items()}
    assert shapes == {"model.layers.0.self_attn.q_proj": (2, 2, 64), "model.layers.0.mlp.down_proj": (2, 2, 128),
                      "model.layers.1.self_attn.q_proj": (5, 2, 64), "model.layers.1.mlp.down_proj": (5, 2, 128),
                      "lm_head": (5, 2, 64)}  # no layer index: the largest count
    assert {n: m.router.weight.shape[0] for n, m in model.lmoe_layers().items()} == {n: s[0] for n, s in shapes.items()}
    randomize_lora_B(model)
    ids = random_ids()
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.aux_loss) and out.aux_loss > 0.99  # the balance loss works with mixed N
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["config"]
    assert saved["num_experts"] == [2, 5]
    loaded = LMoEModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.lmoe_config == cfg
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_trains_saves_and_loads(name, tmp_path):
    cfg = LMoEConfig.from_preset(name)
    model = get_lmoe_model(tiny_llama(), cfg)
    randomize_lora_B(model)
    ids = random_ids()
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad and ("lora_" in n or n.endswith("router.weight")):
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    if name != "flylora":  # FlyLoRA's router is its frozen A: nothing to train
        assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("router.weight"))
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "adapter_model.safetensors")
    assert model.adapter_shapes() == {k: tuple(v.shape) for k, v in sd.items()}  # what FSDP saves check against
    model.save_pretrained(tmp_path / "from_state_dict", state_dict=model.state_dict())  # Trainer's FSDP path
    sd2 = load_file(tmp_path / "from_state_dict" / "adapter_model.safetensors")
    assert sd2.keys() == sd.keys() and all(torch.equal(sd2[k], sd[k]) for k in sd)
    suffixes = {k.split("_proj.", 1)[1] for k in sd}
    extra = {"noisy-topk": {"router_noise.weight"}, "smora": {"routing_bias"}, "comol": {"lora_C"},
             "flylora": {"routing_bias"},
             # the lam MLPs, saved by the first routed layer of each input width (sparsegen_shared)
             "ld-mole": {"sparsegen_mlp.0.weight", "sparsegen_mlp.0.bias", "sparsegen_mlp.2.weight",
                         "sparsegen_mlp.2.bias"}}.get(name, set())
    want = ({"lora_A", "lora_B"} | extra | (set() if name == "flylora" else {"router.weight"}))
    assert suffixes == want  # the same keys as ever; each new piece adds its own tensors
    if name == "ld-mole":
        assert sum(k.endswith("sparsegen_mlp.0.weight") for k in sd) == 2  # one per input width (64, 128)
        assert out.sparsity_loss is not None and out.entropy_loss is None
    if name == "dynmole":
        assert out.entropy_loss is not None and out.sparsity_loss is None
        torch.testing.assert_close(out.loss, out.lm_loss + 1e-3 * out.aux_loss + 1e-2 * out.entropy_loss)
    if name == "lora-mixer":
        assert out.rsl_loss is not None and out.lbc_loss is None
        torch.testing.assert_close(out.loss, out.lm_loss + 1e-2 * out.rsl_loss)
    if name == "loramoe":  # the localised balancing constraint is on (no task types here: the plain CV^2 form)
        assert out.lbc_loss is not None and out.rsl_loss is None
        torch.testing.assert_close(out.loss, out.lm_loss + 1e-2 * out.lbc_loss)
    loaded = LMoEModel.from_pretrained(tiny_llama(), tmp_path)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


# ------------------------------------------------------------------ routing losses of the new pieces


def test_balance_loss_ignores_shared_experts():
    routed = get_lmoe_model(tiny_llama(), LMoEConfig(num_experts=4, rank=2, target_modules=["q_proj"]))
    shared = get_lmoe_model(tiny_llama(), LMoEConfig(num_experts=4, rank=2, shared_experts=2, target_modules=["q_proj"]))
    for (n, a), b in zip(routed.lmoe_layers().items(), shared.lmoe_layers().values()):
        with torch.no_grad():
            b.router.weight.copy_(a.router.weight)
    ids = random_ids()
    aux_r, aux_s = routed(input_ids=ids, labels=ids).aux_loss, shared(input_ids=ids, labels=ids).aux_loss
    assert torch.equal(aux_r, aux_s)
    logits, gates = next(iter(shared.lmoe_layers().values())).last_routing
    assert logits.shape[-1] == gates.shape[-1] == 4


@pytest.mark.parametrize("router, k", [("switch", 1), ("noisy_topk", 2)])
def test_balance_loss_of_switch_and_noisy_routers(router, k):
    model = get_lmoe_model(tiny_llama(), LMoEConfig(num_experts=4, rank=2, router=router, top_k=2,
                                                    target_modules=["q_proj"]))
    ids = random_ids()
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    per_layer = []
    for m in model.lmoe_layers().values():
        logits = m.last_routing[0]  # the noisy router's are the noisy logits H
        keep = mask.reshape(-1).bool()
        f = torch.zeros(4)
        for row in logits[keep]:  # by hand: dispatch counts (top-k membership / k), mean full softmax
            for i in row.topk(k).indices:
                f[i] += 1.0 / k
        f /= keep.sum()
        P = logits[keep].softmax(-1).mean(0)
        per_layer.append(4 * (f * P).sum())
        torch.testing.assert_close(load_balancing_loss(logits, k, keep), per_layer[-1])
    torch.testing.assert_close(out.aux_loss, torch.stack(per_layer).mean())
    assert out.aux_loss.requires_grad


# ------------------------------------------------------------------ lmoe train --method


def test_cli_method_with_explicit_override(workdir, tmp_path):  # noqa: F811
    d, model_dir, data = workdir
    out = tmp_path / "run"
    # _train passes --num-experts 4 --rank 2 explicitly; --method mola keeps its other values.
    assert cli.main(["train", "--model", model_dir, "--data", data, "--output-dir", str(out), "--max-steps", "2",
                     "--batch-size", "2", "--seq-len", "32", "--method", "mola", "--rank", "2",
                     "--num-experts", "2", "4", "--logging-steps", "1"]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())["config"]
    assert saved == {**LMoEConfig.from_preset("mola").to_dict(), "rank": 2, "num_experts": [2, 4]}
    assert LMoEConfig.from_dict(saved) == LMoEConfig.from_preset("mola", rank=2, num_experts=[2, 4])
    sd = load_file(out / "adapter_model.safetensors")
    assert sd["model.layers.0.self_attn.q_proj.lora_A"].shape == (2, 2, 64)
    assert sd["model.layers.1.self_attn.q_proj.lora_A"].shape == (4, 2, 64)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["args"]["method"] == "mola" and summary["args"]["dropout"] == 0.05
    from transformers import AutoModelForCausalLM
    assert LMoEModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out).lmoe_config.rank == 2


def _config_of(*flags):
    return cli._lmoe_config(cli.build_parser().parse_args(["train", *flags]))


def test_cli_flags_to_config():
    assert _config_of() == LMoEConfig()  # no --method, no flags: exactly the defaults, as before
    assert _config_of("--num-experts", "4", "--router", "topk") == LMoEConfig(num_experts=4, router="topk")
    assert _config_of("--method", "hydralora") == LMoEConfig.from_preset("hydralora")
    assert _config_of("--method", "hydralora", "--no-share-A").share_A is False
    assert _config_of("--method", "switch", "--capacity-factor", "none").capacity_factor is None
    assert _config_of("--method", "llava-mole", "--capacity-factor", "2").capacity_factor == 2.0
    assert _config_of("--shared-experts", "1", "--share-A", "--num-experts", "2", "4") == LMoEConfig(
        shared_experts=1, share_A=True, num_experts=[2, 4])


def test_cli_method_from_yaml_and_unknown_method(workdir, tmp_path, capsys):  # noqa: F811
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: shared-expert\ntop_k: 3\n")
    parser = cli.build_parser()
    argv = ["train", "--config", str(cfg), "--rank", "2"]
    args = cli._apply_yaml(parser, argv, parser.parse_args(argv))
    assert cli._lmoe_config(args) == LMoEConfig.from_preset("shared-expert", top_k=3, rank=2)
    assert _train(workdir, tmp_path / "run", "--method", "nope") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("lmoe: error: unknown preset 'nope'; known: lmoe, lmoe-factor, mola, hydralora, shared-expert, "
                   "llava-mole, switch, noisy-topk, mixlora, smora, flylora, comol, ld-mole, dynmole, loramoe, "
                   "lora-mixer")
