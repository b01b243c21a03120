"""Checks on an uploaded PEFT LoRA adapter, all done in memory before anything is written (no torch).

An upload is accepted only if vLLM can serve it on this base model exactly as PEFT would apply it:
- files: `adapter_config.json` and `adapter_model.safetensors` (adapters/layout.py), loose or in one zip/tar
  archive; pickle formats (`.bin`, `.pt`, ...) are refused, since loading them runs code;
- `adapter_config.json`: a LORA config without the PEFT features vLLM does not implement, rank within
  vLLM's `--max-lora-rank` (adapters/lora_limits.py), every target module a projection of the base model;
- `adapter_model.safetensors`: a well-formed header (offsets tile the data exactly, sizes match dtypes and
  shapes), and exactly the tensors the config implies (`lora_A` [r, in], `lora_B` [out, r] for each targeted
  module of the base model, adapters/model_shapes.py).
The written config differs from the upload only in `base_model_name_or_path` (vLLM's resolver serves an
adapter only when it names vLLM's `--model` exactly) and `inference_mode`.
"""
from __future__ import annotations

import hashlib
import io
import json
import lzma
import re
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from adapters.errors import MetaloraError
from adapters.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from adapters.lora_limits import rank_problem
from adapters.model_shapes import BaseModelShapes
from adapters.settings import Settings

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_CONFIG_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024 * 1024
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
# PEFT init_lora_weights values that only choose the starting weights (the saved adapter is a plain LoRA);
# the others (PiSSA, OLoRA, LoftQ, ...) change the base weights, which vLLM does not.
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
PEFT_PREFIX = "base_model.model."
# What the archive readers raise on damaged input (zlib/lzma errors escape tarfile and zipfile as they are).
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError,
                  NotImplementedError, RuntimeError, zlib.error, lzma.LZMAError)


class UploadRejected(MetaloraError):
    """The uploaded adapter cannot be served here; nothing was written. `param` names the offending file."""

    code = "invalid_adapter_upload"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        if code is not None:
            self.code = code


@dataclass
class CheckedAdapter:
    """What to write (file name -> bytes) and what to record about it."""

    files: dict[str, bytes]
    summary: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- archives and file selection
def unpack(data: bytes, max_bytes: int) -> dict[str, bytes]:
    """The regular files of a zip or tar (optionally compressed) archive, by path; at most max_bytes in all."""
    if data[:4] == b"PK\x03\x04":
        return _unzip(data, max_bytes)
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except ARCHIVE_ERRORS:
        raise UploadRejected("the body is neither a zip nor a tar archive; send the two PEFT files as multipart"
                             " form fields or one archive of them") from None
    files, total = {}, 0
    try:
        with archive:
            for member in archive:
                total += member.size if member.isfile() else 0
                if total > max_bytes or archive.offset > 2 * max_bytes + len(data):
                    raise _too_large(max_bytes)
                if member.isfile():
                    files[member.name] = archive.extractfile(member).read()
    except UploadRejected:
        raise
    except ARCHIVE_ERRORS as exc:
        raise UploadRejected(f"the tar archive is damaged: {type(exc).__name__}") from None
    return files


def _unzip(data: bytes, max_bytes: int) -> dict[str, bytes]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = [i for i in archive.infolist() if not i.is_dir()]
            if sum(i.file_size for i in infos) > max_bytes:
                raise _too_large(max_bytes)
            files = {}
            for info in infos:
                with archive.open(info) as f:
                    content = f.read(info.file_size + 1)  # the declared size is only a claim
                if len(content) != info.file_size:
                    raise UploadRejected(f"the zip entry {info.filename!r} is not the size its header says")
                files[info.filename] = content
            return files
    except UploadRejected:
        raise
    except ARCHIVE_ERRORS as exc:
        raise UploadRejected(f"the zip archive is damaged or unsupported: {type(exc).__name__}") from None


def _too_large(max_bytes: int) -> UploadRejected:
    return UploadRejected(f"the adapter is larger than the upload limit of {max_bytes} bytes"
                          " (METALORA_MAX_UPLOAD_BYTES)", code="upload_too_large")


def select_files(files: dict[str, bytes]) -> tuple[bytes, bytes]:
    """(config, weights) from uploaded files named by path; anything else but pickles is ignored (README.md)."""
    found: dict[str, bytes] = {}
    for path, content in files.items():
        name = PurePosixPath(path.replace("\\", "/")).name
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise UploadRejected(f"{name}: pickle checkpoints are not accepted (loading one runs code); save the"
                                 f" adapter as {ADAPTER_WEIGHTS} (PEFT: save_pretrained(..., safe_serialization=True))",
                                 param=name, code="unsafe_adapter_format")
        if name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if name in found:
                raise UploadRejected(f"{name} appears more than once in the upload", param=name)
            found[name] = content
    missing = [n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if n not in found]
    if missing:
        raise UploadRejected(f"the upload lacks {' and '.join(missing)}: a PEFT LoRA adapter is {ADAPTER_CONFIG} +"
                             f" {ADAPTER_WEIGHTS}", param=missing[0])
    return found[ADAPTER_CONFIG], found[ADAPTER_WEIGHTS]


