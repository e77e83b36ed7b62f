"""One entry point, `load_model`, for every checkpoint format we serve, and the native format
(`model_type: "editor-dlm"`) that the bundled model and the training command use."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from editor.models.adapter import ADAPTER_TYPE, merged_model_dir
from editor.models.base import DiffusionModel, SpecialIds
from editor.models.checkpoints import FAMILIES, load_checkpoint
from editor.models.gguf import BASE_SHA256, INSTALL_HINT, find_base_gguf
from editor.models.graphs import DEFAULT_MAX_GRAPHS, DEFAULT_MAX_SLABS
from editor.models.hf_masked import MaskedLMAdapter
from editor.models.native import (
    NATIVE_TYPE,
    ModelLoadError,
    NativeDiffusionModel,
    default_dtype,
    dtype_text,
    read_config,
    resolve_checkpoint,
    save_native_tensors,
)
from editor.models.quantize import check_quantize
from editor.models.transformer import BidirectionalTransformer
from editor.settings import Settings

DEFAULT_SPECS = ("default",)  # SmolLM2-135M + our LoRA adapter (falls back to tiny without the base)
TINY_SPECS = ("tiny", "bundled")  # the 17M model trained from scratch, shipped whole
# What a hub snapshot needs: configs, tokenizers, safetensors weights (not duplicate .bin/.pth).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


_log = logging.getLogger("editor.models")
_warned: set[str] = set()


def bundled_path(name: str = "tiny") -> Path:
    """A model directory shipped inside the package: `editor/bundled/tiny` (the whole 17M model) or
    `editor/bundled/default` (the LoRA adapter of the default model)."""
    return Path(str(resources.files("editor").joinpath("bundled", name)))


def _note_once(note: str) -> None:
    if note not in _warned:
        _warned.add(note)
        _log.warning(note)


def model_format(path: Path) -> str:
    """'dream', 'llada', 'native' or 'masked-lm', from config.json's model_type."""
    config = read_config(path)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelLoadError(f"{path}: config.json has no model_type")
    lowered = model_type.lower()
    if lowered == "dream":
        return "dream"
    if lowered == "llada":
        return "llada"
    if lowered == NATIVE_TYPE:
        return "native"
    if lowered == ADAPTER_TYPE:
        return "lora"
    return "masked-lm"


def _hub_snapshot(spec: str) -> Path:
    path = resolve_checkpoint(spec, allow_patterns=_HUB_PATTERNS)
    if not any(path.glob("*.safetensors")):  # older encoders ship only pytorch_model.bin
        path = resolve_checkpoint(spec, allow_patterns=[*_HUB_PATTERNS, "*.bin"])
    return path


def resolve_device(name: torch.device | str) -> torch.device | str:
    """ "auto" means CUDA when there is a GPU, else the CPU; anything else is taken as given."""
    if str(name) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_named(name: str | None) -> torch.dtype | None:
    """'float32', 'float16', 'bfloat16' -> that dtype; 'auto' or None -> None (the per-device default)."""
    if name is None or name == "auto":
        return None
    if name not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, not {name!r}")
    return _DTYPES[name]


def model_dtype_text(model: object) -> str:
    """The dtype a loaded model (or a wrapper that forwards attributes) computes in, as text;
    'unknown' for a model that does not say."""
    dtype = getattr(model, "dtype", None)
    return dtype_text(dtype) if isinstance(dtype, torch.dtype) else "unknown"


def load_configured(
    settings: Settings, *, model: str | None = None, device: str | None = None, quantize: str | None = None
) -> DiffusionModel:
    """The model the settings name (EDITOR_MODEL, EDITOR_DEVICE, EDITOR_DTYPE, EDITOR_QUANTIZE),
    with command-line overrides on top: the one way every command and the server load their model."""
    return load_model(
        model or settings.model,
        device=device or settings.device,
        dtype=dtype_named(settings.dtype),
        cuda_graphs=settings.cuda_graphs,
        cuda_graph_slabs=settings.cuda_graph_slabs,
        framing=settings.framing,
        quantize=quantize or settings.quantize,
    )


