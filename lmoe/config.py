"""LMoEConfig: the one configuration object of an L-MoE adapter.

It is passed down whole (to the injector, the layers, the losses and the save file) and validated
in ``__post_init__``: every bad value raises ``ValueError`` naming the field and the value, so a
typo never turns into a silent default. Every field's default keeps the original L-MoE layer
(dense softmax gate, delta composition, N experts of rank r); ``LMoEConfig.from_preset(name)`` starts
from one of the method presets of ``lmoe.presets`` instead (docs/methods.md).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROUTERS = ("softmax", "topk", "noisy_topk", "switch", "sigmoid_topk", "implicit", "static", "sparsegen", "dynmole",
           "hard_soft")
TOPK_ROUTERS = ("topk", "noisy_topk", "sigmoid_topk", "implicit")  # the routers that keep top_k experts
# The routers whose number of active experts varies per token (f of the balance loss: docs/methods.md).
DYNAMIC_ROUTERS = ("sparsegen", "dynmole")
COMPOSITIONS = ("delta", "factor")


@dataclass
class LMoEConfig:
    num_experts: int | list[int] = field(
        default=8,
        metadata={"help": "N, routed LoRA experts per adapted Linear; or a list of G ints: the adapted layers are "
                          "split by depth into G contiguous groups and group j gets num_experts[j] "
                          "(see experts_for_layer)."},
    )
    rank: int = field(default=8, metadata={"help": "r, rank of each expert."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the experts' input, in [0, 1)."})
    target_modules: str | list[str] = field(
        default_factory=lambda: list(LLAMA_TARGETS),
        metadata={"help": "PEFT rules: a string is a regex full-matched against the module path; a list "
                          "matches exact paths or path suffixes ('.q_proj')."},
    )
    router: str = field(
        default="softmax",
        metadata={"help": "'softmax' (dense), 'topk' (sparse), 'noisy_topk' (Shazeer 2017: top-k of logits plus "
                          "trained Gaussian noise, in training only), 'switch' (top-1 with expert capacity), "
                          "'sigmoid_topk' (gates sigmoid(l) on the top-k, SMoRA), 'implicit' (FlyLoRA: no router; "
                          "the top-k experts by |A_i x + bias_i|, gate 1) or 'static' (one learned weight per "
                          "expert and layer, no input dependence: LoRA Soups' CAT), 'sparsegen' (LD-MoLE: "
                          "g = sparsemax(l / (1 - lambda)), lambda per token from a small MLP), 'dynmole' "
                          "(DynMoLE: all experts when the Tsallis entropy of softmax(l) is high, else top-p with at "
                          "least top_k), or 'hard_soft' (LoRA-Mixer: the top-k gates forward, the dense "
                          "softmax's gradient backward)."},
    )
    top_k: int = field(default=2, metadata={"help": "Experts kept per token when router is 'topk' or 'noisy_topk'; "
                                                     "'dynmole': the fewest kept; 'sparsegen': the k of the "
                                                     "sparsity loss."})
    composition: str = field(
        default="delta",
        metadata={"help": "'delta': dW = sum_i g_i B_i A_i; 'factor': dW = (sum_i g_i B_i)(sum_i g_i A_i)."},
    )
    aux_loss_coef: float = field(default=1e-2, metadata={"help": "Weight of the load-balancing loss."})
    z_loss_coef: float = field(default=0.0, metadata={"help": "Weight of the router z-loss."})
    capacity_factor: float | None = field(
        default=1.25,
        metadata={"help": "router='switch': each expert takes at most C = ceil(capacity_factor * T / N) of the T "
                          "tokens of a forward, first come first served; later tokens get gate 0 (dropped). "
                          "None: no limit."},
    )
    shared_experts: int = field(
        default=0,
        metadata={"help": "S always-on experts (gate fixed to 1, DeepSeekMoE), stored after the N routed ones."},
    )
    share_A: bool = field(
        default=False,
        metadata={"help": "HydraLoRA: one A (r x d_in) shared by all experts, which keep their own B."},
    )
    core_experts: bool = field(
        default=False,
        metadata={"help": "CoMoL: one A (r x d_in) and one B (d_out x r) shared by all experts; expert i is an r x r "
                          "core C_i, dW = B (sum_i g_i C_i) A."},
    )
    frozen_sparse_A: float | None = field(
        default=None,
        metadata={"help": "FlyLoRA: A is a frozen sparse random matrix with this density in (0, 1] (nonzeros per "
                          "row = density * d_in, drawn from N(0, 1/(N*r)^2)); None: A is trained."},
    )
    balance_bias_rate: float = field(
        default=0.0,
        metadata={"help": "Aux-loss-free balancing (DeepSeek-V3, SMoRA, FlyLoRA): a per-expert bias added to the "
                          "selection scores of a top-k router, moved by this rate * sign(mean load - load) after "
                          "every training forward. 0: off."},
    )
    lora_modules: str | list[str] | None = field(
        default=None,
        metadata={"help": "Targets (same matching rules) that get one plain LoRA (gate fixed to 1, no router) "
                          "instead of a mixture, e.g. MixLoRA's attention projections."},
    )
    shared_router_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Sibling Linears (by last name, same parent module) that share ONE router: the first "
                          "listed routes on its own input and the others reuse its gates (MixLoRA: gate_proj, "
                          "up_proj, down_proj route on the MLP input)."},
    )
    router_init_std: float | None = field(
        default=None,
        metadata={"help": "Initialise the router weight from N(0, std^2) (MixLoRA: 0.02); None: like nn.Linear."},
    )
    sparsegen_hidden: int = field(
        default=512,
        metadata={"help": "router='sparsegen': hidden width H of the lambda MLP "
                          "(Linear(d_in, H), ReLU, Linear(H, 1), LogSigmoid)."},
    )
    sparsegen_shared: bool = field(
        default=True,
        metadata={"help": "router='sparsegen': one lambda MLP per input width, shared by every routed layer of that "
                          "width (LD-MoLE's code); false: one per layer."},
    )
    sparsity_loss_coef: float = field(
        default=0.0,
        metadata={"help": "router='sparsegen': weight of LD-MoLE's sparsity loss relu(lambda_k(l) - lambda), which "
                          "pushes each token to at most top_k active experts."},
    )
    top_p: float = field(
        default=0.75,
        metadata={"help": "router='dynmole': keep the experts, largest p first, while their cumulative p <= top_p "
                          "(and at least top_k)."},
    )
    entropy_threshold: float = field(
        default=0.9,
        metadata={"help": "router='dynmole': a token whose normalised Tsallis entropy exceeds this uses all experts "
                          "(1: never)."},
    )
    tsallis_q: float = field(default=1.1, metadata={"help": "router='dynmole': the index q of the Tsallis entropy "
                                                            "(1: Shannon)."})
    entropy_loss_coef: float = field(
        default=0.0,
        metadata={"help": "router='dynmole': weight of the mean normalised Tsallis entropy of softmax(l)."},
    )
    lbc_loss_coef: float = field(
        default=0.0,
        metadata={"help": "LoRAMoE: weight of the localised balancing constraint, the squared coefficient of variation "
                          "of the per-sample expert importance Q (summed gates) weighted by I = 1 +- lbc_delta "
                          "(docs/methods.md). 0: off (not computed)."},
    )
    lbc_delta: float = field(
        default=0.0,
        metadata={"help": "LoRAMoE: delta of I = 1 + delta where an expert's group matches the sample's task type "
                          "and 1 - delta where not, in [0, 1]."},
    )
    lbc_world_fraction: float = field(
        default=0.5,
        metadata={"help": "LoRAMoE: the first floor(fraction * N) routed experts form the world-knowledge group "
                          "(task_type 1), the others the downstream-task group (task_type 0); in (0, 1)."},
    )
    rsl_loss_coef: float = field(
        default=0.0,
        metadata={"help": "router='hard_soft': weight of LoRA-Mixer's routing specialisation loss, mean normalised "
                          "token entropy of softmax(l) + 1 - normalised entropy of its mean (docs/methods.md)."},
    )

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"LMoEConfig.{name} {why}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if isinstance(self.num_experts, tuple):
            self.num_experts = list(self.num_experts)
        if isinstance(self.num_experts, list):
            if not self.num_experts or not all(is_int(n) and n >= 1 for n in self.num_experts):
                raise bad("num_experts", "must be an integer >= 1 or a non-empty list of them")
        elif not is_int(self.num_experts) or self.num_experts < 1:
            raise bad("num_experts", "must be an integer >= 1")
        if not is_int(self.rank) or self.rank < 1:
            raise bad("rank", "must be an integer >= 1")
        if not is_num(self.alpha) or self.alpha <= 0:
            raise bad("alpha", "must be a finite number > 0")
        if not is_num(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "must be a number in [0, 1)")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                raise bad("target_modules", "must be a non-empty regex or list of names")
        elif not (isinstance(self.target_modules, list) and self.target_modules
                  and all(isinstance(t, str) and t for t in self.target_modules)):
            raise bad("target_modules", "must be a non-empty regex or list of names")
        if self.router not in ROUTERS:
            raise bad("router", f"must be one of {', '.join(ROUTERS)}")
        if self.composition not in COMPOSITIONS:
            raise bad("composition", f"must be one of {', '.join(COMPOSITIONS)}")
        if not is_int(self.top_k) or self.top_k < 1:
            raise bad("top_k", "must be an integer >= 1")
        if self.router in TOPK_ROUTERS + DYNAMIC_ROUTERS + ("hard_soft",) and self.top_k > self.min_experts:
            which = "num_experts" if is_int(self.num_experts) else "the smallest num_experts"
            raise ValueError(f"LMoEConfig.top_k must be <= {which} ({self.min_experts}), got {self.top_k!r}")
        for name in ("aux_loss_coef", "z_loss_coef", "sparsity_loss_coef", "entropy_loss_coef", "lbc_loss_coef",
                     "rsl_loss_coef"):
            if not is_num(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "must be a finite number >= 0")
        if self.capacity_factor is not None and (not is_num(self.capacity_factor) or self.capacity_factor <= 0):
            raise bad("capacity_factor", "must be a finite number > 0 or None")
        if not is_int(self.shared_experts) or self.shared_experts < 0:
            raise bad("shared_experts", "must be an integer >= 0")
        if not isinstance(self.share_A, bool):
            raise bad("share_A", "must be true or false")
        if not isinstance(self.core_experts, bool):
            raise bad("core_experts", "must be true or false")
        if self.core_experts and self.share_A:
            raise ValueError("LMoEConfig.core_experts already shares A (and B); set share_A=False")
        if self.frozen_sparse_A is not None and (not is_num(self.frozen_sparse_A)
                                                 or not 0 < self.frozen_sparse_A <= 1):
            raise bad("frozen_sparse_A", "must be a density in (0, 1] or None")
        if not is_num(self.balance_bias_rate) or self.balance_bias_rate < 0:
            raise bad("balance_bias_rate", "must be a finite number >= 0")
        if self.balance_bias_rate > 0 and self.router not in TOPK_ROUTERS:
            raise ValueError(f"LMoEConfig.balance_bias_rate needs a top-k router ({', '.join(TOPK_ROUTERS)}), "
                             f"got router={self.router!r}")
        if self.router == "implicit" and self.rank != 1:
            raise ValueError(f"LMoEConfig.router='implicit' (FlyLoRA) routes on each expert's own rank-1 "
                             f"activation and needs rank=1, got rank={self.rank!r}")
        if self.router == "implicit" and (self.share_A or self.core_experts):
            raise ValueError("LMoEConfig.router='implicit' needs each expert's own A (share_A and core_experts off)")
        if isinstance(self.lora_modules, tuple):
            self.lora_modules = list(self.lora_modules)
        if self.lora_modules is not None and not (
                (isinstance(self.lora_modules, str) and self.lora_modules)
                or (isinstance(self.lora_modules, list) and self.lora_modules
                    and all(isinstance(t, str) and t for t in self.lora_modules))):
            raise bad("lora_modules", "must be None, a non-empty regex or a non-empty list of names")
        if isinstance(self.shared_router_modules, tuple):
            self.shared_router_modules = list(self.shared_router_modules)
        if self.shared_router_modules is not None and not (
                isinstance(self.shared_router_modules, list) and len(self.shared_router_modules) >= 2
                and all(isinstance(t, str) and t and "." not in t for t in self.shared_router_modules)):
            raise bad("shared_router_modules", "must be None or a list of at least 2 module names (no dots)")
        if self.shared_router_modules is not None and self.router in ("implicit", "static"):
            raise ValueError(f"LMoEConfig.shared_router_modules needs a learned router, got router={self.router!r}")
        if self.router_init_std is not None and (not is_num(self.router_init_std) or self.router_init_std <= 0):
            raise bad("router_init_std", "must be a finite number > 0 or None")
        if not is_int(self.sparsegen_hidden) or self.sparsegen_hidden < 1:
            raise bad("sparsegen_hidden", "must be an integer >= 1")
        if not isinstance(self.sparsegen_shared, bool):
            raise bad("sparsegen_shared", "must be true or false")
        for name, high in (("top_p", 1), ("entropy_threshold", 1), ("tsallis_q", 2)):
            if not is_num(getattr(self, name)) or not 0 < getattr(self, name) <= high:
                raise bad(name, f"must be a number in (0, {high}]")
        if not is_num(self.lbc_delta) or not 0 <= self.lbc_delta <= 1:
            raise bad("lbc_delta", "must be a number in [0, 1]")
        if not is_num(self.lbc_world_fraction) or not 0 < self.lbc_world_fraction < 1:
            raise bad("lbc_world_fraction", "must be a number in (0, 1)")
        if self.lbc_loss_coef > 0 and self.router in ("static", "implicit"):
            raise ValueError(f"LMoEConfig.lbc_loss_coef needs per-token gates of a learned router, "
                             f"got router={self.router!r}")
        for name, router in (("sparsity_loss_coef", "sparsegen"), ("entropy_loss_coef", "dynmole"),
                             ("rsl_loss_coef", "hard_soft")):
            if getattr(self, name) > 0 and self.router != router:
                raise ValueError(f"LMoEConfig.{name} needs router={router!r}, got router={self.router!r}")

    def lbc_world_experts(self, num_experts: int) -> int:
        """LoRAMoE: how many of a layer's ``num_experts`` routed experts (the first ones) form the world-knowledge
        group: ``floor(lbc_world_fraction * num_experts)`` (LoRAMoE's code: the first N // 2)."""
        return math.floor(self.lbc_world_fraction * num_experts)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def max_experts(self) -> int:
        return max(self.num_experts) if isinstance(self.num_experts, list) else self.num_experts

    @property
    def min_experts(self) -> int:
        return min(self.num_experts) if isinstance(self.num_experts, list) else self.num_experts

    def experts_for_layer(self, layer_index: int | None, num_layers: int) -> int:
        """Routed experts of the adapted layer at depth ``layer_index`` (0-based) of ``num_layers``.

        An int ``num_experts`` applies everywhere. A list of G ints splits the depth into G contiguous
        groups: layer i gets ``num_experts[i * G // num_layers]`` (G = 4: quarters, MoLA's 2/4/6/8;
        G = num_layers: one entry per layer). ``layer_index=None`` (a module outside any ``layers.<i>.``)
        gets the largest entry.
        """
        n = self.num_experts
        if not isinstance(n, list):
            return n
        if layer_index is None:
            return max(n)
        if not 0 <= layer_index < num_layers:
            raise ValueError(f"layer_index must be in [0, {num_layers}), got {layer_index!r}")
        return n[layer_index * len(n) // num_layers]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LMoEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"LMoEConfig: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "LMoEConfig":
        """The config of method preset ``name`` (``lmoe.presets.PRESETS``), with ``overrides`` applied on top."""
        from .presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls.from_dict({**copy.deepcopy(PRESETS[name]), **overrides})
