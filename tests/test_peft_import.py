"""from_peft_adapters: PEFT LoRA adapters as the experts of an lmoe mixture (lmoe/peft_import.py)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmoe import LMoEConfig, LMoELinear, LMoEModel, from_peft_adapters
from tests.helpers import random_ids, tiny_llama

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")

PATHS = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def make_adapter(path, seed, base=None, **lora):
    """A PEFT LoRA on a tiny Llama with random non-zero A and B, saved to ``path``; returns the PEFT model."""
    model = peft.get_peft_model(base or tiny_llama(), peft.LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    qv = ["q_proj", "v_proj"]
    return {
        # per-module rank and alpha through PEFT's patterns: q_proj r=4 alpha=3, v_proj r=2 alpha=8
        "a": (root / "a", make_adapter(root / "a", 1, r=4, lora_alpha=8, target_modules=qv,
                                       rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})),
        "b": (root / "b", make_adapter(root / "b", 2, r=2, lora_alpha=16, use_rslora=True, target_modules=qv)),
        "c": (root / "c", make_adapter(root / "c", 3, r=8, lora_alpha=4, target_modules=["q_proj", "k_proj"])),
        "head": (root / "head", make_adapter(root / "head", 4, r=2, lora_alpha=2, target_modules=["lm_head"])),
        "embed": (root / "embed", make_adapter(root / "embed", 5, r=2, lora_alpha=2, target_modules=["embed_tokens"])),
    }


def peft_delta(peft_model, path, x):
    """s_i B_i A_i x of one PEFT LoRA layer, from its own forward."""
    m = peft_model.get_submodule("base_model.model." + path)
    return m(x) - m.base_layer(x)


def edited(src, dst, config=None, weights=None):
    """A copy of adapter ``src`` at ``dst`` with adapter_config.json / the weight dict changed by the callables."""
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        config(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if weights is not None:
        sd = load_file(dst / "adapter_model.safetensors")
        save_file(weights(sd), dst / "adapter_model.safetensors")
    return dst


def test_one_adapter_reproduces_the_peft_model(adapters):
    d, ref = adapters["a"]
    model = from_peft_adapters(tiny_llama(), [d])
    c = model.lmoe_config
    assert (c.num_experts, c.rank, c.alpha, c.router) == (1, 4, 4.0, "softmax")
    assert sorted(model.lmoe_layers()) == PATHS
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=0)
    # v_proj has rank 2 < R = 4: its last two A rows and B columns are zero padding
    layer = model.lmoe_layers()["model.layers.0.self_attn.v_proj"]
    assert not layer.lora_A[0, 2:].any() and not layer.lora_B[0][:, 2:].any() and layer.lora_B[0][:, :2].any()


def test_cat_sums_adapters_of_different_rank_alpha_and_rslora(adapters):
    (da, pa), (db, pb) = adapters["a"], adapters["b"]
    model = from_peft_adapters(tiny_llama(), [da, db], cat=True)
    assert (model.lmoe_config.router, model.lmoe_config.num_experts, model.lmoe_config.rank) == ("static", 2, 4)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
            layer = model.lmoe_layers()[path]
            assert layer.static_gate.tolist() == [1.0, 1.0]
            want = layer.base_layer(x) + peft_delta(pa, path, x) + peft_delta(pb, path, x)
            torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=0)
            layer.static_gate.copy_(torch.tensor([0.5, -2.0]))  # the learned CAT weights scale each adapter
            want = layer.base_layer(x) + 0.5 * peft_delta(pa, path, x) - 2.0 * peft_delta(pb, path, x)
            torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=0)


def test_softmax_gate_mixes_the_adapter_deltas(adapters):
    (da, pa), (db, pb) = adapters["a"], adapters["b"]
    model = from_peft_adapters(tiny_llama(), [da, db], LMoEConfig(aux_loss_coef=0.1, z_loss_coef=1e-3))
    assert (model.lmoe_config.aux_loss_coef, model.lmoe_config.z_loss_coef) == (0.1, 1e-3)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(1))
    path = "model.layers.1.self_attn.q_proj"
    layer = model.lmoe_layers()[path]
    with torch.no_grad():
        g = (x @ layer.router.weight.t()).softmax(-1)  # (T, 2), by hand
        assert (g - 0.5).abs().max() > 0.01  # a non-trivial mixture
        want = layer.base_layer(x) + g[:, :1] * peft_delta(pa, path, x) + g[:, 1:] * peft_delta(pb, path, x)
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=0)


def trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_only_the_gate_trains_unless_train_experts(adapters):
    dirs = [adapters["a"][0], adapters["b"][0]]
    assert trainable(from_peft_adapters(tiny_llama(), dirs)) == [f"base_model.{p}.router.weight" for p in PATHS]
    cat = from_peft_adapters(tiny_llama(), dirs, cat=True)
    assert trainable(cat) == [f"base_model.{p}.static_gate" for p in PATHS]
    model = from_peft_adapters(tiny_llama(), dirs, train_experts=True)
    keys = ("lora_A", "lora_B", "router.weight")
    assert trainable(model) == sorted(f"base_model.{p}.{k}" for p in PATHS for k in keys)
    out = model(input_ids=random_ids(), labels=random_ids())
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_save_and_load_round_trip(adapters, tmp_path):
    model = from_peft_adapters(tiny_llama(), [adapters["a"][0], adapters["b"][0]])
    model.save_pretrained(tmp_path / "mix")
    loaded = LMoEModel.from_pretrained(tiny_llama(), tmp_path / "mix")
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_exact_targets_when_a_path_is_also_a_suffix(tmp_path):
    """A Linear whose path ends in a target's path is not wrapped: the targets become an anchored regex."""
    import torch.nn as nn

    from tests.helpers import TwoLinears

    def build():
        torch.manual_seed(0)
        outer = nn.Module()
        outer.up, outer.inner = nn.Linear(8, 16), TwoLinears()  # 'inner.up' ends in '.up'
        return outer

    make_adapter(tmp_path / "up", 6, base=build(), r=2, lora_alpha=2, target_modules=r"up")  # PEFT: full match
    model = from_peft_adapters(build(), [tmp_path / "up"])
    assert sorted(model.lmoe_layers()) == ["up"] and model.lmoe_config.target_modules == "up"