# ---------------------------------------------------------------- adapter_config.json
@dataclass(frozen=True)
class LoraSpec:
    raw: dict[str, Any]
    rank: int
    modules: dict[str, int]  # targeted base-model module (full name) -> its LoRA rank


def _reject_config(message: str) -> UploadRejected:
    return UploadRejected(f"{ADAPTER_CONFIG}: {message}", param=ADAPTER_CONFIG)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _unsupported(cfg: dict[str, Any]) -> list[str]:
    """vLLM's own refusals (vllm/lora/peft_helper.py), plus fields that change tensor layout or names."""
    out = []
    checks = [
        (cfg.get("use_dora"), "DoRA (use_dora)"), (cfg.get("lora_bias"), "LoRA bias (lora_bias)"),
        (cfg.get("bias", "none") not in (None, "none"), f"bias={cfg.get('bias')!r}"),
        (cfg.get("modules_to_save"), "modules_to_save"), (cfg.get("fan_in_fan_out"), "fan_in_fan_out"),
        (cfg.get("alora_invocation_tokens"), "Activated LoRA (alora_invocation_tokens)"),
        (cfg.get("layer_replication"), "layer_replication"), (cfg.get("use_bdlora"), "block-diagonal LoRA"),
        (cfg.get("use_qalora"), "QALoRA"), (cfg.get("target_parameters"), "target_parameters"),
        (cfg.get("trainable_token_indices"), "trainable_token_indices"),
    ]
    out += [what for flag, what in checks if flag]
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in PLAIN_INITS:
        out.append(f"init_lora_weights={init!r} (it changes the base weights)")
    return out


def _matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a string is a regex on the full module name; a list entry matches the name or its suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _compile(pattern: str, field: str) -> re.Pattern:
    try:
        return re.compile(rf"(.*\.)?({pattern})$") if field == "rank_pattern" else re.compile(pattern)
    except re.error as exc:
        raise _reject_config(f"{field}: {pattern!r} is not a valid regular expression ({exc})") from None


def _layer_of(name: str) -> int:
    return int(name.split(".")[2])  # "model.layers.{i}...."


