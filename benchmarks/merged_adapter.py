"""One LoRA adapter folded into a copy of the base model's weights, saved as a plain model folder (part 7's
"merged" configuration: vLLM serves it without --enable-lora, so its requests never take the LoRA path).

    python -m benchmarks.merged_adapter BASE_MODEL_DIR ADAPTER_DIR OUT_DIR

Run as its own process by benchmarks/cpu_serving.py: transformers + peft and the model copies stay out of the
long-running benchmark process, which keeps vLLM engines beside it. The merged weights keep the base folder's
dtype, so vLLM picks the same serving dtype for both.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.common import REPO

# What vLLM needs from the base folder besides the weights: the tokenizer and chat template are the base's own.
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
          "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model")


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto")
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    for name in COPIED:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out_dir / name)


def merge_in_subprocess(base_dir: Path, adapter_dir: Path, out_dir: Path, log_path: Path) -> Path:
    with log_path.open("w") as log:
        subprocess.run([sys.executable, "-m", "benchmarks.merged_adapter", str(base_dir), str(adapter_dir),
                        str(out_dir)], stdout=log, stderr=subprocess.STDOUT, check=True, timeout=1800, cwd=REPO)
    return out_dir


if __name__ == "__main__":
    merge(*(Path(a) for a in sys.argv[1:4]))
