"""Scale-out on CPU (gloo), against single-process runs:

* DDP through ``torchrun --nproc_per_node 2 -m lmoe train`` and through
  ``accelerate launch --multi_gpu --num_processes 2 -m lmoe train`` (``--cpu`` would start one process);
* ``examples/accelerate_fsdp.yaml``: accepted by Accelerate; on CPU Accelerate runs it as DDP (FSDP only
  on accelerators), which lmoe reports;
* FSDP1 (that config's wrapping) and FSDP2 driven by torch directly: the adapter saved from the full
  state dict and loaded back into the shards; the state-dict key extraction on hand-made dicts.

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
from tests.conftest import TINY_WORDS
from tests.helpers import save_tiny_model_dir, tiny_llama

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--max-steps", "4", "--seq-len", "32", "--num-experts", "4", "--rank", "2", "--lr", "1e-3",
         "--logging-steps", "1", "--save-steps", "2", "--aux-loss-coef", "0"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    tok = save_tiny_model_dir(d / "model")
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


def _env(tmp_path):
    """The launchers' environment: one thread per rank, this checkout importable, no inherited rank
    variables, and no user-wide Accelerate default config (HF_HOME points into tmp_path)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf")}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_FSDP"):
        env.pop(var, None)
    return env


def _train_args(workdir, out):
    return ["train", "--model", str(workdir / "model"), "--data", str(workdir / "data.jsonl"), "--output-dir",
            str(out), "--batch-size", "2", *FLAGS]


@pytest.fixture(scope="module")
def accum(workdir):
    """One process, batch 2 x grad-accum 2: what 2 data-parallel ranks x batch 2 must give bit for bit."""
    out = workdir / "accum"
    _single(workdir, out, "--batch-size", "2", "--grad-accum", "2")
    return out


def _check_like_accum(out, accum):
    """A 2-rank run equals the accumulated single-process run and wrote one process's files."""
    w, ref = _weights(out), _weights(accum)
    assert w.keys() == ref.keys() and all(torch.equal(w[k], ref[k]) for k in w)
    for k in (2, 4):
        ck, ck_ref = _weights(out / f"checkpoint-{k}"), _weights(accum / f"checkpoint-{k}")
        assert all(torch.equal(ck[n], ck_ref[n]) for n in ck)
    rows, ref_rows = _log(out), _log(accum)
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert [r["num_input_tokens_seen"] for r in rows] == [r["num_input_tokens_seen"] for r in ref_rows]  # global
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "checkpoint-2", "checkpoint-4", "log.csv", "train_summary.json"]
    assert sorted(p.name for p in (out / "checkpoint-4").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "rng_state_0.pth",
        "rng_state_1.pth", "scheduler.pt", "trainer_state.json"]


def test_ddp_two_ranks_match_one_process(workdir, accum, tmp_path):
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lmoe",
           *_train_args(workdir, ddp)]
    run = subprocess.run(cmd, env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    _single(workdir, tmp_path / "b4", "--batch-size", "4")
    _single(workdir, tmp_path / "b2", "--batch-size", "2")  # a wrong answer, to show the tolerance bites

    w_ddp = _weights(ddp)
    w_accum, w_b4, w_b2 = _weights(accum), _weights(tmp_path / "b4"), _weights(tmp_path / "b2")
    assert all(torch.equal(w_ddp[k], w_accum[k]) for k in w_ddp)
    assert _max_diff(w_ddp, w_b4) < 1e-5
    assert _max_diff(w_ddp, w_b2) > 1e-3
    for k in (2, 4):  # the checkpoints too
        assert _max_diff(_weights(ddp / f"checkpoint-{k}"), _weights(tmp_path / "b4" / f"checkpoint-{k}")) < 1e-5

    # The log describes the global batch (mean over ranks), like the accumulated run's.
    rows, ref = _log(ddp), _log(accum)
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


# ---------------------------------------------------------------------------------------------------------
# accelerate launch

ACCELERATE = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]  # = `accelerate launch`
FSDP_YAML = REPO / "examples" / "accelerate_fsdp.yaml"


