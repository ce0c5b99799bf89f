"""Never lose work: bit-exact resume, atomic adapter saves under SIGKILL, a clean stop on a non-finite loss.

Everything runs ``lmoe train`` through ``cli.main`` on the tiny 2-layer Llama, one CPU thread.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmoe import LMoEConfig, LMoEModel, cli
from lmoe.train import LMoETrainer
from tests.conftest import build_tiny_tokenizer
from tests.helpers import save_tiny_model_dir, TwoLinears, tiny_llama

ROWS = [
    {"task": "qa", "prompt": "Question: the cat sat on the mat\nAnswer:", "answer": " yes"},
    {"task": "qa", "prompt": "Question: the dog sat on the cat\nAnswer:", "answer": " no"},
    {"task": "lm", "prompt": "the cat", "answer": " sat on the mat"},
    {"task": "lm", "prompt": "the dog", "answer": " ran on the mat"},
]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    tok = save_tiny_model_dir(d / "model")
    (d / "mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS * 4))  # 16 rows: 4 steps an epoch
    return d


def _train(workdir, out, *extra):
    # 6 steps of batch 4 cross an epoch boundary (4 steps per epoch); dropout > 0 makes the run depend on the RNG.
    return cli.main(["train", "--model", str(workdir / "model"), "--data", str(workdir / "mix.jsonl"),
                     "--output-dir", str(out), "--max-steps", "6", "--batch-size", "4", "--seq-len", "32",
                     "--num-experts", "4", "--rank", "2", "--dropout", "0.1", "--lr", "1e-2",
                     "--logging-steps", "1", "--save-steps", "2", *extra])


def _tensors(path):
    return load_file(Path(path) / "adapter_model.safetensors")


def _assert_equal_adapters(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


class Crash(Exception):
    """Stands in for the process dying."""


def test_resume_after_crash_is_bit_exact(workdir, tmp_path, monkeypatch, capsys):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert _train(workdir, straight) == 0

    # Same run, dying while it writes checkpoint-4: the adapter is on disk, optimizer/RNG/trainer_state are not.
    real = LMoETrainer._save_optimizer_and_scheduler

    def dying(self, output_dir):
        if self.state.global_step == 4:
            raise Crash()
        real(self, output_dir)

    monkeypatch.setattr(LMoETrainer, "_save_optimizer_and_scheduler", dying)
    with pytest.raises(Crash):
        _train(workdir, crashed)
    monkeypatch.undo()
    assert sorted(p.name for p in crashed.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (crashed / "trainer_state.json").exists() and not (crashed / "adapter_config.json").exists()
    assert not (crashed / "checkpoint-4" / "trainer_state.json").exists()  # incomplete
    assert (crashed / "log.csv").read_text().count("\n") == 1 + 4  # header + steps 1..4

    capsys.readouterr()
    assert _train(workdir, crashed) == 2  # a plain re-run does not silently start over
    assert "holds checkpoints of an unfinished run; pass --resume" in capsys.readouterr().err

    assert _train(workdir, crashed, "--resume") == 0
    err = capsys.readouterr().err
    assert f"skipping incomplete checkpoint {crashed / 'checkpoint-4'}" in err
    summary = json.loads((crashed / "train_summary.json").read_text())
    assert summary["resumed_from"] == str(crashed / "checkpoint-2") and summary["global_step"] == 6

    # Adapter, every checkpoint and the whole log equal the uninterrupted run's, bit for bit.
    _assert_equal_adapters(straight, crashed)
    for k in (2, 4, 6):
        _assert_equal_adapters(straight / f"checkpoint-{k}", crashed / f"checkpoint-{k}")
    assert (crashed / "log.csv").read_text() == (straight / "log.csv").read_text()

    # Resuming the finished run is a no-op.
    before = (straight / "adapter_model.safetensors").read_bytes()
    assert _train(workdir, straight, "--resume") == 0
    assert "already holds a run finished at step 6 (--max-steps 6); nothing to resume" in capsys.readouterr().err
    assert (straight / "adapter_model.safetensors").read_bytes() == before


def test_resume_with_another_config_is_refused(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(workdir, out, "--max-steps", "2") == 0
    (out / "train_summary.json").unlink()  # as if killed before the end
    capsys.readouterr()
    assert _train(workdir, out, "--resume", "--alpha", "32") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"lmoe: error: {out / 'checkpoint-2' / 'adapter_model.safetensors'} was saved with another "
                   f"LMoEConfig: alpha=16.0 (model: 32.0); in an adapter folder this means adapter_config.json "
                   f"and the weights come from different saves")


def test_checkpoints_hold_no_arbitrary_pickles(workdir, tmp_path):
    out = tmp_path / "run"
    assert _train(workdir, out, "--max-steps", "2") == 0
    names = sorted(p.name for p in (out / "checkpoint-2").iterdir())
    # No training_args.bin (a full pickle of TrainingArguments); Trainer reads the .pt/.pth with weights_only=True.
    assert names == ["adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "rng_state.pth",
                     "scheduler.pt", "trainer_state.json"]
    from transformers.trainer_pt_utils import safe_globals  # numpy's array types, as Trainer allows them

    with safe_globals():
        for name in ("optimizer.pt", "rng_state.pth", "scheduler.pt"):
            torch.load(out / "checkpoint-2" / name, weights_only=True)  # the restricted unpickler Trainer uses


# ---------------------------------------------------------------------------------------------------
# non-finite loss


def test_injected_nan_stops_at_its_step_and_keeps_earlier_checkpoints(workdir, tmp_path, monkeypatch, capsys):
    real_forward = LMoEModel.forward
    calls = []

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) == 3:  # the loss of step 3 (one micro-batch per step)
                out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(LMoEModel, "forward", forward)
    out = tmp_path / "run"
    # Logging every 5 steps: the NaN at step 3 is caught before the step-4 checkpoint, and named as step 3.
    assert _train(workdir, out, "--logging-steps", "5") == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"lmoe: error: training loss is nan at step 3; stopped before saving anything from it "
                    f"(earlier checkpoints in {out} are kept)")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "adapter_model.safetensors").exists() and not (out / "train_summary.json").exists()
    monkeypatch.undo()
    m = LMoEModel.from_pretrained(tiny_llama(vocab_size=len(build_tiny_tokenizer())), out / "checkpoint-2")
    assert all(torch.isfinite(p).all() for p in m.adapter_state_dict().values())
    assert any(v.abs().sum() > 0 for k, v in m.adapter_state_dict().items() if k.endswith("lora_B"))


def test_huge_learning_rate_stops_with_the_step(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    code = _train(workdir, out, "--lr", "1e30", "--lr-scheduler", "constant", "--warmup-ratio", "0",
                  "--save-steps", "1", "--logging-steps", "5", "--dropout", "0")
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # Step 1 is finite; its update of ~1e30 per weight overflows the forward of step 2.
    assert err.strip().splitlines()[-1].startswith("lmoe: error: training loss is nan at step 2; ")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    weights = _tensors(out / "checkpoint-1")
    assert all(torch.isfinite(v).all() for v in weights.values())


# ---------------------------------------------------------------------------------------------------
# atomic saves

CHILD = textwrap.dedent("""
    import sys, torch, torch.nn as nn
    from lmoe import LMoEConfig, get_lmoe_model
    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)])
    model = get_lmoe_model(base, LMoEConfig(num_experts=8, rank=32, target_modules=r"\\d+"))  # ~8 MB a save
    out, marker = sys.argv[1], sys.argv[2]
    i = 0
    while True:
        i += 1
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.fill_(i)  # every adapter tensor of save i holds the value i
        model.save_pretrained(out)
        if i == 1:
            open(marker, "w").close()
