"""Training with transformers' Trainer: the loop mechanics (accumulation, schedules, mixed precision,
checkpoints, DDP through Accelerate/torchrun) are Trainer's; what is ours is small:

* ``LMoETrainer.compute_loss`` uses the joint loss the model returns and keeps the routing terms
  (detached, on device: no host sync per step) for logging.
* ``LMoETrainer.log`` adds the mean ``lm_loss``, ``aux_loss``, ``z_loss`` since the last log and the
  mean normalised router entropy of the last step, and warns when routing collapses.
* Checkpoints hold the adapter only (``LMoEModel.save_pretrained``), and resuming loads it back.
* ``CSVLogger`` appends every log line to ``<output_dir>/log.csv``.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

logger = logging.getLogger("lmoe")

LOG_COLUMNS = ("step", "epoch", "loss", "lm_loss", "aux_loss", "z_loss", "router_entropy", "learning_rate",
               "grad_norm", "eval_loss", "num_input_tokens_seen")


class LMoETrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._extra: dict[str, torch.Tensor] = {}
        self._extra_n = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs["loss"]
        if model.training:
            for key in ("lm_loss", "aux_loss", "z_loss"):
                value = outputs.get(key) if hasattr(outputs, "get") else None
                if value is not None:
                    self._extra[key] = self._extra.get(key, 0.0) + value.detach().float()
            self._extra_n += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._extra_n:
            for key, total in self._extra.items():
                logs[key] = round(float(total) / self._extra_n, 6)
            self._extra, self._extra_n = {}, 0
            entropy = self._router_entropy()
            if entropy is not None:
                logs["router_entropy"] = round(entropy, 4)
        super().log(logs, *args, **kwargs)

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
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        model.load_adapter_weights(resume_from_checkpoint)


class CSVLogger(TrainerCallback):
    """Appends each log dict to ``<output_dir>/log.csv`` (fixed columns, rank 0 only)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

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


class NonFiniteLossStop(TrainerCallback):
    """Stops training with a clear error when the logged loss is NaN or infinite."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss} at step {state.global_step}; stopping "
                                     f"(last checkpoint in {args.output_dir} is kept)")
