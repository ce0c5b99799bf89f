"""LMoEModel: inject L-MoE layers into any module, add the routing losses, save and load adapters.

* Injection follows PEFT: a string target is a regex full-matched on the module path, a list matches
  exact paths or ``.suffix``; only ``nn.Linear`` (and subclasses) are wrapped; nothing matched is an
  error that lists the Linear modules that exist.
* ``forward`` passes through to the wrapped model. With ``labels`` and a causal-LM output it returns an
  ``LMoECausalLMOutput`` whose ``loss`` is ``lm_loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss``
  (``+ sparsity_loss_coef * sparsity_loss`` for the sparsegen router, ``+ entropy_loss_coef * entropy_loss``
  for the dynmole router, ``+ rsl_loss_coef * rsl_loss`` for the hard_soft router, ``+ lbc_loss_coef * lbc_loss``
  for LoRAMoE's localised balancing constraint; terms only added when their coefficient is nonzero); the routing
  losses are computed once per forward from each layer's last routing, with padding masked by ``attention_mask``.
* ``forward(..., task_type=...)``: an optional (B,) tensor per sample, 1 (world knowledge), 0 (downstream task) or
  -1 (unknown), as ``DataCollator(task_types=...)`` emits it; used ONLY by the localised balancing constraint
  (``lbc_loss_coef > 0``) and never passed to the base model.
* ``router="sparsegen"`` with ``sparsegen_shared``: the routed layers of one input width share the lam MLP
  of the first of them (module order), which alone saves it (``<path>.sparsegen_mlp.*``).
* Per-layer expert counts (``num_experts`` a list): a module's depth is the ``<i>`` of the first
  ``layers.<i>.`` in its path, ranked among the distinct indices of the adapted modules (so with every
  decoder layer adapted it is ``<i>`` itself), and ``num_layers`` is how many distinct indices there are;
  a module without such an index gets the largest count. See ``LMoEConfig.experts_for_layer``.
* An adapter is a directory with ``adapter_config.json`` and ONE ``adapter_model.safetensors`` whose keys
  are ``<module path>.lora_A``, ``.lora_B``, ``.router.weight`` (and ``.router_noise.weight`` for the
  noisy top-k router) relative to the base model. Shared experts are the trailing slots of ``lora_A`` /
  ``lora_B``; with ``share_A`` ``lora_A`` is (1, r, d_in). Loading is strict and never unpickles anything.
* ``save_pretrained(dir, state_dict=...)`` takes the adapter from a full state dict of the wrapped model
  (what Trainer hands over under FSDP / DeepSpeed, where the live parameters are shards): the keys are
  matched against this model's adapter keys after removing wrapper prefixes (``module.``,
  ``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``, ``_orig_mod.``, ``base_model.``).
* **Saves are atomic per file and consistent as a pair.** Each file is written to a temp file, fsynced
  and renamed over the old one: weights first, then the config. The weights file also carries the
  config in its metadata, and loading checks the two agree. So a save killed at any point leaves
  either the previous adapter or the new one when the config is unchanged (as between the
  checkpoints of one run); if the config changed and the kill fell between the two renames, loading
  refuses the mixed pair instead of running new weights under the old config.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import LMoEConfig
from .layer import LMoELinear
from .routing import (balance_bias_step, dispatch_k, entropy_loss, load_balancing_loss, localized_balance_loss,
                      routing_sums, selection_counts, sparsity_loss, specialization_loss, z_loss)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_KEYS = ("lora_A", "lora_B", "router.weight")
FORMAT_VERSION = 1
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class LMoECausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus the routing losses (declared fields, so DDP can rebuild it)."""

    lm_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    sparsity_loss: torch.FloatTensor | None = None  # router='sparsegen' (LD-MoLE)
    entropy_loss: torch.FloatTensor | None = None  # router='dynmole' (DynMoLE)
    rsl_loss: torch.FloatTensor | None = None  # router='hard_soft' (LoRA-Mixer)
    lbc_loss: torch.FloatTensor | None = None  # lbc_loss_coef > 0 (LoRAMoE)


def _matches(name: str, target: str | list[str]) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def layer_index(name: str) -> int | None:
    """The ``<i>`` of the first ``layers.<i>.`` in a module path (None if there is none)."""
    m = _LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


