"""lm-evaluation-harness integration: ``--model lmoe`` scores exactly what the model computes and what
``lmoe eval`` reports, on a tiny model with a non-zero adapter."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from lmoe import LMoEConfig, get_lmoe_model  # noqa: E402
from lmoe.dataset import BUNDLED_DATA, load_examples  # noqa: E402
from lmoe.evaluate import evaluate  # noqa: E402
from lmoe.harness import BUNDLED_TASKS, LMoEHarnessLM, main, write_bundled_tasks  # noqa: E402
from lmoe.models import load_model  # noqa: E402
from tests.helpers import randomize_lora_B, save_tiny_model_dir  # noqa: E402

ROWS = [  # boolq-shaped rows in the tiny tokenizer's words
    {"prompt": "the cat sat on the mat Question: the cat sat Answer:", "label": 1},
    {"prompt": "the dog ran Question: the cat ran Answer:", "label": 0},
    {"prompt": "a b c d Question: a b Answer:", "label": 1},
    {"prompt": "the mat sat on the dog Question: the mat ran Answer:", "label": 0},
    {"prompt": "e f g h Question: h g Answer:", "label": 1},
    {"prompt": "the cat Question: the dog Answer:", "label": 0},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, adapter folder): a tiny Llama and an L-MoE adapter with random, non-zero B."""
    root = tmp_path_factory.mktemp("harness")
    model_dir, adapter_dir = root / "model", root / "adapter"
    save_tiny_model_dir(model_dir)
    model, _ = load_model(str(model_dir))
    lm = get_lmoe_model(model, LMoEConfig(num_experts=4, rank=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_lora_B(lm, std=0.5)
    lm.save_pretrained(adapter_dir)
    return str(model_dir), str(adapter_dir)


def _rows():
    return [{"task": "boolq", "type": "yes_no", "split": "test", "answer": [" no", " yes"][r["label"]],
             "choices": ["no", "yes"], **r} for r in ROWS]


def _task_dir(tmp_path, data):
    yaml = (write_bundled_tasks(tmp_path / "bundled") / "lmoe_boolq.yaml").read_text()
    yaml = yaml.replace("lmoe_boolq", "tiny_boolq").replace(str((BUNDLED_DATA / "boolq" / "test.jsonl").resolve()),
                                                            str(data))
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "tiny_boolq.yaml").write_text(yaml)
    return d


def test_loglikelihood_equals_the_models_own_log_probs(tiny):
    model_dir, adapter_dir = tiny
    lm = LMoEHarnessLM(pretrained=model_dir, adapter=adapter_dir, batch_size=2)
    plain = LMoEHarnessLM(pretrained=model_dir, batch_size=2)
    reqs = [("the cat sat on the", " mat"), ("Question: the dog", " ran on the mat"), ("a b", " c")]
    got = [ll for ll, _ in lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)],
                                            disable_tqdm=True)]
    base_ll = [ll for ll, _ in plain.loglikelihood([Instance("loglikelihood", {}, r, i)
                                                    for i, r in enumerate(reqs)], disable_tqdm=True)]
    # Reference: the adapter model called directly, the continuation's log-probs summed.
    model, tok = load_model(model_dir)
    from lmoe import LMoEModel

    ref_model = LMoEModel.from_pretrained(model, adapter_dir).eval()
    for (ctx, cont), ll, bll in zip(reqs, got, base_ll):
        ctx_ids = tok(ctx)["input_ids"]
        ids = tok(ctx + cont)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(ref_model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        ref = sum(logp[p - 1, ids[p]].item() for p in range(len(ctx_ids), len(ids)))
        assert ll == pytest.approx(ref, abs=1e-4)
        assert abs(ll - bll) > 1e-3  # the adapter is applied


def test_accuracy_per_row_equals_lmoe_eval(tiny, tmp_path):
    model_dir, adapter_dir = tiny
    data = tmp_path / "tiny_boolq.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    lm = LMoEHarnessLM(pretrained=model_dir, adapter=adapter_dir, batch_size=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_boolq"], log_samples=True,
                                  task_manager=lm_eval.tasks.TaskManager(include_path=str(_task_dir(tmp_path, data))))
    harness_acc = [s["acc"] for s in sorted(out["samples"]["tiny_boolq"], key=lambda s: s["doc_id"])]
    ours = evaluate(lm.model, lm.tokenizer, load_examples(data, split="test"), seq_len=64, progress=False,
                    generate_tasks=False, per_example=True)["tasks"]["boolq"]
    assert harness_acc == ours["per_example"]["accuracy"]
    assert out["results"]["tiny_boolq"]["acc,none"] == pytest.approx(ours["accuracy"])
    assert 0 < ours["accuracy"] < 1  # the comparison is not between two constant answers


