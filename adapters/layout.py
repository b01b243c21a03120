"""Every file name inside an artifact folder, once: the trainer writes them, the worker and the artifact
store read them back, and vLLM's resolver loads the PEFT pair.

An adapter version (`<adapter_root>/<vllm_name>/`) is a PEFT adapter folder, so vLLM serves it as it is, plus
our records. A shared init is a PEFT adapter folder plus `SHARED_INIT_META`.
"""
from __future__ import annotations

import json
from pathlib import Path

# PEFT's names (peft writes ADAPTER_CONFIG itself in save_pretrained); vLLM loads exactly these two.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# The AdaptConfig and metrics of the training that produced an adapter version.
ADAPT_RECORD = "metalora_adapt.json"
# Which job wrote an adapter version, so a retry of that job recognises its own folder.
JOB_RECORD = "metalora_job.json"
# {"sha256": {file: hex digest}} of the other files, recorded when the version is written and verified on reads.
CHECKSUMS = "metalora_checksums.json"
ADAPTER_VERSION_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPT_RECORD, JOB_RECORD, CHECKSUMS)

# {"adapt_config": AdaptConfig.to_dict(), ...what meta-training records}: the procedure an init was learned for.
SHARED_INIT_META = "metalora_meta.json"
SHARED_INIT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, SHARED_INIT_META)


def read_init_meta(folder: Path | str) -> dict | None:
    """An init folder's SHARED_INIT_META as written; None where the folder has none (not an init, or one whose
    writer has not finished: inits appear whole, the record with them)."""
    path = Path(folder) / SHARED_INIT_META
    return json.loads(path.read_text()) if path.is_file() else None