def _adapter_params(m: LMoELinear) -> dict[str, torch.Tensor]:
    """The saved tensors of one layer by key suffix (the order is the file's)."""
    return m.adapter_tensors()


def _share_routers(layers: dict[str, LMoELinear], names: list[str]) -> None:
    """Within each parent module, the routed layers named in ``names`` share the router of the first of them
    (in ``names`` order) that is adapted there."""
    groups: dict[str, dict[str, LMoELinear]] = {}
    for path, m in layers.items():
        parent, _, child = path.rpartition(".")
        if child in names and m.num_experts > 0:
            groups.setdefault(parent, {})[child] = m
    if not any(len(g) > 1 for g in groups.values()):
        raise ValueError(f"shared_router_modules={names!r}: no parent module has two of them adapted with "
                         f"routed experts; adapted layers: {_few(sorted(layers))}")
    for group in groups.values():
        order = [group[c] for c in names if c in group]
        for follower in order[1:]:
            follower.share_router_of(order[0])


def _share_sparsegen(layers: dict[str, LMoELinear]) -> None:
    """The routed layers with a lam MLP share that of the first layer (module order) of their input width."""
    owners: dict[int, LMoELinear] = {}
    for m in layers.values():
        if m.sparsegen_mlp is None:  # no router of its own (plain LoRA, shared-router follower)
            continue
        owner = owners.setdefault(m.in_features, m)
        if owner is not m:
            m.share_sparsegen_of(owner)


def get_lmoe_model(model: nn.Module, config: LMoEConfig) -> "LMoEModel":
    """Freeze ``model`` and wrap every matched Linear in an ``LMoELinear``."""
    return LMoEModel(model, config)


