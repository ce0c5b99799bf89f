"""The multi-task experiment runner and the tuning sweep, end to end on a tiny model folder.

The real runs use SmolLM2 (``Profile.model``); here every profile points at a tiny Llama saved with the
word-level test tokenizer, trains 2 steps and evaluates 2 test rows per task, which exercises the whole
path: data, training, the evaluation suite (choices, gsm8k generation, mbpp in the sandbox), the JSON
schema of issue 5 and resumption.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch.nn as nn

from lmoe import experiment
from lmoe.experiment import PROFILES, TARGETS, build_method, matched_lora_rank
from tests.helpers import save_tiny_model_dir, tiny_llama

TASKS = {"arc_easy", "boolq", "gsm8k", "mbpp", "tinyshakespeare"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("exp") / "model"
    save_tiny_model_dir(d)
    return str(d)


def test_matched_lora_rank_by_hand():
    # tiny Llama per layer: q,o 64x64; k,v 64->32; gate,up 64->128; down 128->64.
    shapes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    per_rank = sum(i + o for i, o in shapes)  # 1024 per layer
    lmoe = sum(8 * 8 * (i + o) + 8 * i for i, o in shapes)  # 64 * 1024 + 8 * 512 = 69632
    assert (per_rank, lmoe) == (1024, 69632)
    assert matched_lora_rank(tiny_llama(), 8, 8) == 69632 // 1024 == 68


def test_build_method_parameter_counts():
    lora = build_method("lora", tiny_llama(), PROFILES["cpu"])
    lmoe = build_method("lmoe", tiny_llama(), PROFILES["cpu"])
    n_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    n_lmoe = sum(p.numel() for p in lmoe.parameters() if p.requires_grad)
    assert n_lmoe == 2 * 69632 and n_lora == 2 * 68 * 1024  # 2 layers
    assert abs(n_lora / n_lmoe - 1) < 0.01
    top2 = build_method("lmoe-top2", tiny_llama(), PROFILES["cpu"])
    assert top2.lmoe_config.router == "topk" and top2.lmoe_config.top_k == 2
    assert sorted({n.rsplit(".", 1)[-1] for n in top2.lmoe_layers()}) == sorted(TARGETS)
    with pytest.raises(ValueError, match="unknown method 'nope'; known: base, lora, lora-r, lmoe"):
        build_method("nope", tiny_llama(), PROFILES["cpu"])


def test_run_writes_the_issue_schema_and_resumes(tiny_dir, tmp_path, monkeypatch, capsys):
    small = replace(PROFILES["cpu"], seq_len=48, batch_size=2, max_steps=2, eval_limit=2, gen_limit=1,
                    max_new_tokens=4, model=tiny_dir)
    monkeypatch.setitem(PROFILES, "cpu", small)
    out, work = tmp_path / "res", tmp_path / "work"
    argv = ["--methods", "lmoe", "--seeds", "0", "--out", str(out), "--work-dir", str(work)]
    assert experiment.main(argv) == 0
    r = json.loads((out / "lmoe-seed0.json").read_text())
    assert (r["method"], r["seed"], r["profile"]) == ("lmoe", 0, "cpu")
    assert r["trainable_params"] == 2 * 69632 and r["train_tokens"] > 0
    assert set(r["metrics"]) == TASKS
    run_dir = work / "cpu" / "lmoe-seed0"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()  # kept for `lmoe inspect`
    assert not list(run_dir.glob("checkpoint-*")) and "resumed_from_step" not in r
    assert r["collapsed_layers"] == {}  # no logging step in 2 steps, so nothing checked
    score = {"arc_easy": "accuracy", "boolq": "accuracy", "gsm8k": "exact_match", "mbpp": "pass@1"}
    for task, m in r["metrics"].items():
        assert m["test_loss"] > 0 and m["perplexity"] > 1 and m["examples"] == 2
        assert len(m["per_example"]["loss"]) == 2
        if task in score:
            assert 0.0 <= m[score[task]] <= 1.0
    before = (out / "lmoe-seed0.json").stat().st_mtime_ns
    capsys.readouterr()
    assert experiment.main(argv) == 0
    assert f"skip {out / 'lmoe-seed0.json'} (done)" in capsys.readouterr().out
    assert (out / "lmoe-seed0.json").stat().st_mtime_ns == before


class Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["lmoe", "lora"])
def test_a_killed_run_resumes_from_its_checkpoint_with_the_same_result(method, tiny_dir, tmp_path, monkeypatch,
                                                                     capsys):
    small = replace(PROFILES["cpu"], seq_len=48, batch_size=2, max_steps=4, eval_limit=2, gen_limit=1,
                    max_new_tokens=4, model=tiny_dir)
    monkeypatch.setitem(PROFILES, "cpu", small)
    monkeypatch.setattr(experiment, "CHECKPOINT_EVERY", 2)
    argv = ["--methods", method, "--seeds", "0", "--work-dir"]
    assert experiment.main(argv + [str(tmp_path / "w1"), "--out", str(tmp_path / "r1")]) == 0  # uninterrupted
    from lmoe.train import LMoETrainer

    real_step = LMoETrainer.training_step

    def dies_at_step_3(self, *a, **kw):
        if self.state.global_step == 2 and (tmp_path / "w2" / "cpu" / f"{method}-seed0" / "checkpoint-2").is_dir():
            raise Killed
        return real_step(self, *a, **kw)

    monkeypatch.setattr(LMoETrainer, "training_step", dies_at_step_3)
    with pytest.raises(Killed):
        experiment.main(argv + [str(tmp_path / "w2"), "--out", str(tmp_path / "r2")])
    monkeypatch.setattr(LMoETrainer, "training_step", real_step)
    capsys.readouterr()
    assert experiment.main(argv + [str(tmp_path / "w2"), "--out", str(tmp_path / "r2")]) == 0
    assert f"resuming {method}-seed0 from checkpoint-2" in capsys.readouterr().out
    a, b = (json.loads((tmp_path / r / f"{method}-seed0.json").read_text()) for r in ("r1", "r2"))
    assert b["resumed_from_step"] == 2 and a["train_tokens"] == b["train_tokens"]
    for task in TASKS:
        assert b["metrics"][task]["test_loss"] == pytest.approx(a["metrics"][task]["test_loss"], rel=1e-5)
    assert not list((tmp_path / "w2" / "cpu" / f"{method}-seed0").glob("checkpoint-*"))


def test_a_run_killed_in_evaluation_keeps_its_training_and_loss_pass(tiny_dir, tmp_path, monkeypatch):
    small = replace(PROFILES["cpu"], seq_len=48, batch_size=2, max_steps=2, eval_limit=2, gen_limit=1,
                    max_new_tokens=4, model=tiny_dir)
    monkeypatch.setitem(PROFILES, "cpu", small)
    argv = ["--methods", "lmoe", "--seeds", "0", "--out", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w")]
    import lmoe.evaluate

    real_evaluate, calls = lmoe.evaluate.evaluate, []

    def dies_in_generation(*a, **kw):
        calls.append(kw["generate_tasks"])
        if kw["generate_tasks"]:
            raise Killed
        return real_evaluate(*a, **kw)

    monkeypatch.setattr(lmoe.evaluate, "evaluate", dies_in_generation)
    with pytest.raises(Killed):
        experiment.main(argv)
    run_dir = tmp_path / "w" / "cpu" / "lmoe-seed0"
    trained = json.loads((run_dir / "trained.json").read_text())
    assert trained["trainable_params"] == 2 * 69632 and (run_dir / "eval-loss.json").is_file()
    monkeypatch.setattr(lmoe.evaluate, "evaluate", real_evaluate)
    saved = (run_dir / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    assert experiment.main(argv) == 0
    assert (run_dir / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == saved  # not trained again
    r = json.loads((tmp_path / "r" / "lmoe-seed0.json").read_text())
    cached = json.loads((run_dir / "eval-loss.json").read_text())
    assert r["metrics"]["boolq"]["test_loss"] == cached["tasks"]["boolq"]["test_loss"]
    assert r["trainable_params"] == trained["trainable_params"] and "exact_match" in r["metrics"]["gsm8k"]


def test_the_collapse_check_of_the_last_logging_step_goes_in_the_result(tiny_dir, tmp_path, monkeypatch):
    small = replace(PROFILES["cpu"], seq_len=48, batch_size=2, max_steps=10, eval_limit=1, gen_limit=1,
                    max_new_tokens=2, model=tiny_dir)
    monkeypatch.setitem(PROFILES, "cpu", small)
    import lmoe.inspect

    real = lmoe.inspect.CollapseDetector
    monkeypatch.setattr(lmoe.inspect, "CollapseDetector", lambda threshold: real(threshold=1.0))  # flags every layer
    argv = ["--seeds", "0", "--out", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w"), "--methods"]
    assert experiment.main(argv + ["lmoe", "lora"]) == 0
    r = json.loads((tmp_path / "r" / "lmoe-seed0.json").read_text())
    assert len(r["collapsed_layers"]) == 14 and all(0 <= e < 1 for e in r["collapsed_layers"].values())
    assert "collapsed_layers" not in json.loads((tmp_path / "r" / "lora-seed0.json").read_text())


def test_a_work_folder_of_other_settings_is_refused(tiny_dir, tmp_path, monkeypatch):
    small = replace(PROFILES["cpu"], seq_len=48, batch_size=2, max_steps=1, eval_limit=1, gen_limit=1,
                    max_new_tokens=2, model=tiny_dir)
    monkeypatch.setitem(PROFILES, "cpu", small)
    argv = ["--methods", "lmoe", "--seeds", "0", "--out", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w")]
    assert experiment.main(argv) == 0
    (tmp_path / "r" / "lmoe-seed0.json").unlink()
    monkeypatch.setitem(PROFILES, "cpu", replace(small, lr=1e-2))
    with pytest.raises(RuntimeError, match=r"w/cpu/lmoe-seed0 holds a run with other settings \(lr differ\); "
                                           r"remove the folder or pass another --work-dir"):
        experiment.main(argv)


def test_sweep_point_uses_validation_split(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "SWEEP_PROFILE", {**experiment.SWEEP_PROFILE, "seq_len": 48, "batch_size": 2,
                                                      "max_steps": 2, "model": tiny_dir})
    monkeypatch.setattr(experiment, "SWEEP_VAL_PER_TASK", 3)
    out = tmp_path / "sweep"
    assert experiment.main(["--sweep", "lmoe-aux0", "--out", str(out), "--work-dir", str(tmp_path / "w")]) == 0
    r = json.loads((out / "lmoe-aux0.json").read_text())
    assert r["point"] == "lmoe-aux0" and r["settings"]["aux_loss_coef"] == 0.0 and r["settings"]["lr"] == 3e-3
    assert set(r["val_loss"]) == TASKS and r["val_per_task"] == 3 and r["collapsed_layers"] == {}
    assert r["val_loss_mean"] == pytest.approx(sum(r["val_loss"].values()) / 5)


def test_sweep_rejects_unknown_points(capsys):
    with pytest.raises(SystemExit):
        experiment.main(["--sweep", "lmoe-lr9"])
    assert "unknown sweep point(s) lmoe-lr9; known: lora-lr3e-4" in capsys.readouterr().err


def test_sweep_point_names_match_their_settings():
    for name, (method, overrides) in experiment.SWEEP.items():
        assert method in experiment.METHODS and name.startswith(method + "-"), name
        if "-lr" in name:  # an lr point: its name states its rate
            assert float(name.rsplit("-lr", 1)[1]) == overrides["lr"], name
    assert {m for m, _ in experiment.SWEEP.values()} == {"lora", "lora-r", "lmoe", "lmoe-factor", "lmoe-top2"}


def test_targets_are_every_llama_projection():
    names = {n.rsplit(".", 1)[-1] for n, m in tiny_llama().named_modules() if isinstance(m, nn.Linear)}
    assert set(TARGETS) == names - {"lm_head"}


def _load_report_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mr", experiment.Path(__file__).parents[1] / "benchmarks" /
                                                  "multitask_report.py")
    mr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mr)
    return mr


def test_reports_rewrite_marked_blocks(tmp_path):
    mr = _load_report_module()
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    for name, lr, losses in (("lmoe-lr1e-3", 1e-3, [1.0, 2.0]), ("lmoe-lr3e-4", 3e-4, [1.5, 2.5])):
        settings = {**experiment.SWEEP_PROFILE, "lr": lr, "num_experts": 8, "rank": 8, "aux_loss_coef": 0.01}
        (sweep / f"{name}.json").write_text(json.dumps({
            "point": name, "method": "lmoe", "seed": 0, "settings": settings, "val_per_task": 40,
            "val_loss": {"a": losses[0], "b": losses[1]}, "val_loss_mean": sum(losses) / 2, "wall_s": 60.0,
            **({"collapsed_layers": {"x": 0.1, "y": 0.2}} if lr == 1e-3 else {})}))
    table = mr.sweep_report(sweep)
    assert "| lmoe-lr1e-3 | lmoe | 0.001 | 0.01 | 8 × 8 | 1.0000 | 2.0000 | **1.5000** | 2 | 1.0 |" in table
    assert "| lmoe-lr3e-4 | lmoe | 0.0003 | 0.01 | 8 × 8 | 1.5000 | 2.5000 | 2.0000 | – | 1.0 |" in table
    runs = tmp_path / "runs"
    runs.mkdir()
    settings = {"lr": 3e-4, "lr_by_method": {"lora": 1e-3, "lmoe": 3e-3}}
    for method, seed, loss, acc, rows in (("lora", 0, 0.5, 0.75, [0.5, 0.5]), ("lmoe", 0, 0.375, 0.75, [0.25, 0.5]),
                                          ("lora", 1, 0.5, 0.75, [0.5, 0.5]), ("lmoe", 1, 0.5, 0.75, [0.5, 0.5]),
                                          ("lmoe-top2", 0, 0.25, 0.75, [0.25, 0.25])):
        metrics = {"boolq": {"test_loss": loss, "accuracy": acc, "perplexity": 1.6, "examples": 2,
                             "per_example": {"loss": rows, "accuracy": [1, 0]}}}
        (runs / f"{method}-seed{seed}.json").write_text(json.dumps({
            "method": method, "seed": seed, "profile": "cpu", "trainable_params": 10, "train_tokens": 5,
            "metrics": metrics, "total_wall_s": 60.0, "settings": settings,
            **({"collapsed_layers": {"model.layers.1.mlp.down_proj": 0.25}} if method == "lmoe" and seed else {})}))
    doc = tmp_path / "results.md"
    doc.write_text("intro\n<!-- report:start -->\nold\n<!-- report:end -->\nmid\n<!-- sweep:start -->\nold"
                   "\n<!-- sweep:end -->\nend\n")
    assert mr.main(["--dir", str(runs), "--sweep-dir", str(sweep), "--update", str(doc)]) == 0
    text = doc.read_text()
    assert "\nold\n" not in text and text.startswith("intro\n<!-- report:start -->\nProfile `cpu`")
    assert "| lora | 0.750 ± 0.000 |" in text and "| lmoe | 0.438 ± 0.088 |" in text  # main score, test loss
    # answer-blind guessers on the first 2 bundled boolq test rows (labels no, yes)
    assert "| *chance (uniform guess)* | 0.500 |\n| *majority choice* | 0.500 |\n" in text
    assert "lr lora 0.001, lmoe 0.003, lmoe-top2 0.0003 (cosine)" in text  # each method's own recorded rate
    assert "| lora | 2 | 0.001 | 10 | 5 | 1.0 |" in text and "| lmoe | 2 | 0.003 | 10 | 5 | 1.0 |" in text
    assert ("the collapse detector's threshold): lmoe seed 1: 1 (lowest: 1.mlp.down_proj 0.25).\n" in text)
    # lmoe - lora per example: seed 0 [-0.25, 0], seed 1 [0, 0]; averaged over seeds [-0.125, 0]
    assert ("| lmoe − lora | boolq | loss | -0.0625 | [-0.1250, +0.0000] | -0.125 +0.000 | no significant "
            "difference |" in text)
    assert "| lmoe − lora | boolq | accuracy | +0.0000 | [+0.0000, +0.0000] | +0.000 +0.000 |" in text
    # the variant against plain L-MoE on their shared seed 0: [0.25, 0.25] - [0.25, 0.5] = [0, -0.25]
    assert "| lmoe-top2 − lmoe | boolq | loss | -0.1250 | [-0.2500, +0.0000] | -0.125 | no significant" in text
    assert "lora-r" not in text  # a pair is compared only when both methods have runs
    assert "\n6 intervals: at 95 % about 0.3 of them would exclude 0 by chance alone" in text  # 3 pairs x loss, acc
    assert "**1.5000**" in text and text.endswith("<!-- sweep:end -->\nend\n")
    tuned = tmp_path / "tuned.md"
    tuned.write_text("<!-- report:start -->\nkeep\n<!-- report:end -->\n<!-- report-tuned:start -->\nold\n"
                     "<!-- report-tuned:end -->\n")
    assert mr.main(["--dir", str(runs), "--sweep-dir", str(sweep), "--block", "report-tuned",
                    "--update", str(tuned)]) == 0
    text = tuned.read_text()
    assert text.startswith("<!-- report:start -->\nkeep\n<!-- report:end -->\n<!-- report-tuned:start -->\n"
                           "Profile `cpu`") and "\nold\n" not in text
    with pytest.raises(SystemExit, match="markers <!-- nope:start --> / <!-- nope:end --> not found"):
        mr.main(["--dir", str(runs), "--sweep-dir", str(sweep), "--block", "nope", "--update", str(tuned)])
    stale = json.loads((runs / "lora-seed1.json").read_text())
    stale["settings"] = {"lr": 3e-4}  # a run left from before lora's rate changed
    (runs / "lora-seed1.json").write_text(json.dumps(stale))
    with pytest.raises(SystemExit, match=r"^lora: its runs used different learning rates \(seed 0 0.001, seed 1 "
                                         r"0.0003\); remove the stale result files before pooling them$"):
        mr.report(mr.load(runs))


def test_reference_scores_of_the_bundled_test_rows():
    mr = _load_report_module()
    # first 100 rows: boolq 59 " yes" / 41 " no"; arc_easy 4 choices each, gold position 3 in 30 of them
    assert mr.reference_scores({"boolq": 100, "arc_easy": 100, "gsm8k": 25}) == {
        "boolq": {"chance": 0.5, "majority": 0.59}, "arc_easy": {"chance": 0.25, "majority": 0.3}}
    assert mr.reference_scores({"boolq": 10**6}) == {}  # more rows than the file: not the rows a run scored


def test_tuned_profile_lr_per_method_and_its_own_folder(tiny_dir, tmp_path, monkeypatch):
    tuned = PROFILES["cpu-tuned"]
    assert (tuned.lr_for("lmoe"), tuned.lr_for("lora"), tuned.lr_for("base")) == (3e-3, 1e-3, 3e-4)
    assert PROFILES["cpu"].lr_for("lmoe") == 3e-4
    # the sweep's picks (docs/results.md): rank-8 LoRA at 3e-3 like L-MoE; the gpu profile takes the same rates
    assert tuned.lr_for("lora-r") == 3e-3 and PROFILES["gpu"].lr_by_method == tuned.lr_by_method
    small = replace(tuned, seq_len=48, batch_size=2, max_steps=1, eval_limit=1, gen_limit=1, max_new_tokens=2,
                    model=tiny_dir)
    monkeypatch.setitem(PROFILES, "cpu-tuned", small)
    seen = []
    real = experiment.train_method

    def spy(method, seed, profile, *args, **kw):
        seen.append(profile.lr_for(method))
        return real(method, seed, profile, *args, **kw)

    monkeypatch.setattr(experiment, "train_method", spy)
    monkeypatch.chdir(tmp_path)
    assert experiment.main(["--profile", "cpu-tuned", "--methods", "lmoe", "--seeds", "0", "--work-dir", "w"]) == 0
    r = json.loads((tmp_path / "results" / "multitask-cpu-tuned" / "lmoe-seed0.json").read_text())
    assert r["profile"] == "cpu-tuned" and r["settings"]["lr_by_method"]["lmoe"] == 3e-3 and seen == [3e-3]
