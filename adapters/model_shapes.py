"""The LoRA-targetable linear layers of a base model and their shapes, read from its config.json (no torch).

Llama-family decoders (Llama, Mistral, Qwen2/3) name and size their projections the same way; the upload check
(adapters/upload_check.py) validates an uploaded adapter's tensors against this table, and the benchmarks write
random adapters from it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# model_type values whose decoder layers are `model.layers.{i}.self_attn.{q,k,v,o}_proj` + `mlp.{gate,up,down}_proj`.
LLAMA_LIKE = frozenset({"llama", "mistral", "qwen2", "qwen3"})


class UnsupportedBaseModel(ValueError):
    """The base model's config.json is missing, unreadable or of a family this table does not describe."""


@dataclass(frozen=True)
class BaseModelShapes:
    num_layers: int
    # module path inside a layer ("self_attn.q_proj") -> (in_features, out_features)
    linear: dict[str, tuple[int, int]]

    def module_names(self) -> dict[str, tuple[int, int]]:
        """Every targetable module by its full name as PEFT sees it ("model.layers.0.self_attn.q_proj")."""
        return {f"model.layers.{i}.{path}": shape
                for i in range(self.num_layers) for path, shape in self.linear.items()}

    @classmethod
    def from_config(cls, config: dict) -> "BaseModelShapes":
        model_type = config.get("model_type")
        if model_type not in LLAMA_LIKE:
            raise UnsupportedBaseModel(f"base model type {model_type!r} is not one of {sorted(LLAMA_LIKE)}")
        try:
            hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
            heads, layers = int(config["num_attention_heads"]), int(config["num_hidden_layers"])
            kv = int(config.get("num_key_value_heads") or heads)
            head_dim = int(config.get("head_dim") or hidden // heads)
        except (KeyError, TypeError, ValueError) as exc:
            raise UnsupportedBaseModel(f"base model config.json lacks a dimension: {exc}") from None
        q, k = heads * head_dim, kv * head_dim
        return cls(layers, {
            "self_attn.q_proj": (hidden, q), "self_attn.k_proj": (hidden, k), "self_attn.v_proj": (hidden, k),
            "self_attn.o_proj": (q, hidden),
            "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter), "mlp.down_proj": (inter, hidden),
        })

    @classmethod
    def from_model_dir(cls, model_dir: Path | str) -> "BaseModelShapes":
        path = Path(model_dir) / "config.json"
        try:
            return cls.from_config(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            if isinstance(exc, UnsupportedBaseModel):
                raise
            raise UnsupportedBaseModel(f"cannot read the base model's {path}: {exc}") from None
