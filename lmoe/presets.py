"""Method presets: each member of the mixture-of-LoRA-experts family as a set of ``LMoEConfig`` values.

All of them run on the one layer (``lmoe.layer.LMoELinear``: two GEMMs over stacked experts); a preset
only chooses the router, the expert counts and shapes, the targets and the loss weights. A field a
preset leaves out keeps ``LMoEConfig``'s default (rank 8, alpha 16, the 7 Llama projections, ...).
Sources, defining equations and every deviation from the papers: docs/methods.md.

Use ``LMoEConfig.from_preset(name, **overrides)`` or ``lmoe train --method NAME``.
"""

from __future__ import annotations

MLP_TARGETS = ["gate_proj", "up_proj", "down_proj"]

PRESETS: dict[str, dict] = {
    # L-MoE (arXiv 2510.17898) as lmoe defines it: dense softmax gate, delta composition.
    "lmoe": {},
    # The paper's literal "average of the experts' parameters": dW = (sum g_i B_i)(sum g_i A_i).
    "lmoe-factor": {"composition": "factor"},
    # MoLA (Gao et al. 2024, arXiv 2402.08562), the official scripts' MoLA-inverted-triangle: 2/4/6/8
    # experts by depth quarters, top-2, r=8, alpha=16, dropout 0.05, all 7 projections, balance loss off.
    "mola": {"num_experts": [2, 4, 6, 8], "router": "topk", "top_k": 2, "rank": 8, "alpha": 16.0,
             "dropout": 0.05, "aux_loss_coef": 0.0},
    # HydraLoRA (Tian et al., NeurIPS 2024): one shared A, N B heads, dense softmax router; the official
    # fine-tuning.sh: r=4, alpha=32, 4 B heads, dropout 0.05, MLP projections, no balance loss.
    "hydralora": {"share_A": True, "num_experts": 4, "router": "softmax", "rank": 4, "alpha": 32.0,
                  "dropout": 0.05, "target_modules": MLP_TARGETS, "aux_loss_coef": 0.0},
    # DeepSeekMoE-style (Dai et al. 2024): 1 always-on shared expert + 8 routed fine-grained experts
    # (half the default rank, same alpha / r), top-2.
    "shared-expert": {"shared_experts": 1, "num_experts": 8, "rank": 4, "alpha": 8.0, "router": "topk",
                      "top_k": 2},
    # LLaVA-MoLE (Chen et al. 2024, arXiv 2401.16160): top-1 sparse experts on the MLP projections only,
    # gate = the chosen expert's softmax probability, no capacity limit.
    "llava-mole": {"num_experts": 3, "router": "switch", "capacity_factor": None, "target_modules": MLP_TARGETS},
    # Switch Transformer routing (Fedus et al. 2021): top-1, capacity factor 1.25, balance loss 1e-2.
    "switch": {"router": "switch", "capacity_factor": 1.25},
    # Noisily gated top-k (Shazeer et al. 2017): top-2 of W_g x + softplus(W_noise x) * eps in training.
    "noisy-topk": {"router": "noisy_topk", "top_k": 2},
}
