"""from_peft_adapters: N trained PEFT LoRA adapters become the N experts of one lmoe mixture.

PEFT adapter i adapts a Linear ``W0`` at module path p with ``A_i`` (r_i, d_in) and ``B_i`` (d_out, r_i):

    y = W0 x + b + s_i B_i A_i x,     s_i = alpha_i / r_i    (alpha_i / sqrt(r_i) with use_rslora)

where r_i and alpha_i are the adapter's ``r`` / ``lora_alpha``, or its ``rank_pattern`` /
``alpha_pattern`` entry for p (matched as PEFT does). lmoe has one scaling s = alpha / rank for every
expert of every layer, so the import sets ``rank = R = max r_i`` (over adapters and modules),
``alpha = R`` (s = 1) and folds each s_i into its B, zero-padding the smaller ranks:

    A'_i = [A_i; 0]  (R, d_in),    B'_i = [s_i B_i, 0]  (d_out, R),    B'_i A'_i = s_i B_i A_i  exactly,

    y = W0 x + b + sum_i g_i s_i B_i A_i x.

With the softmax gate and one adapter g = 1: the PEFT model itself. With ``cat=True`` (router="static",
LoRA Soups' CAT) g_i = w_i, one learned weight per expert and layer, starting at 1: the base plus the sum
of all adapters. Only safetensors are read (never a pickle). Everything is checked before ``model`` is
touched; see docs/import.md for the errors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .config import LMoEConfig
from .model import CONFIG_NAME, WEIGHTS_NAME, LMoEModel, _few, _matches, read_adapter_weights

# adapter_config.json fields that change what a LoRA layer computes (or add weights) beyond y = W0 x + s B A x.
_UNSUPPORTED = {
    "use_dora": "DoRA rescales the weight by a learned magnitude",
    "fan_in_fan_out": "the weights are stored transposed for a Conv1D base layer",
    "modules_to_save": "it trains full copies of modules besides the LoRA weights",
    "lora_bias": "it adds a bias to lora_B",
    "trainable_token_indices": "it trains embedding rows besides the LoRA weights",
    "layer_replication": "it duplicates decoder layers",
    "target_parameters": "it adapts nn.Parameters, not Linear modules",
    "alora_invocation_tokens": "activated LoRA applies the adapter to part of the sequence only",
    "use_qalora": "QA-LoRA pools the input before lora_A",
    "megatron_config": "it targets Megatron parallel layers",
    "arrow_config": "Arrow routes between LoRAs itself",
    "kasa_config": "KaSA changes the LoRA forward",
    "velora_config": "VeLoRA changes the LoRA forward",
    "monteclora_config": "MonteCLoRA changes the LoRA forward",
    "use_bdlora": "BD-LoRA changes the LoRA layout",
}
# init_lora_weights values that modify the base weights: the adapter is relative to that modified base.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq")
_CONFIG_FIELDS_DERIVED = ("num_experts", "rank", "alpha", "target_modules")
_KEY = re.compile(r"(.+)\.(lora_A|lora_B)\.weight")


def from_peft_adapters(model: nn.Module, adapter_dirs, config: LMoEConfig | None = None, *,
                       train_experts: bool = False, cat: bool = False) -> LMoEModel:
    """Wrap ``model`` with one lmoe expert per PEFT LoRA adapter directory (expert i = ``adapter_dirs[i]``).

    ``config`` supplies the routing fields (router, top_k, aux_loss_coef, z_loss_coef, dropout, ...;
    default ``LMoEConfig()``: a dense softmax gate); ``num_experts``, ``rank``, ``alpha`` and
    ``target_modules`` are always derived from the adapters (``dataclasses.replace``; a warning names
    any given value that is overridden). ``cat=True`` sets ``router="static"``. The experts are frozen
    unless ``train_experts``; the gate (router or static weights) trains. Raises ``FileNotFoundError``
    for a missing directory or file and ``ValueError`` for anything the experts cannot reproduce exactly.
    """
    if isinstance(adapter_dirs, (str, os.PathLike)):
        adapter_dirs = [adapter_dirs]
    dirs = [Path(d) for d in adapter_dirs]
    if not dirs:
        raise ValueError("from_peft_adapters needs at least one PEFT adapter directory, got none")
    config = LMoEConfig() if config is None else config
    if not isinstance(config, LMoEConfig):
        raise TypeError(f"config must be an LMoEConfig or None, got {type(config).__name__}")
    for name, bad in (("shared_experts", config.shared_experts), ("share_A", config.share_A),
                      ("core_experts", config.core_experts), ("frozen_sparse_A", config.frozen_sparse_A),
                      ("lora_modules", config.lora_modules)):
        if bad:
            raise ValueError(f"from_peft_adapters: config.{name}={bad!r} is not supported; each PEFT adapter "
                             f"becomes one full routed expert (own A and B)")

    adapters = [_read_adapter(d, model) for d in dirs]  # per adapter: {module path: (A, s * B)}
    paths = list(adapters[0])
    for d, a in zip(dirs[1:], adapters[1:]):
        if set(a) != set(paths):
            only0, only1 = sorted(set(paths) - set(a)), sorted(set(a) - set(paths))
            raise ValueError(f"PEFT adapters '{dirs[0]}' and '{d}' target different modules "
                             f"(only in the first: {_few(only0, 3)}; only in the second: {_few(only1, 3)}); "
                             f"every expert must adapt the same Linear modules")
    rank = max(A.shape[0] for a in adapters for A, _ in a.values())

    # A list of exact paths reads well in adapter_config.json; if one of them is also the suffix of another
    # Linear's path (a list matches '.suffix' too), an anchored regex keeps the match exact.
    targets: str | list[str] = sorted(paths)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    if any(_matches(n, targets) for n in linears if n not in adapters[0]):
        targets = "|".join(re.escape(p) for p in targets)
    derived = dict(num_experts=len(dirs), rank=rank, alpha=float(rank), target_modules=targets)
    defaults = LMoEConfig()
    overridden = [f"{k}={getattr(config, k)!r}" for k in _CONFIG_FIELDS_DERIVED
                  if getattr(config, k) != getattr(defaults, k) and getattr(config, k) != derived[k]]
    if overridden:
        warnings.warn(f"from_peft_adapters derives num_experts, rank, alpha and target_modules from the adapters; "
                      f"ignoring config {', '.join(overridden)}", stacklevel=2)
    config = dataclasses.replace(config, **derived, **({"router": "static"} if cat else {}))

    wrapped = LMoEModel(model, config)
    try:
        with torch.no_grad():
            for path, layer in wrapped.lmoe_layers().items():
                layer.lora_A.zero_()
                layer.lora_B.zero_()
                for i, a in enumerate(adapters):
                    A, B = a[path]
                    layer.lora_A[i, : A.shape[0]].copy_(A)
                    layer.lora_B[i][:, : B.shape[1]].copy_(B)  # copy_ into the permuted storage, never replace
                layer.lora_A.requires_grad_(train_experts)
                layer.lora_B.requires_grad_(train_experts)
    except BaseException:
        wrapped.unload()  # leave the caller's model as it was
        raise
    return wrapped


def _read_adapter(d: Path, model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module path: (A_i, s_i B_i)}`` of one PEFT LoRA adapter, checked against ``model``."""
    if not d.is_dir():
        raise FileNotFoundError(f"PEFT adapter directory '{d}' does not exist")
    p = d / CONFIG_NAME
    if not p.is_file():
        raise FileNotFoundError(f"'{d}' is not a PEFT adapter: {CONFIG_NAME} is missing")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or "peft_type" not in cfg:
        raise ValueError(f"{p}: no peft_type, so not a PEFT adapter config "
                         f"(an lmoe adapter loads with LMoEModel.from_pretrained)")
    if cfg["peft_type"] != "LORA":
        raise ValueError(f"{d}: peft_type {cfg['peft_type']!r} is not supported; only LoRA adapters "
                         f"(peft_type 'LORA') can be imported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{d}: bias={cfg['bias']!r} is not supported (only 'none': the adapter also "
                         f"trained biases of the base model)")
    for field, why in _UNSUPPORTED.items():
        if cfg.get(field):
            raise ValueError(f"{d}: {field}={cfg[field]!r} is not supported ({why})")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        warnings.warn(f"{d}: init_lora_weights={init!r} changes the base weights; this adapter is only correct "
                      f"on that changed base (or after PEFT's path_initial_model_for_weight_conversion)",
                      stacklevel=3)

    sd = read_adapter_weights(d)  # safetensors only; a directory with pickles only is refused
    w = d / WEIGHTS_NAME
    weights: dict[str, dict[str, torch.Tensor]] = {}
    other, base_copies = [], {}
    for key, t in sd.items():
        name = key.removeprefix("base_model.model.")
        m = _KEY.fullmatch(name)
        if m is not None and t.dim() == 2:
            weights.setdefault(m.group(1), {})[m.group(2)] = t
        elif _base_parameter(model, name.replace(".base_layer.", ".")) is not None:
            base_copies[key] = t  # PEFT's save_embedding_layers: a copy of a base weight (checked below)
        else:
            other.append(key)
    if other:
        raise ValueError(f"{w} holds {len(other)} tensor(s) that are not plain LoRA lora_A/lora_B weights of "
                         f"Linear modules: {_few(sorted(other), 3)}")
    if not weights:
        raise ValueError(f"{w} holds no LoRA weights")

    rslora = bool(cfg.get("use_rslora", False))
    out = {}
    for path, ab in sorted(weights.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{w}: module '{path}' has {'lora_A' if 'lora_A' in ab else 'lora_B'}.weight "
                             f"but no {'lora_B' if 'lora_A' in ab else 'lora_A'}.weight")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"{d}: module '{path}' (in {WEIGHTS_NAME}) does not exist in the model; "
                             f"was the adapter trained on another model class or base?") from None
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{d}: target '{path}' is a {type(module).__name__}, not an nn.Linear")
        A, B = ab["lora_A"], ab["lora_B"]
        if A.shape[1] != module.in_features or B.shape[0] != module.out_features or B.shape[1] != A.shape[0]:
            raise ValueError(f"{d}: module '{path}': lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not "
                             f"fit the model's Linear ({module.in_features} -> {module.out_features})")
        r = _pattern_value(cfg.get("rank_pattern") or {}, path, cfg.get("r", 8))
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, path, cfg.get("lora_alpha", 8))
        if A.shape[0] != r:
            raise ValueError(f"{d}: module '{path}' has rank {A.shape[0]} in {WEIGHTS_NAME} but r={r} in "
                             f"{CONFIG_NAME}")
        s = alpha / math.sqrt(r) if rslora else alpha / r
        out[path] = (A, B.double().mul(s))  # s_i folded into B_i (copied into the model's dtype later)
    for key, t in base_copies.items():
        name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        p = _base_parameter(model, name)
        if t.shape != p.shape or not torch.equal(t, p.detach().to(t.dtype)):
            raise ValueError(f"{w} holds its own copy of the base weight '{name}' and it differs from the model's "
                             f"(saved {tuple(t.shape)}, model {tuple(p.shape)}): the adapter was trained on a "
                             f"changed base (e.g. a resized vocabulary), which an expert cannot reproduce")
    return out


def _base_parameter(model: nn.Module, name: str) -> torch.Tensor | None:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


def _pattern_value(pattern: dict, path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key k with ``(.*\\.)?(k)$`` matching ``path``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default
