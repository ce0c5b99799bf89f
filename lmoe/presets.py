"""Method presets: each member of the mixture-of-LoRA-experts family as a set of ``LMoEConfig`` values.

All of them run on the one layer (``lmoe.layer.LMoELinear``: two GEMMs over stacked experts); a preset
only chooses the router, the expert counts and shapes, the targets and the loss weights. A field a
preset leaves out keeps ``LMoEConfig``'s default (rank 8, alpha 16, the 7 Llama projections, ...).
Sources, defining equations and every deviation from the papers: docs/methods.md.

Use ``LMoEConfig.from_preset(name, **overrides)`` or ``lmoe train --method NAME``.
"""

from __future__ import annotations

MLP_TARGETS = ["gate_proj", "up_proj", "down_proj"]
ATTN_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]

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
    # MixLoRA (Li et al. 2024, arXiv 2404.15159; MoE-PEFT's defaults): 8 experts on the MLP with one router
    # per block (on the MLP input, shared by gate/up/down), top-2 renormalised, router init N(0, 0.02^2),
    # balance loss 1e-3; plain LoRA on the attention projections. r=8, alpha=16, dropout 0.05.
    "mixlora": {"num_experts": 8, "router": "topk", "top_k": 2, "rank": 8, "alpha": 16.0, "dropout": 0.05,
                "lora_modules": ATTN_TARGETS, "shared_router_modules": MLP_TARGETS, "router_init_std": 0.02,
                "aux_loss_coef": 1e-3},
    # SMoRA (Zhao et al. 2025, arXiv 2501.15103): every rank its own expert (64 rank-1 experts), top-8,
    # sigmoid gates, aux-loss-free bias balancing (rate 1e-3), no balance loss; alpha = 2 per rank.
    "smora": {"num_experts": 64, "rank": 1, "alpha": 2.0, "router": "sigmoid_topk", "top_k": 8,
              "balance_bias_rate": 1e-3, "aux_loss_coef": 0.0},
    # FlyLoRA (Zou et al., NeurIPS 2025, arXiv 2510.08396; official flylora.py): 32 rank-1 experts whose A
    # is a frozen sparse random projection (density k/r = 0.25) that also routes: top-8 by |A_i x + b_i|,
    # gate 1; only B trains; bias balancing rate 1e-3; scaling alpha/r = 2.
    "flylora": {"num_experts": 32, "rank": 1, "alpha": 2.0, "router": "implicit", "top_k": 8,
                "frozen_sparse_A": 0.25, "balance_bias_rate": 1e-3, "aux_loss_coef": 0.0},
    # CoMoL (core-space mixture of LoRA): one shared A and B, N = 8 r x r cores soft-merged per token by a
    # dense softmax gate: dW = B (sum_i g_i C_i) A.
    "comol": {"core_experts": True, "num_experts": 8, "router": "softmax"},
    # LD-MoLE (Zhuang et al., arXiv 2509.25684; code eshentw/LD-MoLE): Sparsegen-lin gates sparsemax(l / (1 - lam))
    # with lam per token from one MLP per input width shared across layers (hidden 512, run.sh); 8 experts, r=8,
    # alpha=16, dropout 0.1, all 7 projections (conf/model/llama3.2_*.yaml); balance loss 1.0 and sparsity loss
    # 0.0 (run.sh lb_loss_coef / reg_loss_coef); the sparsity loss's k = 2 (loss/loss.py).
    "ld-mole": {"router": "sparsegen", "num_experts": 8, "rank": 8, "alpha": 16.0, "dropout": 0.1, "top_k": 2,
                "sparsegen_hidden": 512, "sparsegen_shared": True, "aux_loss_coef": 1.0, "sparsity_loss_coef": 0.0},
    # DynMoLE (Li et al., arXiv 2504.00661; code mikecovlee/DynMoLE): all experts when the normalised Tsallis
    # entropy (q=1.1) of softmax(l) exceeds 0.9, else top-p 0.75 with at least 2 experts, gates p (not
    # renormalised); entropy loss 0.01 and balance loss 0.001 (adapters/dynmole/config.py defaults); 6 experts,
    # r=24, alpha=48, dropout 0.05, MLP projections (templates/dynmole.json).
    "dynmole": {"router": "dynmole", "num_experts": 6, "rank": 24, "alpha": 48.0, "dropout": 0.05,
                "target_modules": MLP_TARGETS, "top_k": 2, "top_p": 0.75, "entropy_threshold": 0.9,
                "tsallis_q": 1.1, "aux_loss_coef": 1e-3, "entropy_loss_coef": 1e-2},
    # LoRAMoE (Dou et al. 2023, arXiv 2312.09979; code Ablustrund/LoRAMoE): a dense softmax over 8 LoRA experts on the
    # MLP projections, r=4, alpha=32, dropout 0.05 (run_loramoe.sh), no Switch balance loss, and the localised
    # balancing constraint with the first half of the experts for world knowledge (peft/tuners/lora.py). The
    # released run_loramoe.sh sets blc_weight = blc_alpha = 0 (off); the constraint is the method, so the preset
    # turns it on with OUR values delta = 0.1, weight 1e-2 (the paper's could not be confirmed; docs/methods.md).
    "loramoe": {"router": "softmax", "num_experts": 8, "rank": 4, "alpha": 32.0, "dropout": 0.05,
                "target_modules": MLP_TARGETS, "aux_loss_coef": 0.0, "lbc_loss_coef": 1e-2, "lbc_delta": 0.1,
                "lbc_world_fraction": 0.5},
    # LoRA-Mixer (Li et al., ICLR 2026, arXiv 2507.00029; no code released): routed LoRA experts on the attention
    # projections, hard-soft top-2 routing and the routing specialisation loss; sizes and weights are NOT confirmed
    # (docs/methods.md): 8 experts, r=8, alpha=16, RSL weight 1e-2, no Switch balance loss.
    "lora-mixer": {"router": "hard_soft", "num_experts": 8, "top_k": 2, "rank": 8, "alpha": 16.0,
                   "target_modules": ATTN_TARGETS, "aux_loss_coef": 0.0, "rsl_loss_coef": 1e-2},
}