def test_bundled_tasks_run_on_the_shipped_test_files(tiny, tmp_path):
    model_dir, adapter_dir = tiny
    task_dir = write_bundled_tasks(tmp_path / "tasks")
    assert sorted(p.name for p in task_dir.iterdir()) == ["lmoe_arc_easy.yaml", "lmoe_boolq.yaml"]
    lm = LMoEHarnessLM(pretrained=model_dir, adapter=adapter_dir, batch_size=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(BUNDLED_TASKS), limit=5, log_samples=True,
                                  task_manager=lm_eval.tasks.TaskManager(include_path=str(task_dir)))
    for name, (task, _) in BUNDLED_TASKS.items():
        rows = load_examples(BUNDLED_DATA / task / "test.jsonl", split="test")[:5]
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        assert [s["target"] for s in samples] == [r["label"] for r in rows]
        assert len(samples[0]["resps"]) == len(rows[0]["choices"])  # one log-likelihood per choice
        ours = evaluate(lm.model, lm.tokenizer, rows, seq_len=512, progress=False, generate_tasks=False,
                        per_example=True)["tasks"][task]
        assert [s["acc"] for s in samples] == ours["per_example"]["accuracy"]


def test_bad_arguments_are_named(tiny, tmp_path):
    model_dir, _ = tiny
    with pytest.raises(ValueError, match=r"dtype must be one of float32, float16, bfloat16, auto, got 'fp8'"):
        LMoEHarnessLM(pretrained=model_dir, dtype="fp8")
    model, _ = load_model(model_dir)
    with pytest.raises(ValueError, match="a loaded model needs tokenizer= as well"):
        LMoEHarnessLM(pretrained=model)
    with pytest.raises(ValueError, match="adapter= needs pretrained= to be a model name or path, not a loaded model"):
        LMoEHarnessLM(pretrained=model, adapter=str(tmp_path))
    with pytest.raises(FileNotFoundError):
        LMoEHarnessLM(pretrained=model_dir, adapter=str(tmp_path / "missing"))


def test_command_line_registers_lmoe_and_writes_results(tiny, tmp_path, monkeypatch):
    model_dir, adapter_dir = tiny
    monkeypatch.setenv("HOME", str(tmp_path))  # the bundled task folder goes under ~/.cache
    out = tmp_path / "out"
    main(["--model", "lmoe", "--model_args", f"pretrained={model_dir},adapter={adapter_dir}",
          "--tasks", "lmoe_boolq", "--limit", "3", "--batch_size", "3", "--output_path", str(out)])
    assert (tmp_path / ".cache" / "lmoe" / "harness-tasks" / "lmoe_boolq.yaml").is_file()
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["results"]["lmoe_boolq"]["alias"] == "lmoe_boolq"
    assert results["n-samples"]["lmoe_boolq"]["effective"] == 3


def test_device_falls_back_to_cpu_only_for_missing_cuda(monkeypatch):
    from lmoe.harness import _resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [_resolve_device(d) for d in (None, "cuda:0", "cuda", "cpu")] == ["cpu", "cpu", "cpu", "cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [_resolve_device(d) for d in (None, "cuda:1", "cpu")] == ["cuda", "cuda:1", "cpu"]