class LMoEModel(nn.Module):
    # Trainer: do not pass num_items_in_batch into forward; it averages our joint loss over accumulation.
    accepts_loss_kwargs = False

    def __init__(self, model: nn.Module, config: LMoEConfig):
        super().__init__()
        if not isinstance(config, LMoEConfig):
            raise TypeError(f"config must be an LMoEConfig, got {type(config).__name__}")
        if any(isinstance(m, LMoELinear) for m in model.modules()):
            raise ValueError("model already holds LMoELinear layers; wrap the original base model")
        self.base_model = model
        self.lmoe_config = config
        for p in model.parameters():
            p.requires_grad_(False)
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
        chosen = [n for n in linears if _matches(n, config.target_modules)]
        if not chosen:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
            shown = ", ".join(linears[:12]) + (f", ... ({len(linears)} in all)" if len(linears) > 12 else "")
            raise ValueError(
                f"target_modules={config.target_modules!r} matched no Linear module. "
                f"Linear modules: {shown or 'none'}; their names end in: {', '.join(suffixes) or 'none'}")
        plain = {n for n in chosen if config.lora_modules is not None and _matches(n, config.lora_modules)}
        depths = sorted({i for i in map(layer_index, chosen) if i is not None})
        for name in chosen:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            i = layer_index(name)
            if name in plain:  # one plain LoRA: no routed expert, one always-on one
                layer = LMoELinear(getattr(parent, child), config, num_experts=0, shared_experts=1)
            else:
                n = config.experts_for_layer(None if i is None else depths.index(i), len(depths))
                layer = LMoELinear(getattr(parent, child), config, num_experts=n)
            setattr(parent, child, layer)
        self._layers = {n: m for n, m in model.named_modules() if isinstance(m, LMoELinear)}  # plain dict
        if config.shared_router_modules:
            _share_routers(self._layers, config.shared_router_modules)
        if config.router == "sparsegen" and config.sparsegen_shared:
            _share_sparsegen(self._layers)
        self._accumulate = False
        self._sums: dict[str, dict[str, torch.Tensor]] = {}
        self._pending_counts: list[tuple[LMoELinear, torch.Tensor]] = []

    # ---------------------------------------------------------------- plumbing
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def lmoe_layers(self) -> dict[str, LMoELinear]:
        """Adapted layers by module path relative to the base model."""
        return self._layers

    def print_trainable_parameters(self) -> None:
        trainable, total = self.num_parameters_split()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    def num_parameters_split(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the plain base model inside this context."""
        layers = self.lmoe_layers().values()
        for m in layers:
            m.disabled = True
        try:
            yield
        finally:
            for m in layers:
                m.disabled = False

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        **kwargs) -> None:
        """Recompute each decoder layer in backward (the base model's checkpointing, Trainer's entry point)."""
        # Non-reentrant checkpointing works with a frozen embedding (no input-requires-grad hack needed)
        # and replays the RNG state, so expert dropout draws the same mask in the recomputation.
        ckpt_kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """The older name of ``activation_checkpointing_enable``."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def unload(self) -> nn.Module:
        """Put the original Linear layers back and return the base model (adapter weights are dropped)."""
        for name, layer in self.lmoe_layers().items():
            parent_name, _, child = name.rpartition(".")
            parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
            setattr(parent, child, layer.base_layer)
        self._layers = {}
        return self.base_model

    def generate(self, *args, **kwargs):
        """The base model's ``generate``: routing is per token, so its KV cache stays valid."""
        return self.base_model.generate(*args, **kwargs)

    # ---------------------------------------------------------------- forward and losses
    def forward(self, *args, input_ids=None, attention_mask=None, labels=None, task_type=None, **kwargs):
        # Named arguments (not only **kwargs) so that Trainer's column filter keeps them; only those
        # given are passed on, so a plain module called as model(x) works too. ``task_type`` (B,) is ours
        # (LoRAMoE's localised balancing constraint) and never reaches the base model.
        batch_size = _batch_size(task_type, attention_mask, input_ids, kwargs.get("inputs_embeds"))
        for m in self.lmoe_layers().values():
            m.last_routing = None
        if self.training and self._pending_counts:
            self._apply_balance_updates()
        named = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        kwargs.update({k: v for k, v in named.items() if v is not None})
        out = self.base_model(*args, **kwargs)
        if self.training and self.lmoe_config.balance_bias_rate > 0:
            self._record_balance_counts(attention_mask)
        track = self._accumulate
        if labels is None and not track:
            return out
        losses = self._routing_losses(attention_mask, accumulate=track, task_type=task_type, batch_size=batch_size)
        aux, z = losses["aux"], losses["z"]
        if labels is None or getattr(out, "loss", None) is None or aux is None:
            return out
        c = self.lmoe_config
        loss = out.loss + c.aux_loss_coef * aux + (c.z_loss_coef * z if c.z_loss_coef else 0.0)
        extra = {}
        for key, coef in (("sparsity_loss", c.sparsity_loss_coef), ("entropy_loss", c.entropy_loss_coef),
                          ("rsl_loss", c.rsl_loss_coef), ("lbc_loss", c.lbc_loss_coef)):
            if losses.get(key) is not None:
                extra[key] = losses[key]
                if coef:
                    loss = loss + coef * losses[key]
        if isinstance(out, CausalLMOutputWithPast):
            return LMoECausalLMOutput(loss=loss, lm_loss=out.loss, aux_loss=aux, z_loss=z, logits=out.logits,
                                      past_key_values=out.past_key_values, hidden_states=out.hidden_states,
                                      attentions=out.attentions, **extra)
        out["loss"] = loss
        return out

    # ---------------------------------------------------------------- aux-loss-free balancing
    def _record_balance_counts(self, attention_mask) -> None:
        """After a training forward: each biased layer's selection counts, summed over DDP ranks. They are
        applied at the start of the NEXT training forward, so that activation checkpointing, which re-runs
        the layers in backward, routes with the same bias as the forward did."""
        layers = [m for m in self.lmoe_layers().values() if m.routing_bias is not None and m.last_routing is not None]
        if not layers:
            return
        counts = [selection_counts(m.last_routing[1], _token_mask(attention_mask, m.last_routing[1].shape[0]))
                  for m in layers]
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            flat = torch.cat(counts)
            dist.all_reduce(flat)
            counts = list(flat.split([c.numel() for c in counts]))
        self._pending_counts = list(zip(layers, counts))

    @torch.no_grad()
    def _apply_balance_updates(self) -> None:
        rate = self.lmoe_config.balance_bias_rate
        for m, counts in self._pending_counts:
            balance_bias_step(m.routing_bias, counts, rate)
        self._pending_counts = []

    def _selected(self, m: LMoELinear, gates: torch.Tensor) -> torch.Tensor | None:
        """The actual selection when it is not the logits' top-k (balance bias, sigmoid, implicit, sparsegen and
        dynmole routers)."""
        if m.routing_bias is not None or self.lmoe_config.router in ("sigmoid_topk", "implicit", "sparsegen",
                                                                      "dynmole"):
            return gates
        return None

    def routing_losses(self, attention_mask: torch.Tensor | None = None, accumulate: bool = False):
        """(balance loss, z-loss), each averaged over the adapted layers, from the last forward."""
        losses = self._routing_losses(attention_mask, accumulate)
        return losses["aux"], losses["z"]

    def _routing_losses(self, attention_mask: torch.Tensor | None = None, accumulate: bool = False,
                        task_type: torch.Tensor | None = None, batch_size: int | None = None) -> dict:
        """``aux`` (balance loss) and ``z``, for their routers ``sparsity_loss`` / ``entropy_loss`` / ``rsl_loss``, and
        with ``lbc_loss_coef > 0`` LoRAMoE's ``lbc_loss`` (over ``batch_size`` samples with their ``task_type``), each
        averaged over the adapted layers, from the last forward (None where there is no routed layer)."""
        c = self.lmoe_config
        bal, zs, sparse, ent, rsl, lbc = [], [], [], [], [], []
        for name, m in self.lmoe_layers().items():
            if m.last_routing is None or not m.routed:
                continue
            logits, gates = m.last_routing
            mask = _token_mask(attention_mask, logits.shape[0])
            k = dispatch_k(c.router, c.top_k)
            selected = self._selected(m, gates)
            # LD-MoLE's balance loss averages its gates (P), the others the softmax of the logits
            bal.append(load_balancing_loss(logits, k, mask, selected, gates if c.router == "sparsegen" else None))
            zs.append(z_loss(logits, mask))
            if c.router == "sparsegen":
                sparse.append(sparsity_loss(logits, m.last_lambda, c.top_k, mask))
            elif c.router == "dynmole":
                ent.append(entropy_loss(logits, c.tsallis_q, mask))
            elif c.router == "hard_soft":
                rsl.append(specialization_loss(logits, mask))
            if c.lbc_loss_coef > 0:
                lbc.append(localized_balance_loss(gates, batch_size or 1, c.lbc_world_experts(m.num_experts),
                                                  c.lbc_delta, task_type, mask))
            if accumulate:
                sums = routing_sums(logits, gates, k, mask, selected)
                acc = self._sums.setdefault(name, {k_: torch.zeros_like(v) for k_, v in sums.items()})
                for k_, v in sums.items():
                    acc[k_] += v
        if not bal:
            return {"aux": None, "z": None}
        out = {"aux": torch.stack(bal).mean(), "z": torch.stack(zs).mean()}
        if sparse:
            out["sparsity_loss"] = torch.stack(sparse).mean()
        if ent:
            out["entropy_loss"] = torch.stack(ent).mean()
        if rsl:
            out["rsl_loss"] = torch.stack(rsl).mean()
        if lbc:
            out["lbc_loss"] = torch.stack(lbc).mean()
        return out

    # ---------------------------------------------------------------- routing statistics
    def track_routing(self, enabled: bool = True) -> None:
        """Accumulate routing statistics over every following forward (e.g. an eval pass); resets them."""
        self._accumulate = enabled
        self._sums = {}

    def routing_stats(self) -> dict[str, dict]:
        """Per layer: ``load`` (share of tokens dispatched to each expert), ``mean_gate``, ``entropy``
        (mean normalised gate entropy in [0, 1]) and ``tokens``. Accumulated since ``track_routing()``
        if tracking, else from the last forward (padding is not masked there)."""
        sums = self._sums
        if not self._accumulate or not sums:
            k = dispatch_k(self.lmoe_config.router, self.lmoe_config.top_k)
            sums = {n: routing_sums(*m.last_routing, k, None, self._selected(m, m.last_routing[1]))
                    for n, m in self.lmoe_layers().items() if m.last_routing is not None and m.routed}
        stats = {}
        for name, s in sums.items():
            t = max(float(s["tokens"]), 1.0)
            stats[name] = {"load": (s["load"] / t).tolist(), "mean_gate": (s["gate"] / t).tolist(),
                           "entropy": float(s["entropy"]) / t, "tokens": int(s["tokens"])}
        return stats

    # ---------------------------------------------------------------- save / load
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {}
        for name, m in self.lmoe_layers().items():
            for key, p in _adapter_params(m).items():
                sd[f"{name}.{key}"] = p.detach().contiguous()
        return sd

    def adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        """The full shape of every adapter tensor, from the layers' sizes (not from the live parameters,
        which under FSDP are shards)."""
        return {f"{name}.{key}": shape for name, m in self.lmoe_layers().items()
                for key, shape in m.adapter_shapes().items()}

    def adapter_state_dict_from(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This model's adapter tensors picked out of a full state dict of the (possibly wrapped) model.

        Keys may carry wrapper prefixes (see the module docstring); every adapter key must be there with
        its full shape, else ``ValueError`` (a sharded state dict cannot be saved as an adapter)."""
        shapes = self.adapter_shapes()
        found = {}
        for key, value in state_dict.items():
            name = adapter_key(key)
            if name in shapes:
                found[name] = value
        missing = sorted(set(shapes) - set(found))
        if missing:
            raise ValueError(f"the state dict lacks {len(missing)} adapter tensor(s) {_few(missing)} "
                             f"(it has {len(state_dict)} entries)")
        bad = [f"{k}: {tuple(v.shape)} vs {shapes[k]}" for k, v in found.items() if tuple(v.shape) != shapes[k]]
        if bad:
            raise ValueError(f"adapter tensor(s) in the state dict are not full (sharded?): {_few(bad)}")
        return {k: found[k].detach().contiguous() for k in shapes}

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict | None = None, **_ignored) -> None:
        """Write the adapter: from the live parameters, or from ``state_dict`` (a full state dict of the
        wrapped model, as Trainer gives under FSDP) when one is given."""
        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        base = getattr(getattr(self.base_model, "config", None), "_name_or_path", None)
        meta = {"format_version": FORMAT_VERSION, "base_model_name_or_path": base,
                "config": self.lmoe_config.to_dict()}
        adapter = self.adapter_state_dict() if state_dict is None else self.adapter_state_dict_from(state_dict)
        sd = {k: v.cpu() for k, v in adapter.items()}
        st_meta = {"format": "pt", "lmoe": "1", "lmoe_config": json.dumps(meta["config"], sort_keys=True)}
        # Weights first, then config; see the module docstring for what a kill between the two leaves.
        _atomic_write(d / WEIGHTS_NAME, lambda p: save_file(sd, str(p), metadata=st_meta))
        _atomic_write(d / CONFIG_NAME, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_dir: str | os.PathLike,
                        is_trainable: bool = False) -> "LMoEModel":
        """Wrap ``model`` with the adapter saved in ``adapter_dir`` (strict; safetensors only)."""
        config = load_adapter_config(adapter_dir)
        wrapped = cls(model, config)
        try:
            wrapped.load_adapter_weights(adapter_dir)
        except BaseException:
            wrapped.unload()  # leave the caller's model as it was
            raise
        for n, p in wrapped.named_parameters():
            if p.requires_grad:
                p.requires_grad_(is_trainable)
        return wrapped.eval()

    def load_adapter_weights(self, adapter_dir: str | os.PathLike) -> None:
        path = Path(adapter_dir) / WEIGHTS_NAME
        sd = read_adapter_weights(adapter_dir)
        own = self.adapter_state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        if missing or unexpected:
            raise ValueError(f"{path} does not match this model and config: "
                             f"{len(missing)} missing key(s) {_few(missing)}, "
                             f"{len(unexpected)} unexpected key(s) {_few(unexpected)}")
        bad = [f"{k}: saved {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
               if sd[k].shape != v.shape]
        if bad:
            raise ValueError(f"{path}: shape mismatch for {len(bad)} tensor(s): {_few(bad)}")
        # Same keys and shapes, but were the weights trained under this config (alpha, router, ...)?
        saved = _saved_config(path)
        if saved is not None and saved != self.lmoe_config:
            diff = [f"{k}={v!r} (model: {getattr(self.lmoe_config, k)!r})" for k, v in saved.to_dict().items()
                    if v != self.lmoe_config.to_dict()[k]]
            raise ValueError(f"{path} was saved with another LMoEConfig: {', '.join(diff)}; in an adapter "
                             f"folder this means {CONFIG_NAME} and the weights come from different saves")
        params = {}
        for name, m in self.lmoe_layers().items():
            params.update({f"{name}.{key}": p for key, p in _adapter_params(m).items()})
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(_like(sd[k], p))  # copy_ keeps the parameter's dtype, device and storage layout


_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def adapter_key(key: str) -> str:
    """A state-dict key of the wrapped model as an adapter key: wrapper prefixes (DDP's ``module.``,
    FSDP1's ``_fsdp_wrapped_module.``, checkpoint wrappers', torch.compile's ``_orig_mod.``) and
    ``LMoEModel``'s ``base_model.`` removed. ``base_model.model.layers.0.mlp.up_proj.lora_A`` ->
    ``model.layers.0.mlp.up_proj.lora_A``."""
    for part in _WRAPPER_PARTS:
        key = key.replace(part, "")
    key = key.removeprefix("module.")
    return key.removeprefix("base_model.")


def load_adapter_config(adapter_dir: str | os.PathLike) -> LMoEConfig:
    d = Path(adapter_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"adapter directory '{d}' does not exist")
    p = d / CONFIG_NAME
    if not p.is_file():
        raise FileNotFoundError(f"'{d}' is not an lmoe adapter: {CONFIG_NAME} is missing")
    try:
        meta = json.loads(p.read_text())
        version = meta.get("format_version", FORMAT_VERSION)
        config = LMoEConfig.from_dict(meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{p}: not a valid lmoe adapter config ({type(e).__name__}: {e})") from None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{p}: adapter format_version {version!r} is newer than this lmoe supports "
                         f"({FORMAT_VERSION}); upgrade lmoe")
    return config


def read_adapter_weights(adapter_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    d = Path(adapter_dir)
    p = d / WEIGHTS_NAME
    if not p.is_file():
        pickles = [q.name for q in d.glob("*") if q.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
        hint = f"; refusing to load pickle file(s) {', '.join(sorted(pickles))} (safetensors only)" if pickles else ""
        raise FileNotFoundError(f"'{d}' has no {WEIGHTS_NAME}{hint}")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{p}: corrupt or truncated safetensors file ({e})") from None


def _saved_config(path: Path) -> LMoEConfig | None:
    """The LMoEConfig recorded in a weights file's metadata (None for files written before it was)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get("lmoe_config")
        return None if text is None else LMoEConfig.from_dict(json.loads(text))
    except (SafetensorError, OSError, json.JSONDecodeError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: unreadable lmoe metadata ({e})") from None


def _like(src: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``src`` (a full tensor) as ``param`` holds it: this rank's shard when ``param`` is an FSDP2 DTensor."""
    if hasattr(param, "device_mesh") and hasattr(param, "placements"):
        from torch.distributed.tensor import distribute_tensor

        # Every rank read the same file: each takes its own shard, no communication.
        return distribute_tensor(src.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
    return src


def _batch_size(task_type, attention_mask, input_ids, inputs_embeds) -> int | None:
    """Samples in the batch (for LoRAMoE's per-sample importance): from ``task_type`` (B,), which must agree with
    the inputs, else from ``attention_mask`` / ``input_ids`` / ``inputs_embeds``; None if none is given (then the
    loss treats the whole forward as one sample)."""
    from_inputs = next((t.shape[0] for t in (attention_mask, input_ids, inputs_embeds)
                        if isinstance(t, torch.Tensor) and t.dim() >= 2), None)
    if task_type is None:
        return from_inputs
    if not isinstance(task_type, torch.Tensor) or task_type.dim() != 1:
        raise ValueError(f"task_type must be a 1-D tensor of one value per sample (1, 0 or -1), got "
                         f"{getattr(task_type, 'shape', type(task_type).__name__)}")
    if from_inputs is not None and task_type.shape[0] != from_inputs:
        raise ValueError(f"task_type has {task_type.shape[0]} entries for a batch of {from_inputs} samples")
    # Values are not checked here (that would sync with the device every step): any value other than 1 or 0
    # counts as unknown (weight 1) in the loss.
    return task_type.shape[0]


def _token_mask(attention_mask: torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.numel() != num_tokens:
        return None
    return attention_mask.reshape(-1).bool()


def _few(items: list[str], n: int = 5) -> str:
    return "[" + ", ".join(items[:n]) + (", ..." if len(items) > n else "") + "]"


def _atomic_write(path: Path, write) -> None:
    """Write via ``write(tmp_path)`` to a temp file in the same directory, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; an adapter or result is meant to be shared
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