def test_accelerate_launch_two_cpu_processes_match_one_process(workdir, accum, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` starts 2 ranks through torchrun; on a machine
    without GPUs Trainer (use_cpu) sets them up as MULTI_CPU over gloo: plain DDP, as with torchrun."""
    out = tmp_path / "acc"
    cmd = [*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "0", "-m", "lmoe", *_train_args(workdir, out)]
    run = subprocess.run(cmd, env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    _check_like_accum(out, accum)
    assert run.stdout.count("lmoe: adapter saved to") == 1
    assert run.stdout.count("trainable params:") == 1


def test_accelerate_cpu_flag_launches_one_process():
    """Why the command above is not `--cpu --num_processes 2`: `--cpu` takes Accelerate's simple launcher,
    which starts ONE process (several only through `mpirun` with --mpirun_hostfile, i.e. MPI/oneCCL,
    neither of which is here); a MULTI_CPU config file takes the same launcher."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    args = launch_command_parser().parse_args(["--cpu", "--num_processes", "2", "--num_machines", "1",
                                               "--mixed_precision", "no", "--dynamo_backend", "no",
                                               "-m", "lmoe", "train"])
    args, _, _ = _validate_launch_command(args)
    assert args.cpu and not args.multi_gpu and not args.use_fsdp  # -> simple_launcher
    cmd, _ = prepare_simple_launcher_cmd_env(args)
    assert cmd == [sys.executable, "-m", "lmoe", "train"]  # one process, no torchrun
    assert not torch.distributed.is_mpi_available()


def _fsdp_launch_args(yaml_path):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(yaml_path), "--num_processes", "2",
                                               "-m", "lmoe", "train"])
    return _validate_launch_command(args)[0]


def test_fsdp_example_config_is_accepted(tmp_path):
    """examples/accelerate_fsdp.yaml parses, selects FSDP1 with orig params, Llama-layer auto-wrap and a
    full state dict, and Accelerate builds its FSDP plugin from it; lmoe accepts that plugin."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, patch_environment
    from accelerate.utils.launch import prepare_multi_gpu_env
    from lmoe.train import check_fsdp_plugin

    config = load_config_from_file(str(FSDP_YAML))
    assert isinstance(config, ClusterConfig) and config.distributed_type == DistributedType.FSDP
    assert config.fsdp_config["fsdp_use_orig_params"] is True
    assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert {type(m).__name__ for m in tiny_llama().modules()} >= {"LlamaDecoderLayer"}

    args = _fsdp_launch_args(FSDP_YAML)
    assert args.use_fsdp and args.num_processes == 2  # -> torchrun (multi_gpu_launcher) with 2 ranks
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "1"
    assert env["FSDP_USE_ORIG_PARAMS"] == "true" and env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "LlamaDecoderLayer"
    fsdp_env = {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))}
    with patch_environment(**fsdp_env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.use_orig_params and plugin.fsdp_version == 1
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    check_fsdp_plugin(plugin)

    # A sharded state dict is refused (Trainer.save_model would never hand lmoe a state dict to save).
    sharded = tmp_path / "sharded.yaml"
    sharded.write_text(FSDP_YAML.read_text().replace("fsdp_state_dict_type: FULL_STATE_DICT",
                                                     "fsdp_state_dict_type: SHARDED_STATE_DICT"))
    env = prepare_multi_gpu_env(_fsdp_launch_args(sharded))
    with patch_environment(**{k: v for k, v in env.items() if k.startswith("FSDP_")}):
        plugin = FullyShardedDataParallelPlugin()
    with pytest.raises(ValueError, match="FULL_STATE_DICT"):
        check_fsdp_plugin(plugin)


def test_fsdp_config_on_cpu_runs_as_ddp_with_a_warning(workdir, accum, tmp_path):
    """What the FSDP config does on this CPU-only machine: Accelerate 1.15 enables FSDP only when the
    ranks' distributed type is an accelerator's (MULTI_GPU, MULTI_XPU, ...; AcceleratorState), and on CPU
    it is MULTI_CPU, so the FSDP plugin is dropped and the ranks run plain DDP. lmoe says so (rank 0), and
    the run is the 2-rank DDP run: the accumulated single-process adapter, bit for bit."""
    out = tmp_path / "fsdp-config"
    cmd = [*ACCELERATE, "--config_file", str(FSDP_YAML), "--num_processes", "2", "-m", "lmoe",
           *_train_args(workdir, out)]
    run = subprocess.run(cmd, env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("the Accelerate config asks for FSDP, but Accelerate runs DistributedType.MULTI_CPU") == 1
    _check_like_accum(out, accum)


# ---------------------------------------------------------------------------------------------------------
# FSDP itself (torch, without Trainer): the adapter from a full state dict, and loading into shards

FSDP_WORKER = r'''
import functools, json, sys
from pathlib import Path

import torch
import torch.distributed as dist

from lmoe import LMoEConfig, get_lmoe_model
from lmoe.train import load_adapter_distributed, make_adapter_contiguous
from tests.helpers import random_ids, tiny_llama

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, out = dist.get_rank(), Path(sys.argv[1])
CONFIG = LMoEConfig(num_experts=4, rank=2)
STEPS, LR = 3, 0.5


def build():
    torch.manual_seed(0)
    return get_lmoe_model(tiny_llama(), CONFIG)


def wrap(model, kind):
    if kind == "fsdp1":  # what Accelerate does with examples/accelerate_fsdp.yaml (device_id: cpu here)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
        return FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
    from torch.distributed.fsdp import fully_shard

    make_adapter_contiguous(model)  # fully_shard refuses lora_B's permuted storage
    for layer in model.base_model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def full_state_dict(wrapped, kind):
    # As Accelerate.get_state_dict, except offload_to_cpu=False for FSDP1: with the parameters already on
    # the CPU, torch 2.13's offload segfaults (plain Llama too).
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=False, rank0_only=True)):
            return wrapped.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


report = {}
for kind in ("fsdp1", "fsdp2"):
    model = build()
    wrapped = wrap(model, kind)
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        ids = random_ids(2, 8, seed=100 * step + rank)  # rank r's half of the global batch
        wrapped(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    sd = full_state_dict(wrapped, kind)
    if rank == 0:
        live = {k: tuple(v.shape) for k, v in model.adapter_state_dict().items()}  # the shards, for FSDP1
        report[kind] = {"live_is_full": live == model.adapter_shapes(), "state_dict_keys": len(sd)}
        model.save_pretrained(out / kind, state_dict=sd)  # what LMoETrainer._save does
    dist.barrier()
    # Resume: load the saved adapter into a fresh sharded model, gather again, save again.
    model2 = build()
    wrapped2 = wrap(model2, kind)
    load_adapter_distributed(wrapped2, str(out / kind))
    sd2 = full_state_dict(wrapped2, kind)
    if rank == 0:
        model2.save_pretrained(out / f"{kind}-reloaded", state_dict=sd2)
    dist.barrier()
if rank == 0:
    (out / "report.json").write_text(json.dumps(report))
dist.destroy_process_group()
'''


def test_fsdp_on_cpu_saves_and_loads_the_full_adapter(tmp_path):
    """FSDP1 (use_orig_params, Llama-layer auto-wrap: the example config) and FSDP2 (fully_shard) on 2 CPU
    ranks (gloo), driven directly (Accelerate does not enable FSDP on CPU): the adapter saved from the
    full state dict equals the single-process training on the global batch, loads with from_pretrained,
    and loads back into a sharded model (resume) unchanged."""
    from lmoe import LMoEConfig, LMoEModel, get_lmoe_model
    from tests.helpers import random_ids

    script = tmp_path / "fsdp_worker.py"
    script.write_text(FSDP_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path)]
    run = subprocess.run(cmd, env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["fsdp1"]["live_is_full"] is False  # why _save must use the state dict Trainer passes

    # The reference: one process, the mean of the two ranks' losses (FSDP averages gradients like DDP).
    torch.manual_seed(0)
    ref = get_lmoe_model(tiny_llama(), LMoEConfig(num_experts=4, rank=2))
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.5)
    for step in range(3):
        losses = [ref(input_ids=ids, labels=ids).loss for ids in (random_ids(2, 8, seed=100 * step + r)
                                                                  for r in range(2))]
        (sum(losses) / 2).backward()
        opt.step()
        opt.zero_grad()
    want = ref.adapter_state_dict()
    assert max(v.abs().max().item() for k, v in want.items() if k.endswith("lora_B")) > 1e-2  # it trained

    for kind in ("fsdp1", "fsdp2"):
        got = _weights(tmp_path / kind)
        assert got.keys() == want.keys()
        assert _max_diff(got, want) < 1e-6, kind  # 0.0 here: halving a sum of 2 is exact
        assert all(torch.equal(got[k], v) for k, v in _weights(tmp_path / f"{kind}-reloaded").items()), kind
        loaded = LMoEModel.from_pretrained(tiny_llama(), tmp_path / kind)
        assert all(torch.equal(loaded.adapter_state_dict()[k], got[k]) for k in got)


# ---------------------------------------------------------------------------------------------------------
# Saving from a state dict (what Trainer passes under FSDP / DeepSpeed), without any distributed setup

def _adapter_model():
    from lmoe import LMoEConfig, get_lmoe_model
    from tests.helpers import randomize_lora_B

    torch.manual_seed(0)
    model = get_lmoe_model(tiny_llama(), LMoEConfig(num_experts=4, rank=2, target_modules=["q_proj", "down_proj"]))
    randomize_lora_B(model)
    return model


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod."])
def test_adapter_from_full_state_dict(prefix):
    model = _adapter_model()
    want = model.adapter_state_dict()
    # A full state dict of the wrapped model as FSDP1 gives it, with wrapper parts left in some keys, the
    # frozen base, and a base-model module named "router" (an MoE base's own router is not ours).
    wrapped = "layers.0._fsdp_wrapped_module._checkpoint_wrapped_module."
    sd = {prefix + k.replace("layers.0.", wrapped): v.clone() for k, v in model.state_dict().items()}
    sd[prefix + "base_model.model.layers.0.mlp.router.weight"] = torch.ones(4, 64)
    assert sum(k.endswith((".lora_A", ".lora_B", ".router.weight")) for k in sd) == len(want) + 1
    got = model.adapter_state_dict_from(sd)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) and got[k].is_contiguous() for k in want)
    # Keys relative to the base model (no "base_model.") work too.
    assert model.adapter_state_dict_from({k: v for k, v in want.items()}).keys() == want.keys()


def test_adapter_from_state_dict_refuses_missing_or_sharded_tensors():
    model = _adapter_model()
    sd = {f"base_model.{k}": v for k, v in model.adapter_state_dict().items()}
    key = "base_model.model.layers.1.mlp.down_proj.lora_B"
    with pytest.raises(ValueError, match=r"lacks 1 adapter tensor\(s\) \[model.layers.1.mlp.down_proj.lora_B\]"):
        model.adapter_state_dict_from({k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError, match="not full"):
        model.adapter_state_dict_from({**sd, key: sd[key].flatten()[:10]})  # a shard
    with pytest.raises(ValueError, match="lacks 12 adapter"):
        model.adapter_state_dict_from({})  # e.g. a non-zero rank's empty rank0_only dict


def test_trainer_save_uses_the_state_dict_it_is_given(tmp_path):
    """LMoETrainer._save writes the adapter from Trainer's state dict (FSDP FULL_STATE_DICT path), not
    from the live parameters; with none it saves the live ones; a non-saving rank writes nothing."""
    from types import SimpleNamespace

    from lmoe import LMoEModel
    from lmoe.train import LMoETrainer

    model = _adapter_model()
    full = {f"base_model.{k}": v + 1 for k, v in model.adapter_state_dict().items()}  # differs from live
    fake = SimpleNamespace(args=SimpleNamespace(should_save=True, output_dir=str(tmp_path / "default")),
                           accelerator=SimpleNamespace(unwrap_model=lambda m: m), model=model)
    LMoETrainer._save(fake, str(tmp_path / "given"), state_dict=full)
    LMoETrainer._save(fake, str(tmp_path / "live"))
    given, live = _weights(tmp_path / "given"), _weights(tmp_path / "live")
    assert all(torch.equal(given[k], full[f"base_model.{k}"]) for k in given)
    assert all(torch.equal(live[k], v) for k, v in model.adapter_state_dict().items())
    loaded = LMoEModel.from_pretrained(tiny_llama(), tmp_path / "given")
    assert torch.equal(loaded.adapter_state_dict()["model.layers.0.self_attn.q_proj.lora_A"],
                       full["base_model.model.layers.0.self_attn.q_proj.lora_A"])
    fake.args.should_save = False
    LMoETrainer._save(fake, str(tmp_path / "rank1"), state_dict={})
    assert not (tmp_path / "rank1").exists()
