"""A diffusion model served by our own `BidirectionalTransformer`, plus the checkpoint plumbing that
the Dream, LLaDA and native loaders share (config reading, safetensors shards, tokenizer loading,
special ids). Nothing here runs code shipped with a checkpoint (`trust_remote_code` stays off)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from editor.chat import Conversation, Instruction, plain_framing
from editor.models.base import CanvasCache, SpecialIds
from editor.models.graphs import DEFAULT_MAX_GRAPHS, DEFAULT_MAX_SLABS, WindowGraphs
from editor.models.quantize import quantize_linears, weight_bytes
from editor.models.transformer import BidirectionalTransformer, TransformerConfig

NATIVE_TYPE = "editor-dlm"
_SAVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEFAULT_INSTRUCTION = "Fill in the blanks of the document."
# Only used when a chat template cannot be rendered to find its end-of-turn marker.
_END_OF_TURN_NAMES = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelLoadError(ValueError):
    """A checkpoint is missing, incomplete, or in a format we cannot load."""


# --------------------------------------------------------------------------- checkpoint files


def resolve_checkpoint(spec: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """A local directory as is; otherwise a Hugging Face id resolved through `snapshot_download`,
    which honours HF_HUB_OFFLINE and the local cache."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"{path}: expected a model directory, found a file")
    text = str(spec)
    if text.startswith((".", "/", "~")) or not _HF_ID.match(text):
        raise ModelLoadError(f"{path}: no such model directory")
    import huggingface_hub  # local import: only needed for hub ids

    try:
        return Path(huggingface_hub.snapshot_download(repo_id=text, allow_patterns=allow_patterns))
    except Exception as error:  # offline without cache, unknown repo, network failure...
        raise ModelLoadError(
            f"{text}: not a local directory and could not be fetched from the hub ({error})"
        ) from error


def read_config(path: Path) -> dict[str, Any]:
    """The checkpoint's config.json as a dict."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path}: missing config.json")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{config_file}: not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file}: expected a JSON object")
    return config


def require(config: Mapping[str, Any], key: str, path: Path) -> Any:
    if config.get(key) is None:
        raise ModelLoadError(f"{path}: config.json lacks {key!r}")
    return config[key]


def safetensors_files(path: Path) -> list[Path]:
    """The weight files: those named by model.safetensors.index.json, else every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{path}: shards named in {index.name} are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weight files")
    return files


