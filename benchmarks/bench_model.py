"""Training step and generation on SmolLM2-135M: lmoe vs PEFT LoRA and PEFT X-LoRA, side by side.

All seven projections of every layer are adapted. Every candidate is built once in this process and
the steps run round-robin (rotating the start), so the printed ratios come from one run on one host
state; we report medians. A step is forward with labels + backward + AdamW step + zero_grad on one
fixed batch of real bundled data (batch x seq tokens, fp32).

* ``lora-64``: PEFT LoRA r = N*r = 64 on the same modules: the floor a dense mixture can reach.
* ``lmoe-delta`` / ``lmoe-factor`` / ``lmoe-top2``: N=8, r=8.
* ``xlora``: PEFT X-LoRA over 8 random PEFT LoRA adapters of rank 8 built here (the closest PEFT
  peer: a learned per-token mixture of LoRAs); ``--xlora-trainable`` makes its experts train too.
Memory: ``activation MB`` is what autograd saves for backward in one forward (deterministic, weights
excluded); ``--rss`` also measures each candidate's peak RSS in a fresh subprocess (build + 3 steps).
Generation (``--generate``): batch 1, a 64-token prompt + 32 greedy new tokens, tokens/s.

    python benchmarks/bench_model.py --repeats 6 --rss --generate --json docs/bench_model.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_times, machine_info, markdown_table, median, saved_tensor_bytes  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N, R = 8, 8


def base_model():
    from lmoe.models import load_model

    model, tok = load_model("smollm2-135m")
    return model, tok


def build(name: str, tmp: str):
    """A trainable model for candidate ``name`` (fresh base each time)."""
    model, _ = base_model()
    torch.manual_seed(0)
    if name == "base":
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    if name.startswith("lmoe"):
        from lmoe import LMoEConfig, get_lmoe_model

        kw = {"lmoe-delta": {}, "lmoe-factor": {"composition": "factor"},
              "lmoe-top2": {"router": "topk", "top_k": 2}}[name]
        return get_lmoe_model(model, LMoEConfig(num_experts=N, rank=R, alpha=2 * R, target_modules=TARGETS, **kw))
    from peft import LoraConfig, get_peft_model

    if name == "lora-64":
        return get_peft_model(model, LoraConfig(r=N * R, lora_alpha=2 * N * R, target_modules=TARGETS,
                                                lora_dropout=0.0, task_type="CAUSAL_LM"))
    if name.startswith("xlora"):
        return build_xlora(model, tmp, trainable=name.endswith("trainable"))
    raise ValueError(name)


def build_xlora(model, tmp: str, trainable: bool):
    """X-LoRA as peft 0.21 needs it: adapters named "0".."N-1", use_cache off (see shared NOTES)."""
    from peft import LoraConfig, XLoraConfig, get_peft_model

    adapters = {}
    for i in range(N):
        d = os.path.join(tmp, f"adapter{i}")
        if not os.path.exists(os.path.join(d, "adapter_config.json")):
            m, _ = base_model()
            torch.manual_seed(100 + i)
            pm = get_peft_model(m, LoraConfig(r=R, lora_alpha=2 * R, target_modules=TARGETS, lora_dropout=0.0,
                                              init_lora_weights=False, task_type="CAUSAL_LM"))
            pm.save_pretrained(d)
            del pm, m
        adapters[str(i)] = d
    model.config.use_cache = False
    cfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=model.config.hidden_size, adapters=adapters,
                      use_trainable_adapters=trainable)
    xm = get_peft_model(model, cfg)
    xm.train()  # construction leaves it in eval mode
    return xm


def batch(tok, bs: int, seq: int):
    from lmoe.dataset import BUNDLED_DATA, load_examples

    rows = [ex for ex in load_examples(BUNDLED_DATA, split="train") if ex["task"] == "boolq"][:bs]
    enc = tok([r["prompt"] + r["answer"] for r in rows], return_tensors="pt", truncation=True, max_length=seq,
              padding="max_length")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}


def make_step(model, inputs):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None

    def step():
        out = model(**inputs)
        if opt is None:  # base: forward only
            return out.loss.item()
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    return step


def rss_child(name: str, bs: int, seq: int, tmp: str) -> None:
    model = build(name, tmp)
    _, tok = base_model()
    step = make_step(model, batch(tok, bs, seq))
    for _ in range(3):
        step()
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's peak.
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mb": hwm / 1024}))


def generation(names: list[str], tmp: str, repeats: int, new_tokens: int = 32) -> dict:
    from lmoe.dataset import BUNDLED_DATA, load_examples

    _, tok = base_model()
    text = " ".join(ex["prompt"] for ex in load_examples(BUNDLED_DATA / "boolq" / "test.jsonl")[:3])
    ids = tok(text, return_tensors="pt")["input_ids"][:, :64]
    models = {n: build(n, tmp).eval() for n in names}
    outs = {}

    def gen(n):
        def run():
            with torch.no_grad():
                outs[n] = models[n].generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                             do_sample=False, use_cache=n != "xlora",
                                             pad_token_id=tok.pad_token_id)
        return run

    times = interleaved_times({n: gen(n) for n in names}, repeats=repeats, warmup=1)
    return {n: {"tok_per_s": new_tokens / median(t["wall"]), "median_s": median(t["wall"])}
            for n, t in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", nargs="+", default=["base", "lora-64", "lmoe-delta", "lmoe-factor", "lmoe-top2",
                                                       "xlora"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--rss", action="store_true", help="peak RSS of each candidate in a fresh subprocess")
    p.add_argument("--generate", action="store_true", help="also the generation benchmark")
    p.add_argument("--gen-repeats", type=int, default=3)
    p.add_argument("--generate-only", action="store_true", help="only the generation benchmark")
    p.add_argument("--json", default=None)
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    tmp = a.tmp or tempfile.mkdtemp(prefix="lmoe-bench-")
    if a.rss_child:
        rss_child(a.rss_child, a.batch_size, a.seq_len, tmp)
        return {}

    info = machine_info()
    print(f"# bench_model  {info}", flush=True)
    if a.generate_only:
        return _report_generation(a, {"machine": info, "args": vars(a)}, tmp)
    _, tok = base_model()
    inputs = batch(tok, a.batch_size, a.seq_len)
    models = {n: build(n, tmp) for n in a.candidates}
    results = {n: {} for n in a.candidates}
    for n, m in models.items():
        params = [q for q in m.parameters() if q.requires_grad]
        results[n]["trainable_params"] = sum(q.numel() for q in params)
        if params:
            m.train()
            exclude = list(m.parameters())
            results[n]["activation_mb"] = saved_tensor_bytes(lambda: m(**inputs).loss, exclude)["bytes"] / 2**20
    steps = {n: make_step(m, inputs) for n, m in models.items()}
    t0 = time.time()
    times = interleaved_times(steps, repeats=a.repeats, warmup=1,
                              progress=lambda r: print(f"  round {r + 1}/{a.repeats} ({time.time() - t0:.0f} s)",
                                                       flush=True))
    for n, t in times.items():
        results[n]["step_s"] = median(t["wall"])
        results[n]["samples_s"] = t["wall"]
    ref = results.get("lora-64", {}).get("step_s")
    if ref:  # paired: the median over rounds of the ratio within each round (robust to drift between rounds)
        for n in a.candidates:
            results[n]["paired_vs_lora64"] = median(x / y for x, y in zip(times[n]["wall"], times["lora-64"]["wall"]))
    del models, steps

    if a.rss:
        for n in a.candidates:
            out = subprocess.run([sys.executable, __file__, "--rss-child", n, "--batch-size", str(a.batch_size),
                                  "--seq-len", str(a.seq_len), "--tmp", tmp], capture_output=True, text=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            results[n]["peak_rss_mb"] = json.loads(line[-1])["peak_rss_mb"] if line else None
            if not line:
                print(out.stderr[-2000:], file=sys.stderr)

    rows = []
    for n in a.candidates:
        r = results[n]
        act = r.get("activation_mb")
        rows.append([n, f"{r['trainable_params']:,}", f"{r['step_s']:.2f}",
                     f"{r['step_s'] / ref:.2f}" if ref else "–",
                     f"{r['paired_vs_lora64']:.2f}" if ref else "–",
                     f"{act:.0f}" if act is not None else "–",
                     f"{act / results['lora-64']['activation_mb']:.2f}" if act is not None and ref else "–",
                     f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "–",
                     f"{r['peak_rss_mb'] / results['lora-64']['peak_rss_mb']:.2f}"
                     if r.get("peak_rss_mb") and results["lora-64"].get("peak_rss_mb") else "–"])
    print(f"\nTraining step, SmolLM2-135M fp32, batch {a.batch_size}x{a.seq_len}, medians of {a.repeats} "
          f"interleaved rounds")
    print(markdown_table(["candidate", "trainable", "s/step", "vs lora-64", "paired vs lora-64", "activation MB",
                          "vs lora-64",
                          "peak RSS MB", "vs lora-64"], rows))
    out = {"machine": info, "args": vars(a), "train": results}
    if a.generate:
        return _report_generation(a, out, tmp)
    return _dump(a, out)


def _report_generation(a, out: dict, tmp: str) -> dict:
    names = [n for n in ("base", "lora-64", "lmoe-delta", "lmoe-top2", "xlora") if n in a.candidates or n == "base"]
    gen = generation(names, tmp, a.gen_repeats)
    out["generate"] = gen
    print("\nGeneration, batch 1, 64-token prompt + 32 greedy tokens (X-LoRA: no KV cache, as PEFT forces)")
    print(markdown_table(["candidate", "tokens/s", "vs base"],
                         [[n, f"{g['tok_per_s']:.2f}", f"{g['tok_per_s'] / gen['base']['tok_per_s']:.2f}"]
                          for n, g in gen.items()]))
    return _dump(a, out)


def _dump(a, out: dict) -> dict:
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
