"""lm-evaluation-harness support: an L-MoE model as ``--model lmoe`` and the bundled tasks as harness tasks.

    pip install "lmoe[harness]"
    python -m lmoe.harness --model lmoe --model_args adapter=out/adapter --tasks lmoe_boolq,lmoe_arc_easy
    python -m lmoe.harness --model lmoe --model_args pretrained=smollm2-135m --tasks hellaswag   # a hub task

``python -m lmoe.harness`` is lm-eval's own command line (every flag of ``lm-eval run``) after two
additions: the model name ``lmoe`` is registered, and unless ``--include_path`` is given the bundled
multiple-choice tasks (``lmoe_boolq``, ``lmoe_arc_easy``: the test files shipped in ``lmoe/data``) are
on the task path. From Python::

    import lm_eval
    from lmoe.harness import LMoEHarnessLM, write_bundled_tasks

    lm = LMoEHarnessLM(adapter="out/adapter", batch_size=8)
    tm = lm_eval.tasks.TaskManager(include_path=str(write_bundled_tasks()))
    lm_eval.simple_evaluate(model=lm, tasks=["lmoe_boolq"], task_manager=tm)

``LMoEHarnessLM`` is lm-eval's ``HFLM`` given the base model with the adapter's layers in place (the
routing is per token, so HFLM's batching, padding and KV-cached generation apply unchanged).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
import torch.nn as nn

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("lmoe.harness needs lm-evaluation-harness: pip install 'lmoe[harness]' "
                      "(or pip install lm-eval)") from e

from .dataset import BUNDLED_DATA

# Bundled tasks the harness can score by log-likelihood. The continuation after the prompt is
# " " + choice_labels[j] for lettered multiple choice (" A") and " " + choices[j] for yes/no (" no"):
# exactly what `lmoe eval` scores, so both report the same accuracy (raw, and length-normalised as acc_norm).
BUNDLED_TASKS = {"lmoe_boolq": ("boolq", "choices"), "lmoe_arc_easy": ("arc_easy", "choice_labels")}

_TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{{choice_field}}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

logger = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": torch.float32}


def _resolve_device(device: str | None) -> str:
    """The device to use; as HFLM does, a CUDA device on a machine without CUDA falls back to the CPU
    (lm-eval's command line passes ``cuda:0`` unless ``--device`` is given)."""
    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        if device is not None:
            logger.info("lmoe.harness: %s is not available, using the CPU", device)
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def write_bundled_tasks(directory: str | Path | None = None) -> Path:
    """Write the harness task YAMLs of the bundled test files into ``directory`` (default: a cache folder)."""
    out = Path(directory) if directory is not None else Path.home() / ".cache" / "lmoe" / "harness-tasks"
    out.mkdir(parents=True, exist_ok=True)
    for name, (task, field) in BUNDLED_TASKS.items():
        data = (Path(BUNDLED_DATA) / task / "test.jsonl").resolve()
        (out / f"{name}.yaml").write_text(_TASK_YAML.format(name=name, data=data, choice_field=field))
    return out


@register_model("lmoe")
class LMoEHarnessLM(HFLM):
    """lm-eval's HFLM over a base model (alias, folder, .gguf or hub id) plus an optional L-MoE adapter.

    ``pretrained`` may also be a loaded ``LMoEModel`` or transformers model (then pass ``tokenizer``).
    Remaining keyword arguments (``batch_size``, ``max_length``, ``add_bos_token``, ...) go to HFLM.
    """

    def __init__(self, pretrained: str | nn.Module = "smollm2-135m", adapter: str | None = None,
                 tokenizer=None, device: str | None = None, dtype: str | torch.dtype = "float32", **kwargs):
        from .model import LMoEModel, load_adapter_config

        if isinstance(pretrained, nn.Module):
            if adapter is not None:
                raise ValueError("adapter= needs pretrained= to be a model name or path, not a loaded model")
            if tokenizer is None:
                raise ValueError("a loaded model needs tokenizer= as well")
            model = pretrained
        else:
            if isinstance(dtype, str):
                if dtype not in _DTYPES:
                    raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
                dtype = _DTYPES[dtype]
            if adapter is not None:
                load_adapter_config(adapter)  # a bad adapter fails before the model load
            from .models import load_model

            model, tok = load_model(pretrained, dtype=dtype)
            tokenizer = tokenizer if tokenizer is not None else tok
            if adapter is not None:
                model = LMoEModel.from_pretrained(model, adapter)
        if isinstance(model, LMoEModel):
            model = model.base_model  # holds the adapter's layers; HFLM needs the transformers model itself
        device = _resolve_device(device)
        model = model.to(device).eval()
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with ``--model lmoe`` registered and the bundled tasks on the task path."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in ("run", "ls", "validate", "-h", "--help"):
        args.insert(0, "run")  # lm-eval's legacy form (no subcommand) means run
    if args and args[0] in ("run", "ls", "validate") and "--include_path" not in args:
        args += ["--include_path", str(write_bundled_tasks())]
    sys.argv = ["lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