def load_tensors(
    path: Path,
    rename: Callable[[str], str | None],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> dict[str, torch.Tensor]:
    """Read every shard, renaming keys into our module's names (None = skip the tensor) and casting
    floating tensors to `dtype` one at a time, so peak memory stays near the final model size."""
    tensors: dict[str, torch.Tensor] = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                name = rename(key)
                if name is None:
                    continue
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                tensors[name] = tensor.to(device)
    return tensors


# Above this many parameters a network is built on `meta` (every 7B/8B load); see `build_network`.
META_BUILD_PARAMETERS = 100_000_000


def build_network(
    config: TransformerConfig,
    tensors: dict[str, torch.Tensor],
    path: Path,
    *,
    meta_above: int = META_BUILD_PARAMETERS,
) -> BidirectionalTransformer:
    """Our transformer holding exactly `tensors`. Models of more than `meta_above` parameters start
    on `meta` so no memory or time goes into a random init, and take the weights with `assign=True`;
    small ones start on the CPU, because the first `meta` op costs ~1 s of one-off set-up, more than
    initialising a small model (the bundled one loads in well under 1 s)."""
    parameters = sum(t.numel() for t in tensors.values())
    with torch.device("meta" if parameters > meta_above else "cpu"):
        network = BidirectionalTransformer(config)
    expected = set(network.state_dict())
    if config.tie_embeddings:
        expected.discard("lm_head.weight")
        head = tensors.pop("lm_head.weight", None)
        embedding = tensors.get("embed_tokens.weight")
        if head is not None and embedding is not None and not torch.equal(head, embedding):
            raise ModelLoadError(
                f"{path}: config.json ties the output head to the embedding, but the checkpoint has its own "
                "output head weights (the tying setting does not match the weights)"
            )
    missing = sorted(expected - tensors.keys())
    unexpected = sorted(tensors.keys() - expected)
    if missing or unexpected:
        raise ModelLoadError(
            f"{path}: weights do not match the architecture; missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    try:
        network.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as error:  # shape mismatches between config.json and the weights
        raise ModelLoadError(f"{path}: weights disagree with config.json: {error}") from error
    if config.tie_embeddings:
        network.lm_head.weight = network.embed_tokens.weight
    return network.eval()


def default_dtype(device: torch.device | str, dtype: torch.dtype | None) -> torch.dtype:
    """bfloat16 on accelerators and on CPUs that multiply it natively, float32 on other CPUs, unless told."""
    if dtype is not None:
        return dtype
    if torch.device(device).type != "cpu":
        return torch.bfloat16
    return torch.bfloat16 if cpu_multiplies_bfloat16() else torch.float32


def cpu_multiplies_bfloat16() -> bool:
    """Whether this CPU has bfloat16 dot products (AVX512-BF16 or AMX). There a bfloat16 matrix
    product ran 4x float32's (2-core AMD EPYC: 378 against 96 GFLOP/s) at the same bits per
    character; elsewhere bfloat16 is converted to float32 op by op and is slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own probes
    return any(bool(getattr(torch.cpu, check, lambda: False)()) for check in checks)


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer without running its code. Dream ships a custom `DreamTokenizer`
    class; its files are a plain tokenizer.json or Qwen2 BPE (vocab.json + merges.txt)."""
    try:
        # A blank config: Dream/LLaDA/native config.json files are not transformers configs, and
        # letting AutoTokenizer parse them only produces warnings.
        return AutoTokenizer.from_pretrained(
            str(path), config=PretrainedConfig(), trust_remote_code=False, local_files_only=True
        )
    except Exception as first_error:  # custom tokenizer class, or no tokenizer at all
        try:
            if (path / "tokenizer.json").is_file():
                return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
            if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
                from transformers import Qwen2Tokenizer

                return Qwen2Tokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as error:
            raise ModelLoadError(f"{path}: cannot load the tokenizer ({error})") from error
        raise ModelLoadError(f"{path}: no usable tokenizer files ({first_error})") from first_error


def _special_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(index for index, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The special token a chat template writes right after an assistant message (`<|im_end|>`
    for Qwen/Dream, `<|eot_id|>` for LLaDA), read off the template itself. Only the first: what
    follows it opens the next turn (LLaDA's template always appends `<|start_header_id|>assistant`)."""
    if not tokenizer.chat_template:
        return ()
    sentinel = "zqxsentinel"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}], tokenize=False
        )
    except Exception:  # templates may reject this conversation; fall back to known names
        text = None
    if isinstance(text, str) and sentinel in text:
        tail = text[text.rindex(sentinel) + len(sentinel) :]
        specials = _special_token_ids(tokenizer)
        first = tokenizer(tail, add_special_tokens=False)["input_ids"][:1]
        if first and first[0] in specials:
            return (int(first[0]),)
    added = tokenizer.get_added_vocab()
    return tuple(added[name] for name in _END_OF_TURN_NAMES if name in added)[:1]


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def special_ids_from(
    config: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, path: Path, *, instruct: bool
) -> SpecialIds:
    """Special ids from config.json first (the model's own truth), then the tokenizer."""
    mask = _first_id(config.get("mask_token_id"))
    if mask is None:
        mask = tokenizer.mask_token_id
    if mask is None:
        raise ModelLoadError(f"{path}: no mask token (config.json mask_token_id or tokenizer mask_token)")
    eos_values = config.get("eos_token_id")
    eos = _first_id(eos_values)
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = _first_id(config.get("pad_token_id"))
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise ModelLoadError(f"{path}: no pad or eos token id")
    # The tokenizer's bos is what the model saw at the start of text; config.json may only echo eos.
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else _first_id(config.get("bos_token_id"))
    extra = [int(v) for v in eos_values[1:]] if isinstance(eos_values, list) else []
    if instruct:
        extra.extend(end_of_turn_ids(tokenizer))
    extra_end = tuple(dict.fromkeys(i for i in extra if i not in (pad, eos)))
    return SpecialIds(mask=int(mask), pad=int(pad), bos=bos, eos=eos, extra_end=extra_end)


# --------------------------------------------------------------------------- the model

# A graphed window run of up to this many FLOPs takes in a refresh (`refresh_in_window`): about 2 ms of
# an H100's bf16 arithmetic, what an eager full pass of a ~30-layer model costs in launches alone.
# The bundled and default models (17M, 135M) fold up to 8 rows of 512; a 7B model only when its rows
# hold under ~150 positions in all.
FOLD_REFRESH_FLOPS = 2e12


class NativeDiffusionModel:
    """`DiffusionModel` over a `BidirectionalTransformer` (Dream, LLaDA and our own checkpoints)."""

    def __init__(
        self,
        network: BidirectionalTransformer,
        tokenizer: PreTrainedTokenizerBase,
        special: SpecialIds,
        *,
        logits_shifted: bool,
        name: str,
        use_chat_template: bool | None = None,
        bos_in_base_frame: bool = True,
    ) -> None:
        self.network = network.eval()
        self.tokenizer = tokenizer
        self.special = special
        self.logits_shifted = logits_shifted
        self.name = name
        self.vocab_size = network.config.vocab_size
        # Instruct models are framed with their chat template; base models with a bare bos (Dream, ours)
        # or as plain text (LLaDA). The loaders decide which (checkpoints.checkpoint_is_chat); None is
        # for our own checkpoints, whose tokenizer carries a template only when the model is chat-tuned.
        self.use_chat_template = bool(tokenizer.chat_template) if use_chat_template is None else use_chat_template
        self.bos_in_base_frame = bos_in_base_frame
        self._end_of_turn = end_of_turn_ids(tokenizer) if self.use_chat_template else ()
        self.window_graphs: WindowGraphs | None = None  # set by `use_cuda_graphs` (CUDA only)
        # Arithmetic under which a refresh of some rows rides in the window run (`refresh_in_window`);
        # 0: never. Set with the CUDA graphs, where a small model's steps are paced by launches.
        self.fold_refresh_flops = 0.0
        self._layer_parameters = sum(p.numel() for p in network.layers.parameters())
        self.quantize = "none"  # how the blocks' linear weights are stored (`quantize_weights`)

    def quantize_weights(self, mode: str, device: torch.device | str | None = None) -> None:
        """Store the blocks' linear layers as `mode` ('none', 'int8', 'fp8'; editor.models.quantize).
        With `device`, the network (loaded elsewhere, e.g. on the CPU) moves there one block at a
        time, each quantized on arrival, so the device never holds more than one block unquantized.
        Before `use_cuda_graphs`: graphs hold the weights' addresses."""
        network = self.network
        for layer in network.layers:
            if device is not None:
                layer.to(device)
            quantize_linears(layer, mode)
        if device is not None:
            for module in (network.embed_tokens, network.norm, network.lm_head):  # a tied head moves once
                module.to(device)
        self.quantize = mode

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights in memory (quantized weights counted as stored)."""
        return weight_bytes(self.network)

    def use_cuda_graphs(self, max_graphs: int = DEFAULT_MAX_GRAPHS, max_slabs: int = DEFAULT_MAX_SLABS) -> None:
        """Replay window steps as CUDA graphs (at most `max_graphs` kept, over at most `max_slabs`
        batch shapes; 0 graphs: never). Does nothing off CUDA. Call it after moving the model:
        the graphs hold device addresses."""
        on_cuda = self.device.type == "cuda"
        self.window_graphs = (
            WindowGraphs(self.network, max_graphs=max_graphs, max_slabs=max_slabs) if on_cuda and max_graphs else None
        )
        self.fold_refresh_flops = FOLD_REFRESH_FLOPS if self.window_graphs is not None else 0.0

    def refresh_in_window(self, rows: int, width: int) -> bool:
        """Whether a step where some of `rows` rows refresh their cache should be one window run of
        `rows` x `width` positions, the refreshing rows' windows widened to their whole canvas (which
        recomputes every key/value a full pass would), rather than the others' window run plus an
        eager full pass of those rows. Yes when the wider run's arithmetic is under
        `fold_refresh_flops`: a small model's graphed step is paced by launches, not arithmetic."""
        return 2 * self._layer_parameters * rows * width <= self.fold_refresh_flops

    @property
    def device(self) -> torch.device:
        return self.network.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.network.embed_tokens.weight.dtype

    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L], attention_mask [B, L] bool -> float32 logits [B, L, V]."""
        with torch.inference_mode():
            ids = input_ids.to(self.device)
            mask = attention_mask.to(self.device, torch.bool)
            # Positions count real tokens only, so left padding does not shift a row (as Dream does).
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]
            logits = self.network(ids, attention_mask=mask, position_ids=positions)
            assert isinstance(logits, torch.Tensor)
            return logits.float()

    def score(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, at: torch.Tensor, *, keep_cache: bool
    ) -> tuple[torch.Tensor, CanvasCache | None]:
        """A full pass; logits [B, M, V] (model dtype) only at `at` [B, M], and optionally the cache."""
        positions = self._positions(input_ids, attention_mask)
        out = self.network(
            input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            return_kv=keep_cache,
            hidden_at=self._output_index(at),
        )
        if not keep_cache:
            assert isinstance(out, torch.Tensor)
            return out, None
        assert isinstance(out, tuple)
        logits, layers = out
        # The window kv of a full pass are views of fresh projections: owned, safe to update in place.
        return logits, CanvasCache([(k.contiguous(), v.contiguous()) for k, v in layers], positions, attention_mask)

    def score_window(
        self, cache: CanvasCache, input_ids: torch.Tensor, window: torch.Tensor, at: torch.Tensor
    ) -> torch.Tensor:
        """Logits [B, M, V] at `at` from a run of `window` [B, W] against the cache (see WindowedModel)."""
        batch, width = window.shape
        # slot[b, p] = index of canvas position p in the window (positions outside it: 0, unread).
        slot = torch.zeros_like(input_ids).scatter_(
            1, window, torch.arange(width, device=window.device).expand(batch, -1)
        )
        ids, positions = input_ids.gather(1, window), cache.positions.gather(1, window)
        hidden_at = slot.gather(1, self._output_index(at))
        if self.window_graphs is not None:
            logits = self.window_graphs.run(cache, ids, window, positions, hidden_at)
            if logits is not None:
                return logits
        return self.network.forward_window(cache.layers, ids, window, positions, cache.attention, hidden_at=hidden_at)

    def _output_index(self, at: torch.Tensor) -> torch.Tensor:
        """The output rows that score canvas positions `at` (one to the left for a shifted model)."""
        return (at - 1).clamp(min=0) if self.logits_shifted else at

    @staticmethod
    def _positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            batch, length = input_ids.shape
            return torch.arange(length, device=input_ids.device).expand(batch, length)
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def frame(self, instruction: Instruction | None = None) -> tuple[list[int], list[int]]:
        if not self.use_chat_template:
            bos = [self.special.bos] if self.special.bos is not None and self.bos_in_base_frame else []
            if isinstance(instruction, Conversation):  # no template: the documented plain framing
                text = plain_framing(instruction.messages)
                return bos + list(self.tokenizer(text, add_special_tokens=False)["input_ids"]), []
            return bos, []
        if isinstance(instruction, Conversation):
            messages = instruction.as_dicts()
        else:
            messages = [{"role": "user", "content": instruction or DEFAULT_INSTRUCTION}]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert isinstance(text, str)
        prefix = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        suffix = list(self._end_of_turn) or ([self.special.eos] if self.special.eos is not None else [])
        return prefix, suffix

    def __repr__(self) -> str:
        return (
            f"NativeDiffusionModel(name={self.name!r}, params={self.network.num_parameters():,}, device={self.device})"
        )


def dtype_text(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16': how configs, reports and /ready write a dtype."""
    return str(dtype).removeprefix("torch.")


def save_native_tensors(
    tensors: dict[str, torch.Tensor],
    model_config: TransformerConfig,
    tokenizer: PreTrainedTokenizerBase,
    special: SpecialIds,
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float16,
    logits_shifted: bool = False,
) -> Path:
    """`save_native` for a state dict (our names) and its config."""
    if dtype not in _SAVE_DTYPES:
        raise ValueError(f"save dtype must be one of {_SAVE_DTYPES}, not {dtype}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": NATIVE_TYPE,
        **model_config.to_dict(),
        "mask_token_id": special.mask,
        "pad_token_id": special.pad,
        "bos_token_id": special.bos,
        "eos_token_id": special.eos,
        "extra_end_token_ids": list(special.extra_end),
        "logits_shifted": logits_shifted,
        "torch_dtype": dtype_text(dtype),
    }
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(str(path))
    state = {
        key: tensor.detach().to("cpu", dtype).contiguous()
        for key, tensor in tensors.items()
        # A tied head is the embedding; safetensors refuses to store the shared tensor twice.
        if not (model_config.tie_embeddings and key == "lm_head.weight")
    }
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
