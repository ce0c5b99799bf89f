"""Every CLI command through ``main([...])`` on a tiny local model folder and a tiny jsonl file."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from lmoe import LMoEModel, cli
from tests.helpers import save_tiny_model_dir

ROWS = [
    {"task": "qa", "type": "yes_no", "prompt": "Question: the cat sat on the mat\nAnswer:", "answer": " yes",
     "choices": ["no", "yes"], "label": 1},
    {"task": "qa", "type": "yes_no", "prompt": "Question: the dog sat on the cat\nAnswer:", "answer": " no",
     "choices": ["no", "yes"], "label": 0},
    {"task": "lm", "type": "lm", "prompt": "the cat", "answer": " sat on the mat"},
    {"task": "lm", "type": "lm", "prompt": "the dog", "answer": " ran on the mat"},
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model_dir = d / "tiny-model"
    tok = save_tiny_model_dir(model_dir)
    data = d / "mix.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 4))
    return d, str(model_dir), str(data)


def _train(workdir, out, *extra):
    d, model_dir, data = workdir
    return cli.main(["train", "--model", model_dir, "--data", data, "--output-dir", str(out), "--max-steps", "4",
                     "--batch-size", "4", "--seq-len", "32", "--num-experts", "4", "--rank", "2",
                     "--logging-steps", "1", "--lr", "1e-2", *extra])


def test_train_eval_generate(workdir, capsys, tmp_path):
    d, model_dir, data = workdir
    out = tmp_path / "run"
    assert _train(workdir, out, "--save-steps", "2") == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_summary.json", "log.csv"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not list(out.rglob("model.safetensors"))  # checkpoints hold the adapter only
    with open(out / "log.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["loss"]]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["aux_loss"]) >= 0.99 for r in rows)  # N * sum f_i P_i >= 1 for a dense softmax gate
    assert float(rows[-1]["lm_loss"]) < float(rows[0]["lm_loss"])
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["lmoe_config"]["num_experts"] == 4 and summary["lmoe_config"]["rank"] == 2
    assert summary["train_tokens"] > 0
    # Final adapter = the last checkpoint's adapter.
    final, last = load_file(out / "adapter_model.safetensors"), load_file(out / "checkpoint-4/adapter_model.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert any(v.abs().sum() > 0 for k, v in final.items() if k.endswith("lora_B"))

    capsys.readouterr()
    assert cli.main(["eval", "--model", model_dir, "--adapter", str(out), "--data", data, "--limit", "2",
                     "--batch-size", "2", "--seq-len", "32"]) == 0
    table = capsys.readouterr().out
    assert "| qa" in table and "| lm" in table
    res = json.loads((out / "eval.json").read_text())
    assert set(res["tasks"]) == {"qa", "lm"}
    assert res["tasks"]["qa"]["examples"] == 2 and 0.0 <= res["tasks"]["qa"]["accuracy"] <= 1.0
    assert res["tasks"]["lm"]["perplexity"] == pytest.approx(2.718281828 ** res["tasks"]["lm"]["test_loss"], rel=1e-6)

    assert cli.main(["generate", "--model", model_dir, "--adapter", str(out), "--prompt", "the cat",
                     "--max-new-tokens", "3"]) == 0
    text = capsys.readouterr().out.strip()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = LMoEModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok("the cat", return_tensors="pt")
    ids = m.generate(**enc, max_new_tokens=3, do_sample=False)
    assert text == tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert ids.shape[1] > enc["input_ids"].shape[1]


def test_refuses_to_overwrite_finished_run(workdir, capsys, tmp_path):
    out = tmp_path / "run"
    assert _train(workdir, out) == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert _train(workdir, out) == 2
    err = capsys.readouterr().err
    assert f"'{out}' already holds a finished run; pass --resume to continue it or --overwrite-output-dir" in err
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert _train(workdir, out, "--overwrite-output-dir", "--seed", "1") == 0


def test_yaml_config_and_flag_override(workdir, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rank: 3\nnum_experts: 2\ncomposition: factor\nmax_steps: 50\n")
    out = tmp_path / "run"
    assert _train(workdir, out, "--config", str(cfg), "--max-steps", "2", "--num-experts", "2", "--rank", "3") == 0
    d, model_dir, data = workdir
    # YAML gives rank/composition; the explicit --max-steps 2 wins over the YAML's 50.
    assert cli.main(["train", "--config", str(cfg), "--model", model_dir, "--data", data, "--output-dir",
                     str(tmp_path / "run2"), "--max-steps", "1", "--batch-size", "2", "--seq-len", "32"]) == 0
    meta = json.loads((tmp_path / "run2" / "adapter_config.json").read_text())
    assert meta["config"]["rank"] == 3 and meta["config"]["composition"] == "factor"
    summary = json.loads((tmp_path / "run2" / "train_summary.json").read_text())
    assert summary["args"]["max_steps"] == 1


@pytest.mark.parametrize("flags, message", [
    (["--rank", "0"], "LMoEConfig.rank must be an integer >= 1, got 0"),
    (["--composition", "sum"], "LMoEConfig.composition must be one of delta, factor, got 'sum'"),
    (["--router", "topk", "--top-k", "9"], "LMoEConfig.top_k must be <= num_experts (4), got 9"),
    (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
    (["--mix", "random"], "--mix must be proportional or uniform, got 'random'"),
    (["--target-modules", "nope"], "target_modules=['nope'] matched no Linear module. Linear modules: "
                                   "model.layers.0.self_attn.q_proj"),
])
def test_train_bad_input_is_one_line_error(workdir, capsys, tmp_path, flags, message):
    assert _train(workdir, tmp_path / "run", *flags) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lmoe: error: ") and message in last
    assert "Traceback" not in err


def test_yaml_errors(workdir, capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ranks: 3\n")
    assert _train(workdir, tmp_path / "run", "--config", str(cfg)) == 2
    assert f"lmoe: error: {cfg}: unknown option(s) ranks" in capsys.readouterr().err
    assert _train(workdir, tmp_path / "run", "--config", str(tmp_path / "missing.yaml")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_and_generate_bad_adapter(workdir, capsys, tmp_path):
    d, model_dir, data = workdir
    assert cli.main(["eval", "--model", model_dir, "--adapter", str(tmp_path / "nope"), "--data", data]) == 2
    assert f"adapter directory '{tmp_path / 'nope'}' does not exist" in capsys.readouterr().err
    assert cli.main(["generate", "--model", model_dir, "--adapter", str(tmp_path), "--prompt", "x"]) == 2
    assert "is not an lmoe adapter: adapter_config.json is missing" in capsys.readouterr().err


def test_no_arguments_runs_the_demo_defaults(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "cmd_train", lambda args: seen.update(vars(args)) or 0)
    assert cli.main([]) == 0
    assert seen["command"] == "train" and seen["model"] is None and seen["data"] is None


def test_demo_settings_are_filled_in(monkeypatch, tmp_path):
    # Stop right after argument resolution: the demo's defaults must be the short-run ones.
    captured = {}

    def stop(*a, **k):
        raise cli.UsageError("stop")

    monkeypatch.setattr(cli, "_lmoe_config", lambda args: captured.update(vars(args)) or stop())
    assert cli.main(["train", "--output-dir", str(tmp_path / "o")]) == 2
    assert {k: captured[k] for k in cli.DEMO} == cli.DEMO
    assert cli.main(["train", "--model", "m", "--output-dir", str(tmp_path / "o")]) == 2
    assert {k: captured[k] for k in cli.TRAIN_DEFAULTS} == cli.TRAIN_DEFAULTS


def test_loaded_adapter_reproduces_training_model(workdir, tmp_path):
    out = tmp_path / "run"
    assert _train(workdir, out) == 0
    d, model_dir, data = workdir
    from transformers import AutoModelForCausalLM
    m = LMoEModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
    assert m.lmoe_config.num_experts == 4
    assert not any(p.requires_grad for p in m.parameters())