# ------------------------------------------------------------------------------------------------ errors
def error_cases(adapters, tmp_path):
    b = adapters["b"][0]
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"

    def rename(new):
        return lambda sd: {k.replace(q0, "base_model.model." + new): v for k, v in sd.items()}

    def set_(key, value):
        return lambda cfg: cfg.__setitem__(key, value)

    return [
        (edited(b, tmp_path / "loha", config=set_("peft_type", "LOHA")),
         "peft_type 'LOHA' is not supported; only LoRA adapters (peft_type 'LORA') can be imported"),
        (edited(b, tmp_path / "dora", config=set_("use_dora", True)),
         "use_dora=True is not supported (DoRA rescales the weight by a learned magnitude)"),
        (edited(b, tmp_path / "bias", config=set_("bias", "all")),
         "bias='all' is not supported (only 'none': the adapter also trained biases of the base model)"),
        (edited(b, tmp_path / "mts", config=set_("modules_to_save", ["lm_head"])),
         "modules_to_save=['lm_head'] is not supported (it trains full copies of modules besides the LoRA weights)"),
        (edited(b, tmp_path / "fifo", config=set_("fan_in_fan_out", True)),
         "fan_in_fan_out=True is not supported (the weights are stored transposed for a Conv1D base layer)"),
        (edited(b, tmp_path / "rank", config=set_("r", 8)),
         "module 'model.layers.0.self_attn.q_proj' has rank 2 in adapter_model.safetensors but r=8 in "
         "adapter_config.json"),
        (edited(b, tmp_path / "gone", weights=rename("model.layers.7.self_attn.q_proj")),
         "module 'model.layers.7.self_attn.q_proj' (in adapter_model.safetensors) does not exist in the model; "
         "was the adapter trained on another model class or base?"),
        (edited(b, tmp_path / "attn", weights=rename("model.layers.0.self_attn")),
         "target 'model.layers.0.self_attn' is a LlamaAttention, not an nn.Linear"),
        (edited(b, tmp_path / "halfB", weights=lambda sd: {k: v for k, v in sd.items()
                                                            if k != q0 + ".lora_B.weight"}),
         "module 'model.layers.0.self_attn.q_proj' has lora_A.weight but no lora_B.weight"),
        (adapters["embed"][0],
         "holds 2 tensor(s) that are not plain LoRA lora_A/lora_B weights of Linear modules: "
         "[base_model.model.model.embed_tokens.lora_embedding_A, "
         "base_model.model.model.embed_tokens.lora_embedding_B]"),
        (edited(adapters["head"][0], tmp_path / "head2", weights=lambda sd: {
            k: v * 2 if k.endswith("base_layer.weight") else v for k, v in sd.items()}),
         "holds its own copy of the base weight 'lm_head.weight' and it differs from the model's (saved (128, 64), "
         "model (128, 64)): the adapter was trained on a changed base (e.g. a resized vocabulary), which an expert "
         "cannot reproduce"),
    ]


