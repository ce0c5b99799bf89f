"""DDP on CPU (gloo): ``torchrun --nproc_per_node 2 -m lmoe train`` against single-process runs.

What is equal, and why:

* **2 ranks x batch 2  ==  1 process x batch 2 x grad-accum 2, bit for bit.** Trainer's sampler draws one
  permutation (seeded by ``data_seed``) on every rank; with 2 ranks, rank r takes the r-th batch of 2 of
  each group of 2 batches, which are exactly the 2 micro-batches that accumulation sees in one process.
  DDP averages the ranks' gradients, ``(g0 + g1) / 2``; accumulation adds ``g0 / 2 + g1 / 2``; halving is
  exact in binary floating point, so the sums agree bit for bit, whatever the loss (aux loss included).
* **2 ranks x batch 2  ~=  1 process x batch 4 (atol 1e-5).** The LM loss is a mean over each micro-batch's
  answer tokens, so the mean of two half-batch means equals the full-batch mean only when both halves hold
  the same number of loss tokens: every row here has the same prompt and answer lengths (and so no padding
  either). The Switch balance loss is a product of two per-batch means, not a mean, so it is turned off
  (``--aux-loss-coef 0``); with it on, DDP optimises the mean of per-rank balance losses, as gradient
  accumulation does. What is left is float reassociation (a batch of 4 vs 2 in each GEMM), which Adam can
  blow up in coordinates whose gradient is ~0; ``--lr 1e-3`` keeps that well under the tolerance, while the
  weights move by ~1e-3, so the tolerance still separates right from wrong (the test checks a batch-2 run
  is far off).
* **Only rank 0 writes**: one adapter, one log line per step, one summary; checkpoints hold what one process
  writes plus one RNG state per rank (``rng_state_<rank>.pth``, Trainer's design for exact resumption).
"""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmoe import cli
from tests.conftest import TINY_WORDS, build_tiny_tokenizer
from tests.helpers import tiny_llama

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--max-steps", "4", "--seq-len", "32", "--num-experts", "4", "--rank", "2", "--lr", "1e-3",
         "--logging-steps", "1", "--save-steps", "2", "--aux-loss-coef", "0"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    tok = build_tiny_tokenizer(add_bos=True)
    tiny_llama(vocab_size=len(tok)).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    rng = random.Random(0)
    words = [w for w in TINY_WORDS if ":" not in w]
    # Every row: <bos> + 4 prompt tokens, then 3 answer tokens + <eos> (the loss tokens).
    rows = [{"task": "t", "prompt": " ".join(rng.choices(words, k=4)),
             "answer": " " + " ".join(rng.choices(words, k=3))} for _ in range(16)]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _single(workdir, out, *flags):
    argv = ["train", "--model", str(workdir / "model"), "--data", str(workdir / "data.jsonl"), "--output-dir",
            str(out), *FLAGS, *flags]
    assert cli.main(argv) == 0


def _weights(out):
    return load_file(Path(out) / "adapter_model.safetensors")


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _log(out):
    with open(Path(out) / "log.csv") as f:
        return list(csv.DictReader(f))


def test_ddp_two_ranks_match_one_process(workdir, tmp_path):
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lmoe",
           "train", "--model", str(workdir / "model"), "--data", str(workdir / "data.jsonl"), "--output-dir",
           str(ddp), "--batch-size", "2", *FLAGS]
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    _single(workdir, tmp_path / "accum", "--batch-size", "2", "--grad-accum", "2")
    _single(workdir, tmp_path / "b4", "--batch-size", "4")
    _single(workdir, tmp_path / "b2", "--batch-size", "2")  # a wrong answer, to show the tolerance bites

    w_ddp = _weights(ddp)
    w_accum, w_b4, w_b2 = _weights(tmp_path / "accum"), _weights(tmp_path / "b4"), _weights(tmp_path / "b2")
    assert all(torch.equal(w_ddp[k], w_accum[k]) for k in w_ddp)
    assert _max_diff(w_ddp, w_b4) < 1e-5
    assert _max_diff(w_ddp, w_b2) > 1e-3
    for k in (2, 4):  # the checkpoints too
        assert _max_diff(_weights(ddp / f"checkpoint-{k}"), _weights(tmp_path / "b4" / f"checkpoint-{k}")) < 1e-5

    # The log describes the global batch (mean over ranks), like the accumulated run's.
    rows, ref = _log(ddp), _log(tmp_path / "accum")
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    for r, q in zip(rows, ref):
        for col in ("loss", "lm_loss", "z_loss", "grad_norm", "learning_rate", "num_input_tokens_seen"):
            assert float(r[col]) == pytest.approx(float(q[col]), rel=1e-5, abs=1e-6), (r["step"], col)

    # Only rank 0 wrote: exactly one process's files, nothing duplicated or half-written.
    assert sorted(p.name for p in ddp.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "checkpoint-2", "checkpoint-4", "log.csv", "train_summary.json"]
    for k in (2, 4):
        assert sorted(p.name for p in (ddp / f"checkpoint-{k}").iterdir()) == [
            "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "rng_state_0.pth",
            "rng_state_1.pth", "scheduler.pt", "trainer_state.json"]
    assert (ddp / "log.csv").read_text().count("step,") == 1
    summary = json.loads((ddp / "train_summary.json").read_text())
    assert summary["global_step"] == 4 and summary["train_tokens"] == int(ref[-1]["num_input_tokens_seen"])
    assert run.stdout.count("lmoe: adapter saved to") == 1
    assert run.stdout.count("trainable params:") == 1
