"""Bad input, one row each: ``lmoe`` must exit 2 with one ``lmoe: error: ...`` line (the exact message) and no
traceback. Every LMoEConfig field out of range, bad training flags, bad data, bad models, bad adapters.

The rows build their own files under one module-wide folder (``{d}`` in a message is that folder); the tiny
2-layer Llama stands in for a real model, and nothing here trains more than one step.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from lmoe import LMoEConfig, LMoEModel, cli
from tests.conftest import build_tiny_tokenizer
from tests.helpers import tiny_llama

ROWS = [
    {"task": "qa", "prompt": "Question: the cat sat on the mat\nAnswer:", "answer": " yes"},
    {"task": "lm", "prompt": "the dog", "answer": " ran on the mat"},
]
TINY = dict(num_experts=4, rank=2, target_modules=["q_proj"])


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # shared cores: more threads only spin against each other
    yield
    torch.set_num_threads(n)


class Evil:
    """Unpickling this creates a file: the proof that a pickle was (or was not) loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _save_model(path: Path, pad: bool = True, **llama) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer(add_bos=True, pad=pad)
    if llama:
        cfg = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{**cfg, **llama}))
    else:
        model = tiny_llama(vocab_size=len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)


def _adapter(path: Path, base, **config) -> Path:
    LMoEModel(base, LMoEConfig(**{**TINY, **config})).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    from transformers import AutoModelForCausalLM

    _save_model(d / "model")
    _save_model(d / "model-no-pad", pad=False)
    _save_model(d / "model-wide", hidden_size=32, intermediate_size=64)
    _save_model(d / "model-deep", num_hidden_layers=3)
    (d / "not-a-model").mkdir()
    (d / "broken-model").mkdir()
    (d / "broken-model" / "config.json").write_text("{ not json")
    (d / "a-file").write_text("x")

    (d / "mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS * 2))
    (d / "empty.jsonl").write_text("\n")
    (d / "malformed.jsonl").write_text(json.dumps(ROWS[0]) + "\n" + '{"prompt": "a",\n')
    (d / "no-fields.jsonl").write_text(json.dumps({"question": "a", "reply": "b"}) + "\n")
    (d / "no-answer.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n")
    (d / "int-answer.jsonl").write_text(json.dumps({"prompt": "a", "answer": 3}) + "\n")
    (d / "no-jsonl").mkdir()

    base = lambda name="model": AutoModelForCausalLM.from_pretrained(d / name)  # noqa: E731
    _adapter(d / "adapter-wide", base("model-wide"))  # for another base: hidden 32, not 64
    _adapter(d / "adapter-deep", base("model-deep"))  # for another base: 3 layers, not 2
    edited = _adapter(d / "adapter-edited", base())  # config edited after the save
    meta = json.loads((edited / "adapter_config.json").read_text())
    meta["config"]["alpha"] = 4.0
    (edited / "adapter_config.json").write_text(json.dumps(meta))
    truncated = _adapter(d / "adapter-truncated", base())
    blob = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(blob[: len(blob) // 2])
    pickled = _adapter(d / "adapter-pickle", base())
    (pickled / "adapter_model.safetensors").unlink()
    with open(pickled / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": Evil(d / "UNPICKLED")}, f)
    return d


def _train(d, *flags):
    return ["train", "--model", str(d / "model"), "--data", str(d / "mix.jsonl"), "--output-dir", str(d / "run"),
            "--max-steps", "1", "--batch-size", "2", "--seq-len", "32", "--num-experts", "4", "--rank", "2",
            *flags]


def _eval(d, *flags):
    return ["eval", "--model", str(d / "model"), "--data", str(d / "mix.jsonl"), "--seq-len", "32",
            "--batch-size", "2", "--output", str(d / "eval.json"), *flags]


M = "LMoEConfig."
ROWS_BAD = {
    # every LMoEConfig field, through its flag
    "num_experts": (lambda d: _train(d, "--num-experts", "0"), M + "num_experts must be an integer >= 1, got 0"),
    "rank": (lambda d: _train(d, "--rank", "-1"), M + "rank must be an integer >= 1, got -1"),
    "alpha": (lambda d: _train(d, "--alpha", "0"), M + "alpha must be a finite number > 0, got 0.0"),
    "alpha_nan": (lambda d: _train(d, "--alpha", "nan"), M + "alpha must be a finite number > 0, got nan"),
    "dropout": (lambda d: _train(d, "--dropout", "1"), M + "dropout must be a number in [0, 1), got 1.0"),
    "dropout_neg": (lambda d: _train(d, "--dropout", "-0.5"), M + "dropout must be a number in [0, 1), got -0.5"),
    "target_modules_empty": (lambda d: _train(d, "--target-modules", ""),
                             M + "target_modules must be a non-empty regex or list of names, got ['']"),
    "router": (lambda d: _train(d, "--router", "expert_choice"),
               M + "router must be one of softmax, topk, noisy_topk, switch, sigmoid_topk, implicit, static, sparsegen, "
                   "dynmole, hard_soft, got 'expert_choice'"),
    "top_k": (lambda d: _train(d, "--top-k", "0"), M + "top_k must be an integer >= 1, got 0"),
    "top_k_gt_n": (lambda d: _train(d, "--router", "topk", "--top-k", "5"),
                   M + "top_k must be <= num_experts (4), got 5"),
    "composition": (lambda d: _train(d, "--composition", "sum"),
                    M + "composition must be one of delta, factor, got 'sum'"),
    "aux_loss_coef": (lambda d: _train(d, "--aux-loss-coef", "-1"),
                      M + "aux_loss_coef must be a finite number >= 0, got -1.0"),
    "z_loss_coef": (lambda d: _train(d, "--z-loss-coef", "inf"),
                    M + "z_loss_coef must be a finite number >= 0, got inf"),
    "target_modules_nothing": (
        lambda d: _train(d, "--target-modules", "nope"),
        "target_modules=['nope'] matched no Linear module. Linear modules: model.layers.0.self_attn.q_proj, "
        "model.layers.0.self_attn.k_proj, model.layers.0.self_attn.v_proj, model.layers.0.self_attn.o_proj, "
        "model.layers.0.mlp.gate_proj, model.layers.0.mlp.up_proj, model.layers.0.mlp.down_proj, "
        "model.layers.1.self_attn.q_proj, model.layers.1.self_attn.k_proj, model.layers.1.self_attn.v_proj, "
        "model.layers.1.self_attn.o_proj, model.layers.1.mlp.gate_proj, ... (15 in all); their names end in: "
        "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    # other training flags
    "max_steps": (lambda d: _train(d, "--max-steps", "0"), "--max-steps must be >= 1, got 0"),
    "batch_size": (lambda d: _train(d, "--batch-size", "0"), "--batch-size must be >= 1, got 0"),
    "grad_accum": (lambda d: _train(d, "--grad-accum", "0"), "--grad-accum must be >= 1, got 0"),
    "seq_len_0": (lambda d: _train(d, "--seq-len", "0"), "--seq-len must be >= 1, got 0"),
    "seq_len_neg": (lambda d: _train(d, "--seq-len", "-3"), "--seq-len must be >= 1, got -3"),
    "logging_steps": (lambda d: _train(d, "--logging-steps", "0"), "--logging-steps must be >= 1, got 0"),
    "save_steps": (lambda d: _train(d, "--save-steps", "-1"), "--save-steps must be >= 0, got -1"),
    "lr": (lambda d: _train(d, "--lr", "0"), "--lr must be a finite number > 0, got 0.0"),
    "lr_nan": (lambda d: _train(d, "--lr", "nan"), "--lr must be a finite number > 0, got nan"),
    "warmup": (lambda d: _train(d, "--warmup-ratio", "1"), "--warmup-ratio must be in [0, 1), got 1.0"),
    "weight_decay": (lambda d: _train(d, "--weight-decay", "-1"),
                     "--weight-decay must be a finite number >= 0, got -1.0"),
    "mix": (lambda d: _train(d, "--mix", "random"), "--mix must be proportional or uniform, got 'random'"),
    "loss_on": (lambda d: _train(d, "--loss-on", "prompt"), "--loss-on must be answer or all, got 'prompt'"),
    "scheduler": (lambda d: _train(d, "--lr-scheduler", "bogus"),
                  "--lr-scheduler must be one of linear, cosine, cosine_with_restarts, polynomial, constant, "
                  "constant_with_warmup, inverse_sqrt, reduce_lr_on_plateau, cosine_with_min_lr, "
                  "cosine_warmup_with_min_lr, warmup_stable_decay, greedy; got 'bogus'"),
    "val_per_task": (lambda d: _train(d, "--eval-steps", "1", "--val-per-task", "9"),
                     "task 'qa' has 2 examples; cannot hold out 9 and keep any for training"),
    "resume_nothing": (lambda d: _train(d, "--resume"), "--resume: no complete checkpoint-* folder in '{d}/run'"),
    "resume_and_overwrite": (lambda d: _train(d, "--resume", "--overwrite-output-dir"),
                             "--resume and --overwrite-output-dir exclude each other"),
    "output_under_a_file": (lambda d: [*_train(d), "--output-dir", str(d / "a-file" / "run")],
                            "cannot create output directory '{d}/a-file/run': Not a directory"),
    # data
    "data_missing": (lambda d: [*_train(d), "--data", str(d / "missing.jsonl")],
                     "data path '{d}/missing.jsonl' does not exist"),
    "data_empty": (lambda d: [*_train(d), "--data", str(d / "empty.jsonl")], "{d}/empty.jsonl: no examples"),
    "data_malformed": (lambda d: [*_train(d), "--data", str(d / "malformed.jsonl")],
                       "{d}/malformed.jsonl:2: invalid JSON: Expecting property name enclosed in double quotes: "
                       "line 2 column 1 (char 16)"),
    "data_no_fields": (lambda d: [*_train(d), "--data", str(d / "no-fields.jsonl")],
                       "{d}/no-fields.jsonl:1: missing 'prompt' and 'answer' (or 'text'); keys: ['question', 'reply']"),
    "data_no_answer": (lambda d: [*_train(d), "--data", str(d / "no-answer.jsonl")],
                       "{d}/no-answer.jsonl:1: missing 'answer' (a row needs 'prompt' and 'answer', or 'text')"),
    "data_int_answer": (lambda d: [*_train(d), "--data", str(d / "int-answer.jsonl")],
                        "{d}/int-answer.jsonl:1: 'answer' must be a string, got int"),
    "data_dir_without_jsonl": (lambda d: [*_train(d), "--data", str(d / "no-jsonl")],
                               "data directory '{d}/no-jsonl' holds no <task>/train.jsonl, train.jsonl or "
                               "*.jsonl files"),
    # models
    "model_missing": (lambda d: [*_train(d), "--model", str(d / "nope")], "model path '{d}/nope' does not exist"),
    "model_not_a_model": (lambda d: [*_train(d), "--model", str(d / "not-a-model")],
                          "'{d}/not-a-model' is not a model folder: config.json is missing"),
    # (a message ending in "..." is a prefix: the rest is the loading library's own wording)
    "model_broken_config": (lambda d: [*_train(d), "--model", str(d / "broken-model")],
                            "cannot load model '{d}/broken-model': ..."),
    "eval_model_missing": (lambda d: [*_eval(d), "--model", str(d / "nope")], "model path '{d}/nope' does not exist"),
    # adapters (eval / generate)
    "eval_limit_0": (lambda d: _eval(d, "--limit", "0"), "--limit must be >= 1, got 0"),
    "adapter_other_base_shapes": (
        lambda d: _eval(d, "--adapter", str(d / "adapter-wide")),
        "{d}/adapter-wide/adapter_model.safetensors: shape mismatch for 6 tensor(s): "
        "[model.layers.0.self_attn.q_proj.lora_A: saved (4, 2, 32) vs model (4, 2, 64), "
        "model.layers.0.self_attn.q_proj.lora_B: saved (4, 32, 2) vs model (4, 64, 2), "
        "model.layers.0.self_attn.q_proj.router.weight: saved (4, 32) vs model (4, 64), "
        "model.layers.1.self_attn.q_proj.lora_A: saved (4, 2, 32) vs model (4, 2, 64), "
        "model.layers.1.self_attn.q_proj.lora_B: saved (4, 32, 2) vs model (4, 64, 2), ...]"),
    "adapter_other_base_keys": (
        lambda d: _eval(d, "--adapter", str(d / "adapter-deep")),
        "{d}/adapter-deep/adapter_model.safetensors does not match this model and config: 0 missing key(s) [], "
        "3 unexpected key(s) [model.layers.2.self_attn.q_proj.lora_A, model.layers.2.self_attn.q_proj.lora_B, "
        "model.layers.2.self_attn.q_proj.router.weight]"),
    "adapter_other_config": (
        lambda d: _eval(d, "--adapter", str(d / "adapter-edited")),
        "{d}/adapter-edited/adapter_model.safetensors was saved with another LMoEConfig: alpha=16.0 (model: 4.0); "
        "in an adapter folder this means adapter_config.json and the weights come from different saves"),
    "adapter_truncated": (lambda d: _eval(d, "--adapter", str(d / "adapter-truncated")),
                          "{d}/adapter-truncated/adapter_model.safetensors: corrupt or truncated safetensors "
                          "file (..."),
    "adapter_pickle": (
        lambda d: ["generate", "--model", str(d / "model"), "--adapter", str(d / "adapter-pickle"), "--prompt", "a"],
        "'{d}/adapter-pickle' has no adapter_model.safetensors; refusing to load pickle file(s) adapter_model.bin "
        "(safetensors only)"),
    "generate_max_new_tokens": (
        lambda d: ["generate", "--model", str(d / "model"), "--prompt", "a", "--max-new-tokens", "0"],
        "--max-new-tokens must be >= 1, got 0"),
}


@pytest.mark.parametrize("row", list(ROWS_BAD))
def test_bad_input_is_one_line_error(d, row, capsys):
    argv, message = ROWS_BAD[row]
    code = cli.main(argv(d))
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    last, expected = err.strip().splitlines()[-1], "lmoe: error: " + message.format(d=d)
    if expected.endswith("..."):
        assert last.startswith(expected[:-3]) and len(last) > len(expected)
    else:
        assert last == expected
    assert not (d / "UNPICKLED").exists()  # the pickle row never unpickles anything


def test_tokenizer_without_pad_token_trains_with_eos_as_pad(d, tmp_path):
    from transformers import AutoTokenizer

    from lmoe.models import load_model

    assert AutoTokenizer.from_pretrained(d / "model-no-pad").pad_token is None
    assert load_model(str(d / "model-no-pad"))[1].pad_token == "<eos>"
    out = tmp_path / "run"
    # Batch 2 of rows of different lengths: the shorter one is padded (with eos).
    assert cli.main([*_train(d, "--model", str(d / "model-no-pad"), "--output-dir", str(out))]) == 0
    assert (out / "adapter_model.safetensors").is_file()


def test_unwritable_output_dir(d, tmp_path, capsys):
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root: chmod does not stop its writes; make the directory impossible instead
            out, message = d / "a-file" / "run", f"cannot create output directory '{d}/a-file/run': Not a directory"
        else:
            out, message = ro, f"output directory '{ro}' is not writable: Permission denied"
        assert cli.main([*_train(d), "--output-dir", str(out)]) == 2
    finally:
        ro.chmod(0o755)
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "lmoe: error: " + message and "Traceback" not in err


def test_full_disk_is_reported_before_training(d, tmp_path, capsys, monkeypatch):
    import errno

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full)  # what a full disk does to the 4 kB write probe
    out = tmp_path / "run"
    assert cli.main([*_train(d), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last == f"lmoe: error: output directory '{out}' is not writable: No space left on device"
    assert not (out / "log.csv").exists()  # nothing started
