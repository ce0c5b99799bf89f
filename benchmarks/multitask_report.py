"""Summarise results/multitask/*.json as markdown (the "Does L-MoE beat LoRA?" section of docs/results.md).

    python benchmarks/multitask_report.py [--dir results/multitask] > /tmp/section.md
    python benchmarks/multitask_report.py --update docs/results.md   # rewrite the marked blocks in place
    python benchmarks/multitask_report.py --dir results/multitask-cpu-tuned --block report-tuned \
        --update docs/results.md                                      # another profile, its own block

The tuning sweep (``python -m lmoe.experiment --sweep``, results/sweep/*.json) gets its own table:
validation loss per task of every sweep point (a split carved from train, never test).

Per task: mean ± std over seeds of each method's main score and test loss. For each pair in
``COMPARISONS`` (every L-MoE variant against ``lora``, ``lmoe`` against ``lora-r``, the variants
against ``lmoe``): a paired bootstrap 95% confidence interval of the difference, resampling test
examples (the same resampled examples for both methods and every seed; the difference is averaged
over the seeds both methods have), and the mean difference of each seed on its own (do the seeds agree?).
Needs the per-example arrays the runs store; runs without them get no interval.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

ORDER = ["base", "lora", "lora-r", "lmoe", "lmoe-factor", "lmoe-top2"]
# The pairs the bootstrap table compares, when both have runs: every L-MoE variant against the
# parameter-matched LoRA, L-MoE against the rank-matched LoRA, and the two variants against plain L-MoE.
COMPARISONS = [("lmoe", "lora"), ("lmoe-factor", "lora"), ("lmoe-top2", "lora"), ("lmoe", "lora-r"),
               ("lmoe-factor", "lmoe"), ("lmoe-top2", "lmoe")]
MAIN = {"boolq": "accuracy", "arc_easy": "accuracy", "gsm8k": "exact_match", "mbpp": "pass@1",
        "tinyshakespeare": "test_loss"}


def load(d: Path) -> dict[str, dict[int, dict]]:
    runs: dict[str, dict[int, dict]] = {}
    for p in sorted(d.glob("*.json")):
        r = json.loads(p.read_text())
        runs.setdefault(r["method"], {})[r["seed"]] = r
    return runs


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def paired_bootstrap(a: dict[int, dict], b: dict[int, dict], task: str, key: str, reps: int = 2000,
                     seed: int = 0) -> tuple[float, float, float] | None:
    """Mean of (a - b) per example, averaged over shared seeds, with a 95% percentile interval."""
    seeds = sorted(set(a) & set(b))
    arrays = []
    for s in seeds:
        pa = a[s]["metrics"].get(task, {}).get("per_example", {}).get(key)
        pb = b[s]["metrics"].get(task, {}).get("per_example", {}).get(key)
        if pa is None or pb is None or len(pa) != len(pb):
            return None
        arrays.append([x - y for x, y in zip(pa, pb)])
    if not arrays:
        return None
    n = len(arrays[0])
    diff = [statistics.mean(col) for col in zip(*arrays)]  # per example, averaged over seeds
    rng = random.Random(seed)
    boots = sorted(statistics.mean(diff[rng.randrange(n)] for _ in range(n)) for _ in range(reps))
    return statistics.mean(diff), boots[int(0.025 * reps)], boots[int(0.975 * reps) - 1]


def per_seed_difference(a: dict, b: dict, task: str, key: str) -> float:
    """Mean over test examples of (a - b) for one seed's pair of runs."""
    pa, pb = (r["metrics"][task]["per_example"][key] for r in (a, b))
    return statistics.mean(x - y for x, y in zip(pa, pb))


def reference_scores(counts: dict[str, int]) -> dict[str, dict[str, float]]:
    """Accuracy of two answer-blind guessers on the first ``counts[task]`` bundled test rows of each choice task
    (the rows the runs scored): ``chance`` picks a choice uniformly at random (expected accuracy), ``majority``
    always picks the most frequent gold choice position (boolq: " yes")."""
    from collections import Counter

    from lmoe.experiment import bundled_test_rows

    rows = bundled_test_rows()
    out = {}
    for task, n in counts.items():
        picked = rows.get(task, [])[:n]
        if len(picked) != n or not all("choices" in ex and "label" in ex for ex in picked):
            continue  # not a choice task, or not the bundled rows
        out[task] = {"chance": statistics.mean(1 / len(ex["choices"]) for ex in picked),
                     "majority": Counter(ex["label"] for ex in picked).most_common(1)[0][1] / n}
    return out