def check_config(raw: bytes, shapes: BaseModelShapes, settings: Settings) -> LoraSpec:
    if len(raw) > MAX_CONFIG_BYTES:
        raise _reject_config(f"larger than {MAX_CONFIG_BYTES} bytes")
    try:
        cfg = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _reject_config(f"not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise _reject_config("must be a JSON object")
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise _reject_config(f"peft_type is {cfg.get('peft_type')!r}; only LORA adapters are served")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not _positive_int(rank):
        raise _reject_config(f"r must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise _reject_config(f"lora_alpha must be a positive number, got {alpha!r}")
    unsupported = _unsupported(cfg)
    if unsupported:
        raise _reject_config(f"vLLM cannot serve {', '.join(unsupported)}")
    rank_pattern = cfg.get("rank_pattern") or {}
    if not isinstance(rank_pattern, dict) or not all(_positive_int(v) for v in rank_pattern.values()):
        raise _reject_config("rank_pattern must map module patterns to positive integers")
    for key in rank_pattern:
        _compile(key, "rank_pattern")
    problem = rank_problem(max([rank, *rank_pattern.values()]), settings)
    if problem:
        raise UploadRejected(f"{ADAPTER_CONFIG}: {problem}", param=ADAPTER_CONFIG, code="rank_too_high")

    modules = _targeted_modules(cfg, shapes)
    ranks = {}
    for name in modules:
        # vLLM's and PEFT's pattern rule: a key matches a suffix of the module name at a "." boundary.
        pattern_rank = next((r for key, r in rank_pattern.items()
                             if re.match(rf"(.*\.)?({key})$", name) is not None), None)
        ranks[name] = pattern_rank or rank
    return LoraSpec(cfg, rank, ranks)


def _targeted_modules(cfg: dict[str, Any], shapes: BaseModelShapes) -> list[str]:
    targets = cfg.get("target_modules")
    all_names = list(shapes.module_names())
    if targets == "all-linear":
        targets = [path.split(".")[-1] for path in shapes.linear]
    if isinstance(targets, str):
        _compile(targets, "target_modules")
    elif not (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        raise _reject_config("target_modules must be a non-empty list of module names or a regular expression")
    else:
        projections = sorted({p.split(".")[-1] for p in shapes.linear})
        unknown = [t for t in targets if not any(_matches(n, [t]) for n in all_names)]
        if unknown:
            raise UploadRejected(
                f"{ADAPTER_CONFIG}: target modules {unknown} are not LoRA-targetable layers of the base model"
                f" (its projections: {projections})", param=ADAPTER_CONFIG, code="unknown_target_module")
    names = [n for n in all_names if _matches(n, targets)]
    exclude = cfg.get("exclude_modules")
    if exclude:
        if not (isinstance(exclude, str) and _compile(exclude, "exclude_modules")
                or isinstance(exclude, list) and all(isinstance(e, str) for e in exclude)):
            raise _reject_config("exclude_modules must be a list of module names or a regular expression")
        names = [n for n in names if not _matches(n, exclude)]
    layers = cfg.get("layers_to_transform")
    if layers is not None:
        layers = [layers] if isinstance(layers, int) else layers
        if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise _reject_config("layers_to_transform must be an integer or a list of integers")
        names = [n for n in names if _layer_of(n) in layers]
    if not names:
        raise UploadRejected(f"{ADAPTER_CONFIG}: target_modules {targets!r} match no projection of the base model",
                             param=ADAPTER_CONFIG, code="unknown_target_module")
    return names


# ---------------------------------------------------------------- adapter_model.safetensors
def _reject_weights(message: str) -> UploadRejected:
    return UploadRejected(f"{ADAPTER_WEIGHTS}: {message}", param=ADAPTER_WEIGHTS)


def read_safetensors_header(data: bytes) -> dict[str, tuple[str, list[int]]]:
    """tensor name -> (dtype, shape), after checking the header describes the file exactly."""
    if len(data) < 8:
        raise _reject_weights("too short to be a safetensors file")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(MAX_HEADER_BYTES, len(data) - 8):
        raise _reject_weights(f"the header claims {size} bytes; the file holds {len(data) - 8}")
    try:
        header = json.loads(data[8:8 + size])
    except (ValueError, UnicodeDecodeError):
        raise _reject_weights("the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _reject_weights("the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise _reject_weights("__metadata__ must map strings to strings")
    data_len = len(data) - 8 - size
    tensors, spans = {}, []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise _reject_weights(f"tensor {name!r} has no description")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise _reject_weights(f"tensor {name!r} has dtype {dtype!r}; LoRA weights must be one of"
                                  f" {sorted(DTYPE_BYTES)}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            raise _reject_weights(f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_len):
            raise _reject_weights(f"tensor {name!r} has data offsets {offsets!r} outside the file")
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * DTYPE_BYTES[dtype]:
            raise _reject_weights(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes of data for shape {shape}"
                                  f" in {dtype}")
        tensors[name] = (dtype, shape)
        spans.append(offsets)
    # The tensors must cover the data exactly once: no overlap (two names, one buffer), no hidden bytes.
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise _reject_weights("the tensors' data overlap or leave gaps: the file was not written by safetensors")
        position = end
    if position != data_len:
        raise _reject_weights(f"{data_len - position} bytes after the last tensor: the file was not written by"
                              " safetensors")
    return tensors


def check_tensors(tensors: dict[str, tuple[str, list[int]]], spec: LoraSpec, shapes: BaseModelShapes) -> None:
    module_shapes = shapes.module_names()
    expected = {}
    for module, rank in spec.modules.items():
        d_in, d_out = module_shapes[module]
        expected[f"{PEFT_PREFIX}{module}.lora_A.weight"] = [rank, d_in]
        expected[f"{PEFT_PREFIX}{module}.lora_B.weight"] = [d_out, rank]
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise UploadRejected(f"{ADAPTER_WEIGHTS}: {len(unexpected)} tensors that {ADAPTER_CONFIG} does not imply"
                             f" for this base model, e.g. {unexpected[:3]}", param=ADAPTER_WEIGHTS,
                             code="adapter_mismatch")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise UploadRejected(f"{ADAPTER_WEIGHTS}: {len(missing)} tensors missing for the targeted modules, e.g."
                             f" {missing[:3]}", param=ADAPTER_WEIGHTS, code="adapter_mismatch")
    for name, want in expected.items():
        got = tensors[name][1]
        if got != want:
            raise UploadRejected(f"{ADAPTER_WEIGHTS}: {name} has shape {got}; rank and base model need {want}",
                                 param=ADAPTER_WEIGHTS, code="adapter_mismatch")


# ---------------------------------------------------------------- all of it
def check_upload(files: dict[str, bytes], shapes: BaseModelShapes, settings: Settings,
                 base_model_name_or_path: str) -> CheckedAdapter:
    """The files to write for an upload (named by adapters/layout.py), or UploadRejected."""
    total = sum(len(c) for c in files.values())
    if total > settings.max_upload_bytes:
        raise _too_large(settings.max_upload_bytes)
    raw_config, weights = select_files(files)
    spec = check_config(raw_config, shapes, settings)
    check_tensors(read_safetensors_header(weights), spec, shapes)
    config = dict(spec.raw)
    uploaded_base = config.get("base_model_name_or_path")
    config["base_model_name_or_path"] = base_model_name_or_path
    config["inference_mode"] = True
    return CheckedAdapter(
        files={ADAPTER_CONFIG: json.dumps(config, indent=2, sort_keys=True).encode(), ADAPTER_WEIGHTS: weights},
        summary={"source": "upload", "rank": spec.rank, "lora_alpha": config["lora_alpha"],
                 "modules": len(spec.modules), "weights_bytes": len(weights),
                 "weights_sha256": hashlib.sha256(weights).hexdigest(),
                 "uploaded_base_model": uploaded_base})
