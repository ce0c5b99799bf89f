"""LMoEConfig: the one configuration object of an L-MoE adapter.

It is passed down whole (to the injector, the layers, the losses and the save file) and validated
in ``__post_init__``: every bad value raises ``ValueError`` naming the field and the value, so a
typo never turns into a silent default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROUTERS = ("softmax", "topk")
COMPOSITIONS = ("delta", "factor")


@dataclass
class LMoEConfig:
    num_experts: int = field(default=8, metadata={"help": "N, LoRA experts per adapted Linear."})
    rank: int = field(default=8, metadata={"help": "r, rank of each expert."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the experts' input, in [0, 1)."})
    target_modules: str | list[str] = field(
        default_factory=lambda: list(LLAMA_TARGETS),
        metadata={"help": "PEFT rules: a string is a regex full-matched against the module path; a list "
                          "matches exact paths or path suffixes ('.q_proj')."},
    )
    router: str = field(default="softmax", metadata={"help": "'softmax' (dense) or 'topk' (sparse gate)."})
    top_k: int = field(default=2, metadata={"help": "Experts kept per token when router='topk'."})
    composition: str = field(
        default="delta",
        metadata={"help": "'delta': dW = sum_i g_i B_i A_i; 'factor': dW = (sum_i g_i B_i)(sum_i g_i A_i)."},
    )
    aux_loss_coef: float = field(default=1e-2, metadata={"help": "Weight of the load-balancing loss."})
    z_loss_coef: float = field(default=0.0, metadata={"help": "Weight of the router z-loss."})

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"LMoEConfig.{name} {why}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.num_experts) or self.num_experts < 1:
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
        if self.router == "topk" and self.top_k > self.num_experts:
            raise ValueError(f"LMoEConfig.top_k must be <= num_experts ({self.num_experts}), got {self.top_k!r}")
        for name in ("aux_loss_coef", "z_loss_coef"):
            if not is_num(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "must be a finite number >= 0")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LMoEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"LMoEConfig: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)