def model_weights_text(model: object) -> str | None:
    """How a loaded model's weights are stored and their bytes in memory, for /ready and logs:
    'weights 270.0 MB', 'int8 weights 150.3 MB' (None for a model that does not say)."""
    quantize, size = getattr(model, "quantize", None), getattr(model, "weight_bytes", None)
    if not isinstance(size, int):
        return None
    kind = f"{quantize} weights" if quantize not in (None, "none") else "weights"
    return f"{kind} {size / 1e6:,.1f} MB"


def load_model(
    spec: str | Path | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    cuda_graphs: int = DEFAULT_MAX_GRAPHS,
    cuda_graph_slabs: int = DEFAULT_MAX_SLABS,
    framing: str = "auto",
    quantize: str = "none",
) -> DiffusionModel:
    """`None`/"default" -> the default model (SmolLM2-135M + our adapter; the tiny model, with a
    note, when the base package is not installed); "tiny" -> the bundled 17M model; a directory ->
    by its config.json's model_type; anything else -> a Hugging Face id, fetched (or found in the
    cache) and dispatched the same way. `device` may be "auto". On CUDA, a native model replays its
    window steps as CUDA graphs (at most `cuda_graphs` kept, over `cuda_graph_slabs` batch shapes;
    0 graphs: off). `framing` ('auto', 'base', 'chat') says how a Dream or LLaDA checkpoint is framed
    (docs/models.md). `quantize` ('none', 'int8', 'fp8'; editor.models.quantize) stores the linear
    layers of the transformer blocks in fewer bits, after fusing and before any CUDA graph."""
    device = resolve_device(device)
    note = None
    if spec is None or str(spec) in DEFAULT_SPECS:
        path, name = bundled_path("default"), "default"
        if find_base_gguf() is None:
            note = (
                f"the default model needs its base weights ({INSTALL_HINT}); "
                "using the bundled tiny model instead, whose fills are much weaker"
            )
            _note_once(note)
            path, name = bundled_path("tiny"), "tiny"
    elif str(spec) in TINY_SPECS:
        path, name = bundled_path("tiny"), "tiny"
    else:
        local = Path(spec).expanduser()
        path = local if local.exists() else _hub_snapshot(str(spec))
        if not path.is_dir():
            raise ModelLoadError(f"{path}: expected a model directory, found a file")
        name = str(spec)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: the model is missing (no config.json)")
    kind = model_format(path)
    resolved = default_dtype(device, dtype)
    check_quantize(quantize, device, resolved)  # before seconds of loading
    # A quantized model is read into memory first and quantized block by block on its way to the
    # device, so the device never holds the whole unquantized model (docs/engine.md).
    read_on = "cpu" if quantize != "none" and kind != "masked-lm" else device
    if kind == "lora":
        gguf = find_base_gguf()
        if gguf is None:
            raise ModelLoadError(f"{path}: this adapter needs its base weights; install them with `{INSTALL_HINT}`")
        merged = merged_model_dir(path, gguf, BASE_SHA256)
        model: DiffusionModel = load_checkpoint(FAMILIES["native"], merged, device=read_on, dtype=resolved, name=name)
    elif kind in FAMILIES:
        model = load_checkpoint(FAMILIES[kind], path, device=read_on, dtype=resolved, name=name, framing=framing)
    else:
        model = MaskedLMAdapter.load(path, device=device, dtype=resolved, name=name)
    if isinstance(model, NativeDiffusionModel):
        model.network.fuse_projections()  # served, never trained: fewer, larger matrix products
    if isinstance(model, NativeDiffusionModel):
        model.quantize_weights(quantize, device=device if str(read_on) != str(device) else None)  # after fusing
    elif isinstance(model, MaskedLMAdapter):
        model.quantize_weights(quantize)
    if isinstance(model, NativeDiffusionModel):
        model.use_cuda_graphs(cuda_graphs, cuda_graph_slabs)
    model.note = note  # type: ignore[attr-defined]
    return model


def save_native(
    model: BidirectionalTransformer,
    tokenizer: PreTrainedTokenizerBase,
    special: SpecialIds,
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float16,
    logits_shifted: bool = False,
) -> Path:
    """Write config.json, the tokenizer files and model.safetensors (in `dtype`) into `path`."""
    tensors = dict(model.state_dict())
    return save_native_tensors(
        tensors, model.config, tokenizer, special, path, dtype=dtype, logits_shifted=logits_shifted
    )
