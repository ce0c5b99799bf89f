"""Every method preset, for real: train on SmolLM2-135M through the CLI, save, reload, evaluate.

    python benchmarks/presets_smoke.py [--presets mixlora smora] [--steps 10] [--update docs/methods.md]

For each preset (``lmoe.presets.PRESETS``): ``lmoe train --method NAME`` on the bundled mix for a few
steps (batch 4 x 128 tokens, lr 1e-3, the same seed and data order for all), then, in this process,
``LMoEModel.from_pretrained`` on a fresh base and the answer-token loss per task on the first 16 test rows
of each task (and, as one number, on a validation split of 8 rows per task carved from train), against the
untrained base. One JSON per preset in ``results/presets/`` (finished presets are skipped; one without
test losses gets them from its saved adapter); the table it prints goes to docs/methods.md.

This is a smoke-size check that each method trains, saves and reloads on the real model, with its cost
per step — not a comparison of the methods' quality (10 steps say little about that; issue 5's
experiment does).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

VAL_PER_TASK, TEST_ROWS, SEQ_LEN, BATCH = 8, 16, 128, 4


def _by_task(rows):
    out = {}
    for ex in rows:
        out.setdefault(ex["task"], []).append(ex)
    return out


def val_loss(model, tok, rows) -> dict[str, float]:
    from lmoe.evaluate import evaluate

    res = evaluate(model, tok, rows, seq_len=SEQ_LEN, batch_size=8, progress=False, generate_tasks=False)
    return {t: m["test_loss"] for t, m in res["tasks"].items()}


def main(argv=None) -> int:
    from lmoe.dataset import BUNDLED_DATA, load_examples, split_validation
    from lmoe.models import load_model
    from lmoe.presets import PRESETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="results/presets")
    p.add_argument("--work-dir", default="/tmp/lmoe-presets")
    p.add_argument("--update", default=None, help="rewrite the <!-- presets:start/end --> block of this file")
    a = p.parse_args(argv)
    out, work = Path(a.out), Path(a.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    _, val = split_validation(load_examples([BUNDLED_DATA], split="train"), VAL_PER_TASK, seed=0)
    base_path = out / "_base.json"
    if not base_path.exists():
        model, tok = load_model("smollm2-135m")
        base_path.write_text(json.dumps({"val_loss": val_loss(model, tok, val)}, indent=2) + "\n")
    base = json.loads(base_path.read_text())["val_loss"]
    test = [ex for t, rows in _by_task(load_examples([BUNDLED_DATA], split="test")).items() for ex in rows[:TEST_ROWS]]
    base_res = json.loads(base_path.read_text())
    if "test_loss" not in base_res:
        model, tok = load_model("smollm2-135m")
        base_res["test_loss"] = val_loss(model, tok, test)
        base_path.write_text(json.dumps(base_res, indent=2) + "\n")
    for name in a.presets:
        path = out / f"{name}.json"
        if path.exists():
            done = json.loads(path.read_text())
            if "test_loss" not in done and (work / name / "adapter_model.safetensors").is_file():
                from lmoe import LMoEModel

                model, tok = load_model("smollm2-135m")
                done["test_loss"] = val_loss(LMoEModel.from_pretrained(model, work / name), tok, test)
                path.write_text(json.dumps(done, indent=2) + "\n")
            print(f"skip {path} (done)")
            continue
        run = work / name
        cmd = [sys.executable, "-m", "lmoe", "train", "--model", "smollm2-135m", "--method", name,
               "--max-steps", str(a.steps), "--batch-size", str(BATCH), "--seq-len", str(SEQ_LEN), "--lr", "1e-3",
               "--logging-steps", "1", "--eval-limit", "0", "--output-dir", str(run), "--overwrite-output-dir"]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name}: lmoe train failed ({proc.returncode})")
        wall = time.time() - t0
        summary = json.loads((run / "train_summary.json").read_text())
        with open(run / "log.csv") as f:
            losses = [float(r["lm_loss"] or r["loss"]) for r in csv.DictReader(f) if r.get("loss")]
        from lmoe import LMoEModel

        model, tok = load_model("smollm2-135m")
        loaded = LMoEModel.from_pretrained(model, run)  # strict: every key and shape, the config in metadata
        vl = val_loss(loaded, tok, val)
        tl = val_loss(loaded, tok, test)
        result = {"preset": name, "steps": a.steps, "batch": BATCH, "seq_len": SEQ_LEN, "lr": 1e-3,
                  "config": summary["lmoe_config"], "trainable_params": summary["trainable_params"],
                  "train_s_per_step": summary["train_wall_s"] / a.steps, "cli_wall_s": round(wall, 1),
                  "first_lm_loss": losses[0], "last_lm_loss": losses[-1], "val_loss": vl, "test_loss": tl,
                  "val_loss_mean": sum(vl.values()) / len(vl), "base_val_loss_mean": sum(base.values()) / len(base),
                  "adapter_mb": round((run / "adapter_model.safetensors").stat().st_size / 2**20, 1)}
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: result[k] for k in ("preset", "train_s_per_step", "val_loss_mean")}), flush=True)
    print(table(out))
    if a.update:
        doc = Path(a.update).read_text()
        start, end = "<!-- presets:start -->", "<!-- presets:end -->"
        i, j = doc.index(start) + len(start), doc.index(end)
        Path(a.update).write_text(doc[:i] + "\n" + table(out) + "\n" + doc[j:])
    return 0


def table(out: Path) -> str:
    from lmoe.presets import PRESETS

    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if not p.name.startswith("_")]
    rows.sort(key=lambda r: list(PRESETS).index(r["preset"]) if r["preset"] in PRESETS else 99)
    base = json.loads((out / "_base.json").read_text())
    tasks = sorted(base.get("test_loss", {}))
    lines = ["| preset | trainable params | adapter MB | s / step | LM loss step 1 → 10 | "
             + " | ".join(f"test {t}" for t in tasks) + " | val mean |",
             "|---|---:|---:|---:|---|" + "---:|" * (len(tasks) + 1)]
    if tasks:
        lines.append("| base (untrained) | 0 | – | – | – | " + " | ".join(f"{base['test_loss'][t]:.3f}" for t in tasks)
                     + f" | {sum(base['val_loss'].values()) / len(base['val_loss']):.3f} |")
    for r in rows:
        tl = r.get("test_loss", {})
        lines.append(f"| `{r['preset']}` | {r['trainable_params']:,} | {r['adapter_mb']} | {r['train_s_per_step']:.2f} | "
                     f"{r['first_lm_loss']:.3f} → {r['last_lm_loss']:.3f} | "
                     + " | ".join(f"{tl[t]:.3f}" if t in tl else "–" for t in tasks) + f" | {r['val_loss_mean']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