""")


def _big_base():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])


@pytest.mark.parametrize("trial", range(3))
def test_save_killed_at_a_random_moment_leaves_a_complete_adapter(tmp_path, trial):
    out, marker = tmp_path / "adapter", tmp_path / "first-save-done"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(out), str(marker)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()
            assert time.time() < deadline, "the child never finished a first save"
            time.sleep(0.01)
        time.sleep(random.Random(trial).uniform(0.0, 0.5))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stderr.close()
    m = LMoEModel.from_pretrained(_big_base(), out)
    values = {float(v.flatten()[0]) for v in m.adapter_state_dict().values()}
    assert len(values) == 1 and values.pop() >= 1  # one complete save, not a mix
    assert all(torch.all(v == v.flatten()[0]) for v in m.adapter_state_dict().values())
    leftovers = {p.name for p in out.iterdir()} - {"adapter_config.json", "adapter_model.safetensors"}
    # A kill mid-write leaves at most hidden temp files (ours: .adapter_*.tmp; safetensors' own: .tmp*).
    assert all(n.startswith((".adapter_", ".tmp")) for n in leftovers), leftovers


def _save_dying_between_renames(model, out, monkeypatch):
    """Save, with the process 'dying' right after the weights file is renamed into place."""
    import lmoe.model as lm

    real = os.replace

    def replace(src, dst):
        if str(dst).endswith("adapter_config.json"):
            raise Crash()
        real(src, dst)

    monkeypatch.setattr(lm.os, "replace", replace)
    with pytest.raises(Crash):
        model.save_pretrained(out)
    monkeypatch.setattr(lm.os, "replace", real)


def test_kill_between_the_renames_same_config_loads_the_new_adapter(tmp_path, monkeypatch):
    model = LMoEModel(TwoLinears(), LMoEConfig(num_experts=2, rank=2, target_modules=["up", "down"]))
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.fill_(7.0)
    _save_dying_between_renames(model, tmp_path, monkeypatch)
    loaded = LMoEModel.from_pretrained(TwoLinears(), tmp_path)
    assert all(torch.all(v == 7.0) for v in loaded.adapter_state_dict().values())


def test_kill_between_the_renames_changed_config_is_refused(tmp_path, monkeypatch):
    LMoEModel(TwoLinears(), LMoEConfig(num_experts=2, rank=2, alpha=16, target_modules=["up", "down"])
              ).save_pretrained(tmp_path)
    newer = LMoEModel(TwoLinears(), LMoEConfig(num_experts=2, rank=2, alpha=4, target_modules=["up", "down"]))
    _save_dying_between_renames(newer, tmp_path, monkeypatch)
    base = TwoLinears()
    with pytest.raises(ValueError, match=r"was saved with another LMoEConfig: alpha=4 \(model: 16\)"):
        LMoEModel.from_pretrained(base, tmp_path)
    assert isinstance(base.up, torch.nn.Linear)  # the failed load left the base model as it was