def run_lr(run: dict, method: str) -> float:
    st = run.get("settings", {})
    return st.get("lr_by_method", {}).get(method, st.get("lr", float("nan")))


def report(runs: dict[str, dict[int, dict]]) -> str:
    methods = [m for m in ORDER if m in runs] + sorted(set(runs) - set(ORDER))
    tasks = sorted({t for m in runs.values() for r in m.values() for t in r["metrics"]})
    out = []
    any_run = next(iter(next(iter(runs.values())).values()))
    s = any_run.get("settings", {})
    for m in methods:
        rates = {k: run_lr(r, m) for k, r in sorted(runs[m].items())}
        if len(set(rates.values())) > 1:
            raise SystemExit(f"{m}: its runs used different learning rates ("
                             + ", ".join(f"seed {k} {v:g}" for k, v in rates.items())
                             + "); remove the stale result files before pooling them")
    # each method's rate as its own runs recorded it (a method re-run at a new rate must not show the old one)
    lrs = {m: run_lr(next(iter(runs[m].values())), m) for m in methods if m != "base"}
    lr = (", ".join(f"{m} {v:g}" for m, v in lrs.items()) if len(set(lrs.values())) > 1
          else f"{next(iter(lrs.values()), s.get('lr')):g}")
    out.append(f"Profile `{any_run['profile']}`: {s.get('max_steps')} steps × batch {s.get('batch_size')}, "
               f"sequence length {s.get('seq_len')}, lr {lr} (cosine), N={s.get('num_experts')}, "
               f"r={s.get('rank')}; test subsets: first {s.get('eval_limit') or 'all'} rows per task for loss/"
               f"accuracy, first {s.get('gen_limit') or 'all'} for gsm8k / mbpp generation.\n")
    head = ["method", "seeds", "lr", "trainable params", "train tokens", "wall min"]
    out.append("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for m in methods:
        rs = list(runs[m].values())
        lr = "–" if m == "base" else f"{run_lr(rs[0], m):g}"
        out.append(f"| {m} | {len(rs)} | {lr} | {rs[0]['trainable_params']:,} | {rs[0]['train_tokens']:,} | "
                   f"{statistics.mean(r['total_wall_s'] for r in rs) / 60:.1f} |")
    collapse = [(m, k, r["collapsed_layers"]) for m in methods for k, r in sorted(runs[m].items())
                if "collapsed_layers" in r]
    if collapse:
        parts = []
        for m, k, layers in collapse:
            worst = sorted(layers.items(), key=lambda kv: kv[1])[:3]
            parts.append(f"{m} seed {k}: {len(layers)}" + (" (lowest: " + ", ".join(
                f"{name.removeprefix('model.layers.')} {e:.2f}" for name, e in worst) + ")" if worst else ""))
        out.append("\nRouting collapse at the last logging step (adapted layers whose load entropy is below 0.5, "
                   "the collapse detector's threshold): " + "; ".join(parts) + ".")
    out.append("")
    out.append("Main score per task (mean ± std over seeds; accuracy / exact match / pass@1, higher is better; "
               "tinyshakespeare: test loss, lower is better):\n")
    out.append("| method | " + " | ".join(f"{t} ({MAIN.get(t, 'test_loss')})" for t in tasks) + " |")
    out.append("|---|" + "---:|" * len(tasks))
    for m in methods:
        cells = [mean_std([r["metrics"][t][MAIN.get(t, "test_loss")] for r in runs[m].values()
                           if MAIN.get(t, "test_loss") in r["metrics"].get(t, {})]) for t in tasks]
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    refs = reference_scores({t: any_run["metrics"][t]["examples"] for t in tasks
                             if MAIN.get(t) == "accuracy" and "examples" in any_run["metrics"].get(t, {})})
    for key, label in (("chance", "*chance (uniform guess)*"), ("majority", "*majority choice*")) if refs else ():
        out.append(f"| {label} | " + " | ".join(f"{refs[t][key]:.3f}" if t in refs else "–" for t in tasks) + " |")
    out.append("\nTest loss on answer tokens (mean ± std over seeds, lower is better):\n")
    out.append("| method | " + " | ".join(tasks) + " |")
    out.append("|---|" + "---:|" * len(tasks))
    for m in methods:
        cells = [mean_std([r["metrics"][t]["test_loss"] for r in runs[m].values() if t in r["metrics"]])
                 for t in tasks]
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    pairs = [(a, b) for a, b in COMPARISONS if a in runs and b in runs]
    if pairs:
        out.append("\nPaired bootstrap of `a − b` (95% interval over test examples; loss: negative = `a` better; "
                   "scores: positive = `a` better):\n")
        out.append("| a − b | task | metric | difference | 95% interval | per seed | verdict |")
        out.append("|---|---|---|---:|---|---|---|")
        rows = 0
        for a, b in pairs:
            for t in tasks:
                for key in ("loss", MAIN.get(t)):
                    if key in (None, "test_loss"):
                        continue
                    ci = paired_bootstrap(runs[a], runs[b], t, key)
                    if ci is None:
                        continue
                    est, lo, hi = ci
                    better = (hi < 0) if key == "loss" else (lo > 0)
                    worse = (lo > 0) if key == "loss" else (hi < 0)
                    verdict = f"{a} better" if better else f"{b} better" if worse else "no significant difference"
                    seeds = " ".join(f"{per_seed_difference(runs[a][k], runs[b][k], t, key):+.3f}"
                                     for k in sorted(set(runs[a]) & set(runs[b])))
                    out.append(f"| {a} − {b} | {t} | {key} | {est:+.4f} | [{lo:+.4f}, {hi:+.4f}] | {seeds} | "
                               f"{verdict} |")
                    rows += 1
        out.append(f"\n{rows} intervals: at 95 % about {rows / 20:.1f} of them would exclude 0 by chance alone "
                   "if no pair differed, so read a lone verdict with the per-seed column.")
    return "\n".join(out) + "\n"


def sweep_report(d: Path) -> str:
    points = [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))]
    if not points:
        return "No sweep point has finished yet.\n"
    tasks = sorted({t for pt in points for t in pt["val_loss"]})
    s = points[0]["settings"]
    out = [f"Sweep profile: {s['max_steps']} steps × batch {s['batch_size']}, sequence length {s['seq_len']}, "
           f"cosine schedule, seed {points[0]['seed']}; validation: {points[0]['val_per_task']} rows per task "
           f"held out of train (`split_validation`), answer-token loss. Lower is better; **bold** = best of its "
           f"method.\n",
           "| point | method | lr | aux | N × r | " + " | ".join(tasks) + " | mean | collapsed | wall min |",
           "|---|---|---:|---:|---|" + "---:|" * (len(tasks) + 3)]
    best = {}
    for pt in points:
        m = pt["method"]
        if m not in best or pt["val_loss_mean"] < best[m]:
            best[m] = pt["val_loss_mean"]
    order = sorted(points, key=lambda pt: (pt["method"], pt["settings"]["lr"], pt["point"]))
    for pt in order:
        st = pt["settings"]
        mean = f"{pt['val_loss_mean']:.4f}"
        mean = f"**{mean}**" if pt["val_loss_mean"] == best[pt["method"]] else mean
        nr = f"{st['num_experts']} × {st['rank']}" if pt["method"].startswith("lmoe") else "–"
        aux = f"{st['aux_loss_coef']:g}" if pt["method"].startswith("lmoe") else "–"
        out.append(f"| {pt['point']} | {pt['method']} | {st['lr']:g} | {aux} | {nr} | "
                   + " | ".join(f"{pt['val_loss'][t]:.4f}" for t in tasks)
                   + f" | {mean} | {len(pt['collapsed_layers']) if 'collapsed_layers' in pt else '–'} | "
                   f"{pt['wall_s'] / 60:.1f} |")
    out.append("\n(collapsed: adapted layers whose load entropy was below 0.5 at the last logging step, of "
               "7 × 30 = 210 for SmolLM2; – = not recorded.)")
    return "\n".join(out) + "\n"


def _replace_block(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"markers {start} / {end} not found")
    i, j = text.index(start) + len(start), text.index(end)
    return text[:i] + "\n" + body + text[j:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="results/multitask")
    p.add_argument("--sweep-dir", default="results/sweep")
    p.add_argument("--update", default=None, help="a markdown file whose report/sweep blocks are rewritten")
    p.add_argument("--block", default="report", help="name of the marked block the report goes in (--update)")
    a = p.parse_args(argv)
    runs = load(Path(a.dir))
    if not runs:
        print(f"no results in {a.dir}")
        return 1
    text, sweep = report(runs), sweep_report(Path(a.sweep_dir))
    if a.update:
        path = Path(a.update)
        doc = _replace_block(path.read_text(), a.block, text)
        if "<!-- sweep:start -->" in doc:
            doc = _replace_block(doc, "sweep", sweep)
        path.write_text(doc)
    else:
        print(text + "\n" + sweep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
