"""Training with transformers' Trainer: the loop mechanics (accumulation, schedules, mixed precision,
checkpoints, DDP through Accelerate/torchrun) are Trainer's; what is ours is small:

* ``LMoETrainer.compute_loss`` uses the joint loss the model returns and keeps the routing terms
  (detached, on device: no host sync per step) for logging.
* ``LMoETrainer.log`` adds the mean ``lm_loss``, ``aux_loss``, ``z_loss`` (and ``sparsity_loss`` /
  ``entropy_loss`` / ``rsl_loss`` for the sparsegen / dynmole / hard_soft routers, ``lbc_loss`` for LoRAMoE's
  localised balancing constraint) since the last log and the
  mean normalised router entropy of the last step, and warns when routing collapses.
* Checkpoints hold the adapter only (``LMoEModel.save_pretrained``), and resuming loads it back; the
  optimizer, scheduler, RNG and data position are Trainer's (``optimizer.pt`` etc., read back with
  ``torch.load(weights_only=True)``, never an arbitrary unpickle). Under DDP only rank 0 writes.
* **Non-finite loss stops the run** before anything else is saved: every micro-batch's loss and every
  step's gradient norm update an on-device "first bad step" (no host sync per step); the flag is read
  (and, under DDP, min-reduced across ranks) only where Trainer logs or saves a checkpoint, so a NaN
  is reported with the step it happened at and never reaches a checkpoint. (Trainer's own
  ``logging_nan_inf_filter`` would hide it from the log and syncs every step; ``lmoe train`` turns it off.)
* **FSDP** (through an Accelerate config, see ``examples/accelerate_fsdp.yaml``): Trainer gathers a
  FULL_STATE_DICT on rank 0 and hands it to ``_save``, which takes the adapter from it (the live
  parameters are shards); a SHARDED_STATE_DICT config is refused, since Trainer would then never call
  ``_save`` and the run would end without an adapter. Under FSDP2 (``fully_shard``, which refuses
  non-contiguous parameters) ``lora_B`` is made contiguous before wrapping. Resuming loads the adapter
  into the sharded model (FSDP1: inside ``summon_full_params``; FSDP2: each rank takes its shard).
* ``CSVLogger`` appends every log line to ``<output_dir>/log.csv``; on a resumed run it first drops the
  rows after the checkpoint's step, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

logger = logging.getLogger("lmoe")

LOG_COLUMNS = ("step", "epoch", "loss", "lm_loss", "aux_loss", "z_loss", "router_entropy", "learning_rate",
               "grad_norm", "eval_loss", "num_input_tokens_seen", "sparsity_loss", "entropy_loss", "rsl_loss",
               "lbc_loss")


# Codes of the non-finite events, ordered so that the min-reduction prefers the loss over the gradient norm.
_BAD_WHAT = ("training loss is nan", "training loss is inf", "training loss is -inf", "gradient norm is nan",
             "gradient norm is inf")
_NO_BAD = 2**62  # "nothing bad yet" (larger than any step * 8 + code)


def check_fsdp_plugin(plugin) -> None:
    """Refuse FSDP settings under which no full adapter would be saved."""
    kind = str(getattr(plugin, "state_dict_type", ""))
    if "FULL_STATE_DICT" not in kind:
        raise ValueError(f"FSDP with state_dict_type {kind or None}: lmoe saves the adapter from a full state "
                         f"dict; set fsdp_state_dict_type: FULL_STATE_DICT in the Accelerate config")


def make_adapter_contiguous(model: torch.nn.Module) -> int:
    """Replace non-contiguous trainable parameters (``lora_B``'s permuted storage) by contiguous copies,
    for FSDP2's ``fully_shard``; call before the optimizer is built. Returns how many were replaced."""
    n = 0
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.requires_grad and not p.is_contiguous():
                setattr(module, name, torch.nn.Parameter(p.detach().contiguous(), requires_grad=True))
                n += 1
    return n


def load_adapter_distributed(model: torch.nn.Module, adapter_dir: str) -> None:
    """Load an adapter into an ``LMoEModel`` that may be wrapped (DDP, FSDP1) or sharded (FSDP2), on
    every rank (collective under FSDP1)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    from .model import LMoEModel

    inner = model
    while not isinstance(inner, LMoEModel) and isinstance(getattr(inner, "module", None), torch.nn.Module):
        inner = inner.module  # DDP / FSDP1 wrappers
    if isinstance(model, FSDP1):
        with FSDP1.summon_full_params(model, writeback=True):
            inner.load_adapter_weights(adapter_dir)
    else:  # plain, DDP, or FSDP2 (DTensor parameters: load_adapter_weights takes each rank's shard)
        inner.load_adapter_weights(adapter_dir)


class LMoETrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._extra: dict[str, torch.Tensor] = {}
        self._extra_n = 0
        self._first_bad: torch.Tensor | None = None  # on device: min over events of step * 8 + code
        if self.is_fsdp_enabled:
            plugin = self.accelerator.state.fsdp_plugin
            check_fsdp_plugin(plugin)
            if getattr(plugin, "fsdp_version", 1) == 2:
                make_adapter_contiguous(self.model)
        elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and self.args.process_index == 0:
            # Accelerate turns FSDP on only on an accelerator (GPU, XPU, ...); elsewhere it drops it silently.
            logger.warning("the Accelerate config asks for FSDP, but Accelerate runs %s here (FSDP needs a GPU or "
                           "another accelerator): every rank holds the whole model",
                           self.accelerator.distributed_type)

    # ------------------------------------------------------------ non-finite loss / gradient detection
    def _flag_nonfinite(self, value: torch.Tensor, code_offset: int) -> None:
        """Record ``value`` if it is the first non-finite one, without a host sync."""
        value = value.detach().float().reshape(())
        step = self.state.global_step + 1  # the optimizer step this value belongs to, as logged
        code = torch.where(torch.isnan(value), 0, torch.where(value > 0, 1, 2)) + code_offset
        event = torch.where(torch.isfinite(value), _NO_BAD, step * 8 + code)
        if self._first_bad is None:
            self._first_bad = torch.full((), _NO_BAD, dtype=torch.long, device=value.device)
        self._first_bad = torch.minimum(self._first_bad, event)

    def check_finite(self) -> None:
        """Raise ``FloatingPointError`` naming the first step with a non-finite loss or gradient norm.

        One host sync (and under DDP one all-reduce: every rank calls this at the same points, where
        Trainer logs or saves)."""
        if self._first_bad is None:
            return
        first = self._first_bad.clone()
        if self.args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        first = int(first)  # the host sync
        if first < _NO_BAD:
            self._close_progress_bars()  # so that the error is the last line on the terminal
            step, code = divmod(first, 8)
            raise FloatingPointError(f"{_BAD_WHAT[code]} at step {step}; stopped before saving anything from it "
                                     f"(earlier checkpoints in {self.args.output_dir} are kept)")

    def _close_progress_bars(self) -> None:
        for cb in self.callback_handler.callbacks:
            for name in ("training_bar", "prediction_bar"):
                bar = getattr(cb, name, None)
                if bar is not None and hasattr(bar, "close"):
                    bar.close()
                    setattr(cb, name, None)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._flag_nonfinite(loss, 0)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if grad_norm is not None:  # a tensor (a float under DeepSpeed)
            self._flag_nonfinite(torch.as_tensor(grad_norm), 3)
        return grad_norm

    def _save_checkpoint(self, model, trial) -> None:
        self.check_finite()  # never write a checkpoint from a step with a non-finite loss
        super()._save_checkpoint(model, trial)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs["loss"]
        if model.training:
            for key in ("lm_loss", "aux_loss", "z_loss", "sparsity_loss", "entropy_loss", "rsl_loss", "lbc_loss"):
                value = outputs.get(key) if hasattr(outputs, "get") else None
                if value is not None:
                    self._extra[key] = self._extra.get(key, 0.0) + value.detach().float()
            self._extra_n += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs or "train_loss" in logs:  # called by every rank at the same steps
            self.check_finite()
        if "loss" in logs and self._extra_n:
            keys = sorted(self._extra)
            values = [self._extra[k] / self._extra_n for k in keys]
            entropy = self._router_entropy()
            if entropy is not None:
                keys.append("router_entropy")
                values.append(torch.tensor(entropy))
            if values:
                device = values[0].device
                means = self._mean_over_ranks(torch.stack([v.to(device) for v in values])).tolist()
                for key, value in zip(keys, means):
                    logs[key] = round(value, 4 if key == "router_entropy" else 6)
            self._extra, self._extra_n = {}, 0
        super().log(logs, *args, **kwargs)

    def _mean_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """Mean over DDP ranks (like Trainer's logged loss), so that log.csv describes the whole batch."""
        if self.args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
            t = t / self.args.world_size
        return t

    def _router_entropy(self) -> float | None:
        model = self.accelerator.unwrap_model(self.model)
        if not hasattr(model, "routing_stats"):
            return None
        stats = model.routing_stats()
        if not stats:
            return None
        return sum(s["entropy"] for s in stats.values()) / len(stats)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # Adapter only: a checkpoint is an adapter directory (never the frozen base, never a pickle).
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        # Under FSDP Trainer passes the full state dict gathered on this rank (the parameters are shards).
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir, state_dict=state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from .model import LMoEModel

        if not isinstance(self.accelerator.unwrap_model(self.model), LMoEModel):  # e.g. a PEFT baseline
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # Trainer passes the wrapped model under FSDP (after prepare), nothing otherwise (before prepare).
        load_adapter_distributed(model if model is not None else self.model, resume_from_checkpoint)


class CSVLogger(TrainerCallback):
    """Appends each log dict to ``<output_dir>/log.csv`` (fixed columns, rank 0 only).

    At the start of training it keeps only the rows up to the current step: none for a fresh run
    (so an overwritten run starts a fresh log), the checkpoint's for a resumed one."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= state.global_step]
        if not rows:
            self.path.unlink()
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        new = not self.path.exists()
        row = {"step": state.global_step, **{k: v for k, v in logs.items() if k in LOG_COLUMNS}}
        if "loss" not in row and "eval_loss" not in row:
            return  # the end-of-training summary: it lives in train_summary.json
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
            if new:
                w.writeheader()
            w.writerow(row)


# ---------------------------------------------------------------------------------------------
# checkpoints of a run folder (``lmoe train --resume`` and the experiment runner)


def checkpoints(out: Path) -> list[Path]:
    """The ``checkpoint-K`` folders of ``out``, oldest first."""
    found = [p for p in Path(out).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _complete(ckpt: Path) -> bool:
    """Trainer writes trainer_state.json last, after the adapter, optimizer, scheduler and RNG state."""
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return all((ckpt / f).is_file() for f in ("adapter_config.json", "adapter_model.safetensors"))


def latest_checkpoint(out: Path) -> str | None:
    """The newest complete ``checkpoint-K``; incomplete ones (a run killed while saving) are skipped."""
    for ckpt in reversed(checkpoints(out)):
        if _complete(ckpt):
            return str(ckpt)
        print(f"lmoe: skipping incomplete checkpoint {ckpt} (interrupted while saving)", file=sys.stderr)
    return None