def test_unsupported_adapters_are_refused_naming_dir_and_field(adapters, tmp_path):
    for d, message in error_cases(adapters, tmp_path):
        model = tiny_llama()
        with pytest.raises(ValueError, match=re.escape(message)) as e:
            from_peft_adapters(model, [adapters["a"][0], d])
        assert str(d) in str(e.value)
        assert not any(isinstance(m, LMoELinear) for m in model.modules())  # the model is left as it was


def test_lm_head_adapter_with_its_saved_base_weight(adapters):
    """PEFT saves lm_head's base weight with an lm_head LoRA; a copy equal to the model's is accepted."""
    d, ref = adapters["head"]
    assert "base_model.model.lm_head.base_layer.weight" in load_file(d / "adapter_model.safetensors")
    model = from_peft_adapters(tiny_llama(), [d])
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_shape_mismatch_with_the_model(adapters):
    d = adapters["head"][0]  # trained on a vocabulary of 128
    with pytest.raises(ValueError, match=re.escape(
            f"{d}: module 'lm_head': lora_A (2, 64) and lora_B (128, 2) do not fit the model's Linear (64 -> 64)")):
        from_peft_adapters(tiny_llama(vocab_size=64), [d])


def test_different_target_sets_are_refused(adapters):
    a, c = adapters["a"][0], adapters["c"][0]
    with pytest.raises(ValueError, match=re.escape(
            f"PEFT adapters '{a}' and '{c}' target different modules (only in the first: "
            f"[model.layers.0.self_attn.v_proj, model.layers.1.self_attn.v_proj]; only in the second: "
            f"[model.layers.0.self_attn.k_proj, model.layers.1.self_attn.k_proj]); every expert must adapt "
            f"the same Linear modules")):
        from_peft_adapters(tiny_llama(), [a, c])


def test_missing_files_pickles_and_bad_arguments(adapters, tmp_path):
    a = adapters["a"][0]
    with pytest.raises(ValueError, match="from_peft_adapters needs at least one PEFT adapter directory, got none"):
        from_peft_adapters(tiny_llama(), [])
    nope = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(f"PEFT adapter directory '{nope}' does not exist")):
        from_peft_adapters(tiny_llama(), [a, nope])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"'{tmp_path / 'empty'}' is not a PEFT adapter: adapter_config.json is missing")):
        from_peft_adapters(tiny_llama(), [tmp_path / "empty"])
    pickled = edited(a, tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").unlink()
    (pickled / "adapter_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"'{pickled}' has no adapter_model.safetensors; refusing to load pickle file(s) adapter_model.bin "
            f"(safetensors only)")):
        from_peft_adapters(tiny_llama(), [pickled])
    lmoe_dir = tmp_path / "lmoe"
    from_peft_adapters(tiny_llama(), [a]).save_pretrained(lmoe_dir)
    with pytest.raises(ValueError, match=re.escape(
            f"{lmoe_dir / 'adapter_config.json'}: no peft_type, so not a PEFT adapter config "
            f"(an lmoe adapter loads with LMoEModel.from_pretrained)")):
        from_peft_adapters(tiny_llama(), [lmoe_dir])
    with pytest.raises(ValueError, match=re.escape(
            "from_peft_adapters: config.share_A=True is not supported; each PEFT adapter becomes one full "
            "routed expert (own A and B)")):
        from_peft_adapters(tiny_llama(), [a], LMoEConfig(share_A=True))
    with pytest.warns(UserWarning, match=re.escape("ignoring config num_experts=3, rank=16")):
        model = from_peft_adapters(tiny_llama(), [a], LMoEConfig(num_experts=3, rank=16, top_k=1, router="topk"))
    assert (model.lmoe_config.num_experts, model.lmoe_config.rank, model.lmoe_config.router) == (1, 4, "topk")
    pissa = edited(a, tmp_path / "pissa", config=lambda cfg: cfg.__setitem__("init_lora_weights", "pissa"))
    with pytest.warns(UserWarning, match=re.escape(f"{pissa}: init_lora_weights='pissa' changes the base weights")):
        from_peft_adapters(tiny_llama(), [pissa])
