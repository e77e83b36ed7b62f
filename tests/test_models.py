"""Loaders against transformers' reference implementations, on tiny random checkpoints written in
each family's exact on-disk format (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from editor.models import (
    DREAM,
    LLADA,
    DiffusionModel,
    MaskedLMAdapter,
    ModelLoadError,
    NativeDiffusionModel,
    SpecialIds,
    aligned_logits,
    load_checkpoint,
    load_model,
    load_native,
    loading,
    save_native,
)
from editor.models.transformer import BidirectionalTransformer, TransformerConfig

# fmt: off
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "fill", "in", "blanks", "of", "document", "user",
         "assistant", "system", "hello", "world", ".", ","]
# fmt: on
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# LLaDA's template appends the assistant header whatever add_generation_prompt says (tests/published.py).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)
DREAM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"]
LLADA_SPECIALS = [
    "<|startoftext|>",
    "<|endoftext|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|mdm_mask|>",
]
MODEL_VOCAB = 48  # larger than the tokenizers' vocabularies, as real checkpoints pad theirs


# --------------------------------------------------------------------------- tiny tokenizers


def word_tokenizer(specials: list[str], chat_template: str | None = None, **roles: str) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: ids 0..len(WORDS) are [UNK] + words, then the specials."""
    vocab = {token: index for index, token in enumerate(["[UNK]", *WORDS, *specials])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **roles)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def dream_tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    # Like Dream's: bos/eos/pad named, but no mask_token (the id comes from config.json).
    return word_tokenizer(
        DREAM_SPECIALS,
        QWEN_TEMPLATE if chat else None,
        bos_token="<|beginoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def llada_tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    return word_tokenizer(
        LLADA_SPECIALS, LLAMA3_TEMPLATE if chat else None, bos_token="<|startoftext|>", eos_token="<|endoftext|>"
    )


def token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    return int(tokenizer.convert_tokens_to_ids(token))


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (biases and norm scales included), so no term can hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.1 * noise if "norm" in name else 0.2 * noise)


# --------------------------------------------------------------------------- checkpoint writers


def write_dream(directory: Path, *, chat: bool = False, seed: int = 0) -> Qwen2ForCausalLM:
    """A Dream-format checkpoint (Qwen2 keys, two shards + index) and the Qwen2 reference model."""
    tokenizer = dream_tokenizer(chat)
    config = Qwen2Config(
        vocab_size=MODEL_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    reference = Qwen2ForCausalLM(config).eval()
    randomize(reference, seed)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.contiguous() for key, value in reference.state_dict().items()}
    shard_a = {k: v for k, v in state.items() if ".layers.1." not in k}
    shard_b = {k: v for k, v in state.items() if ".layers.1." in k}
    save_file(shard_a, str(directory / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(shard_b, str(directory / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = dict.fromkeys(shard_a, "model-00001-of-00002.safetensors")
    weight_map |= dict.fromkeys(shard_b, "model-00002-of-00002.safetensors")
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    eos = token_id(tokenizer, "<|endoftext|>")
    dream_config = {
        "architectures": ["DreamModel"],
        "model_type": "Dream",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 10_000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-6,
        "vocab_size": MODEL_VOCAB,
        "tie_word_embeddings": False,
        "max_position_embeddings": 64,
        "mask_token_id": token_id(tokenizer, "<|mask|>"),
        "pad_token_id": eos,
        "eos_token_id": eos,
        "bos_token_id": eos,
        "auto_map": {"AutoModel": "modeling_dream.DreamModel"},
    }
    (directory / "config.json").write_text(json.dumps(dream_config))
    tokenizer.save_pretrained(str(directory))
    # Dream names a custom tokenizer class (remote code); loading must not need it.
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config |= {
        "tokenizer_class": "DreamTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return reference


LLADA_NAMES = {
    "self_attn.q_proj": "q_proj",
    "self_attn.k_proj": "k_proj",
    "self_attn.v_proj": "v_proj",
    "self_attn.o_proj": "attn_out",
    "mlp.gate_proj": "ff_proj",
    "mlp.up_proj": "up_proj",
    "mlp.down_proj": "ff_out",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ff_norm",
}


def to_llada_key(key: str) -> str:
    if key == "model.embed_tokens.weight":
        return "model.transformer.wte.weight"
    if key == "model.norm.weight":
        return "model.transformer.ln_f.weight"
    if key == "lm_head.weight":
        return "model.transformer.ff_out.weight"
    layer, rest = key.removeprefix("model.layers.").split(".", 1)
    module, kind = rest.rsplit(".", 1)
    return f"model.transformer.blocks.{layer}.{LLADA_NAMES[module]}.{kind}"


def write_llada(directory: Path, *, chat: bool = False, seed: int = 1) -> LlamaForCausalLM:
    """A LLaDA-format checkpoint (OLMo-style keys, config as LLaDA-8B's) and the Llama reference."""
    tokenizer = llada_tokenizer(chat)
    config = LlamaConfig(
        vocab_size=MODEL_VOCAB,
        hidden_size=32,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500_000.0},
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    reference = LlamaForCausalLM(config).eval()
    randomize(reference, seed)
    directory.mkdir(parents=True, exist_ok=True)
    state = {to_llada_key(k): v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    eos = token_id(tokenizer, "<|endoftext|>")
    llada_config = {  # rms_norm_eps left out on purpose: it must default to 1e-5
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "activation_type": "silu",
        "block_type": "llama",
        "layer_norm_type": "rms",
        "rope": True,
        "alibi": False,
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "mlp_hidden_size": 96,
        "mlp_ratio": 4,
        "rope_theta": 500_000.0,
        "vocab_size": MODEL_VOCAB,
        "embedding_size": MODEL_VOCAB,
        "include_bias": False,
        "include_qkv_bias": False,
        "weight_tying": False,
        "max_sequence_length": 64,
        "mask_token_id": token_id(tokenizer, "<|mdm_mask|>"),
        "eos_token_id": eos,
        "pad_token_id": eos,
    }
    (directory / "config.json").write_text(json.dumps(llada_config))
    tokenizer.save_pretrained(str(directory))
    return reference


def bert_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: index for index, token in enumerate(["[UNK]", *specials, *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def write_bert(directory: Path, seed: int = 2) -> BertForMaskedLM:
    tokenizer = bert_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = BertForMaskedLM(config).eval()
    randomize(model, seed)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return model


# --------------------------------------------------------------------------- helpers


def bidirectional_mask(valid: torch.Tensor) -> torch.Tensor:
    """[B, L] bool -> additive [B, 1, L, L] float mask: every query sees every real key.
    transformers passes a 4D mask through unchanged, so the reference model runs non-causally."""
    blocked = torch.finfo(torch.float32).min
    keys = torch.where(valid, 0.0, blocked)[:, None, None, :]  # [B, 1, 1, L]
    return keys.expand(-1, 1, valid.shape[1], -1).contiguous()


def reference_logits(model: torch.nn.Module, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=bidirectional_mask(valid), position_ids=positions).logits


def padded_batch(rows: list[list[int]], pad: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for index, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[index, span] = torch.tensor(row)
        valid[index, span] = True
    return ids, valid


ROWS = [[3, 7, 1, 12, 5, 9, 2, 4], [6, 2, 11, 8, 3]]


def assert_matches_reference(model: DiffusionModel, reference: torch.nn.Module) -> None:
    ids, valid = padded_batch(ROWS, pad=model.special.pad)
    ours = model.forward_logits(ids, valid)
    theirs = reference_logits(reference, ids, valid)
    assert ours.dtype == torch.float32 and ours.shape == (2, ids.shape[1], MODEL_VOCAB)
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-4, rtol=1e-4)


def assert_bidirectional(model: DiffusionModel, reference: torch.nn.Module) -> None:
    """Changing the LAST token must change the FIRST position's logits, in both models."""
    ids = torch.tensor([ROWS[0]])
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 20
    valid = torch.ones_like(ids, dtype=torch.bool)
    for run in (lambda x: model.forward_logits(x, valid), lambda x: reference_logits(reference, x, valid)):
        assert not torch.allclose(run(ids)[0, 0], run(changed)[0, 0], atol=1e-6)


# --------------------------------------------------------------------------- (a) Dream


def test_dream_matches_qwen2_reference(tmp_path: Path) -> None:
    reference = write_dream(tmp_path / "dream")
    model = load_checkpoint(DREAM, tmp_path / "dream")
    assert isinstance(model, NativeDiffusionModel) and isinstance(model, DiffusionModel)
    assert model.logits_shifted and model.vocab_size == MODEL_VOCAB
    assert model.network.config.qkv_bias  # Qwen2's q/k/v biases were found in the weights
    assert_matches_reference(model, reference)
    assert_bidirectional(model, reference)


def test_dream_special_ids_come_from_config_and_tokenizer(tmp_path: Path) -> None:
    write_dream(tmp_path / "dream")
    model = load_checkpoint(DREAM, tmp_path / "dream")
    tokenizer = model.tokenizer
    assert tokenizer.mask_token_id is None  # so the mask id can only have come from config.json
    assert model.special.mask == token_id(tokenizer, "<|mask|>")
    assert model.special.pad == model.special.eos == token_id(tokenizer, "<|endoftext|>")
    assert model.special.bos == token_id(tokenizer, "<|beginoftext|>")
    assert model.frame(None) == ([model.special.bos], [])  # a base model: bos only


# --------------------------------------------------------------------------- (b) LLaDA


def test_llada_matches_llama_reference(tmp_path: Path) -> None:
    reference = write_llada(tmp_path / "llada")
    model = load_checkpoint(LLADA, tmp_path / "llada")
    assert not model.logits_shifted
    assert model.network.config.rms_norm_eps == 1e-5 and model.network.config.intermediate_size == 96
    assert not model.network.config.qkv_bias
    assert_matches_reference(model, reference)
    assert_bidirectional(model, reference)
    tokenizer = model.tokenizer
    assert model.special.mask == token_id(tokenizer, "<|mdm_mask|>")
    assert model.special.eos == model.special.pad == token_id(tokenizer, "<|endoftext|>")


def test_llada_rejects_unsupported_block(tmp_path: Path) -> None:
    write_llada(tmp_path / "llada")
    config_file = tmp_path / "llada" / "config.json"
    config = json.loads(config_file.read_text())
    config["activation_type"] = "swiglu"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="activation_type"):
        load_checkpoint(LLADA, tmp_path / "llada")


# --------------------------------------------------------------------------- (c) masked LM


def test_masked_lm_adapter_matches_bert(tmp_path: Path) -> None:
    reference = write_bert(tmp_path / "bert")
    model = load_model(tmp_path / "bert")
    assert isinstance(model, MaskedLMAdapter) and isinstance(model, DiffusionModel)
    assert not model.logits_shifted
    tokenizer = model.tokenizer
    assert model.special.mask == tokenizer.mask_token_id == token_id(tokenizer, "[MASK]")
    assert model.special.pad == tokenizer.pad_token_id
    assert model.frame("ignored") == ([tokenizer.cls_token_id], [tokenizer.sep_token_id])
    ids, valid = padded_batch(ROWS, pad=model.special.pad)
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=valid.long()).logits
    torch.testing.assert_close(model.forward_logits(ids, valid), theirs, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- (d) padding


@pytest.mark.parametrize("left", [False, True])
def test_padding_does_not_change_a_row(tmp_path: Path, left: bool) -> None:
    write_dream(tmp_path / "dream")
    model = load_checkpoint(DREAM, tmp_path / "dream")
    ids, valid = padded_batch(ROWS, pad=model.special.pad, left=left)
    batched = model.forward_logits(ids, valid)[1][valid[1]]
    short = torch.tensor([ROWS[1]])
    alone = model.forward_logits(short, torch.ones_like(short, dtype=torch.bool))[0]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_masked_lm_padding_does_not_change_a_row(tmp_path: Path) -> None:
    write_bert(tmp_path / "bert")
    model = load_model(tmp_path / "bert")
    ids, valid = padded_batch(ROWS, pad=model.special.pad)
    batched = model.forward_logits(ids, valid)[1][valid[1]]
    short = torch.tensor([ROWS[1]])
    alone = model.forward_logits(short, torch.ones_like(short, dtype=torch.bool))[0]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- (e) dispatch


def native_checkpoint(directory: Path, dtype: torch.dtype = torch.float32) -> BidirectionalTransformer:
    tokenizer = word_tokenizer(["<|endoftext|>", "<|beginoftext|>", "<|mask|>"], bos_token="<|beginoftext|>")
    config = TransformerConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64
    )
    network = BidirectionalTransformer(config).eval()
    randomize(network, 3)
    special = SpecialIds(
        mask=token_id(tokenizer, "<|mask|>"),
        pad=token_id(tokenizer, "<|endoftext|>"),
        bos=token_id(tokenizer, "<|beginoftext|>"),
        eos=token_id(tokenizer, "<|endoftext|>"),
    )
    save_native(network, tokenizer, special, directory, dtype=dtype)
    return network


def test_native_round_trip(tmp_path: Path) -> None:
    network = native_checkpoint(tmp_path / "native")
    model = load_native(tmp_path / "native")
    assert not model.logits_shifted and model.special.bos is not None
    ids, valid = padded_batch(ROWS, pad=model.special.pad)
    with torch.no_grad():
        expected = network(ids, attention_mask=valid)[valid]
    torch.testing.assert_close(model.forward_logits(ids, valid)[valid], expected, atol=1e-5, rtol=1e-5)


def test_native_saved_in_half_precision(tmp_path: Path) -> None:
    native_checkpoint(tmp_path / "native", dtype=torch.bfloat16)
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    assert config["model_type"] == "editor-dlm" and config["logits_shifted"] is False
    assert config["torch_dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "native" / "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("embed_tokens.weight").dtype == torch.bfloat16
    assert load_model(tmp_path / "native").dtype == torch.float32  # type: ignore[attr-defined]  # the suite's CPU default


@pytest.mark.parametrize("native_bfloat16", [True, False])
def test_the_cpu_default_dtype_is_bfloat16_only_where_the_cpu_multiplies_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native_bfloat16: bool
) -> None:
    from editor.models import native

    monkeypatch.setattr(native, "cpu_multiplies_bfloat16", lambda: native_bfloat16)
    native_checkpoint(tmp_path / "native", dtype=torch.float16)
    model = load_model(tmp_path / "native")
    assert model.dtype == (torch.bfloat16 if native_bfloat16 else torch.float32)  # type: ignore[attr-defined]
    assert load_model(tmp_path / "native", dtype=torch.float32).dtype == torch.float32  # type: ignore[attr-defined]
    assert native.default_dtype("cuda", None) == torch.bfloat16


def test_the_cpu_probe_reads_torch_s_own_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    from editor.models import native

    for avx512_bf16, amx in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda value=avx512_bf16: value, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda value=amx: value, raising=False)
        assert native.cpu_multiplies_bfloat16() == (avx512_bf16 or amx)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert native.cpu_multiplies_bfloat16() is False  # a torch without the probes: float32


def test_load_model_dispatches_on_model_type(tmp_path: Path) -> None:
    write_dream(tmp_path / "dream")
    write_llada(tmp_path / "llada")
    write_bert(tmp_path / "bert")
    native_checkpoint(tmp_path / "native")
    dream, llada = load_model(tmp_path / "dream"), load_model(str(tmp_path / "llada"))
    assert isinstance(dream, NativeDiffusionModel) and dream.logits_shifted
    assert isinstance(llada, NativeDiffusionModel) and not llada.logits_shifted
    assert isinstance(load_model(tmp_path / "bert"), MaskedLMAdapter)
    assert isinstance(load_model(tmp_path / "native"), NativeDiffusionModel)


def test_load_model_tiny_is_the_bundled_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    native_checkpoint(tmp_path / "tiny")
    monkeypatch.setattr(loading, "bundled_path", lambda name="tiny": tmp_path / name)
    assert load_model("tiny").name == "tiny"
    assert isinstance(load_model("bundled"), NativeDiffusionModel)
    monkeypatch.setattr(loading, "bundled_path", lambda name="tiny": tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="missing"):
        load_model("tiny")


def test_load_model_resolves_hub_ids_through_snapshot_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_dream(tmp_path / "snapshot")
    requested: list[str] = []

    def fake_snapshot_download(repo_id: str, **_: object) -> str:
        requested.append(repo_id)
        return str(tmp_path / "snapshot")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = load_model("someone/tiny-dream")
    assert requested and requested[0] == "someone/tiny-dream"
    assert isinstance(model, NativeDiffusionModel) and model.logits_shifted and model.name == "someone/tiny-dream"


def test_load_errors_name_the_path_and_the_problem(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"empty.*config\.json"):
        load_model(empty)
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(bad_json)
    untyped = tmp_path / "untyped"
    untyped.mkdir()
    (untyped / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ModelLoadError, match="model_type"):
        load_model(untyped)
    with pytest.raises(ModelLoadError, match="no such model directory"):
        load_model(str(tmp_path / "does-not-exist"))
    write_dream(tmp_path / "no_weights")
    for shard in (tmp_path / "no_weights").glob("*.safetensors"):
        shard.unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        load_model(tmp_path / "no_weights")
    assert issubclass(ModelLoadError, ValueError)


def test_unknown_model_type_is_tried_as_masked_lm(tmp_path: Path) -> None:
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "not-a-real-architecture"}))
    with pytest.raises(ModelLoadError, match="masked language model"):
        load_model(odd)


# --------------------------------------------------------------------------- (f) instruct frame


def test_dream_instruct_frame_uses_chat_template(tmp_path: Path) -> None:
    write_dream(tmp_path / "dream", chat=True)
    model = load_checkpoint(DREAM, tmp_path / "dream", framing="chat")
    tokenizer = model.tokenizer
    prefix, suffix = model.frame("fill in the blanks")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "fill in the blanks"}], add_generation_prompt=True, tokenize=False
    )
    assert prefix == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert prefix[0] == token_id(tokenizer, "<|im_start|>") and prefix[-1] == token_id(tokenizer, "assistant")
    end_of_turn = token_id(tokenizer, "<|im_end|>")
    assert suffix == [end_of_turn]
    assert end_of_turn in model.special.end_ids
    default_prefix, _ = model.frame(None)
    assert default_prefix != prefix  # the default instruction was used


def test_llada_instruct_frame_ends_with_eot(tmp_path: Path) -> None:
    write_llada(tmp_path / "llada", chat=True)
    model = load_checkpoint(LLADA, tmp_path / "llada", framing="chat")
    tokenizer = model.tokenizer
    prefix, suffix = model.frame("hello world")
    assert prefix[0] == token_id(tokenizer, "<|startoftext|>")
    assert prefix[-1] == token_id(tokenizer, "<|end_header_id|>")
    assert suffix == [token_id(tokenizer, "<|eot_id|>")]
    assert model.special.extra_end == (token_id(tokenizer, "<|eot_id|>"),)


# --------------------------------------------------------------------------- (g) aligned logits


def test_aligned_logits_shifts_dream_by_one(tmp_path: Path) -> None:
    write_dream(tmp_path / "dream")
    model = load_checkpoint(DREAM, tmp_path / "dream")
    ids = torch.tensor([ROWS[0]])
    valid = torch.ones_like(ids, dtype=torch.bool)
    raw = model.forward_logits(ids, valid)
    aligned = aligned_logits(model, ids, valid)
    torch.testing.assert_close(aligned[:, 1:], raw[:, :-1])
    torch.testing.assert_close(aligned[:, 0], raw[:, 0])
    llada_dir = tmp_path / "llada"
    write_llada(llada_dir)
    llada = load_checkpoint(LLADA, llada_dir)
    torch.testing.assert_close(aligned_logits(llada, ids, valid), llada.forward_logits(ids, valid))


def test_dream_loads_in_bfloat16(tmp_path: Path) -> None:
    write_dream(tmp_path / "dream")
    full = load_checkpoint(DREAM, tmp_path / "dream")
    half = load_checkpoint(DREAM, tmp_path / "dream", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.device == torch.device("cpu")
    ids = torch.tensor([ROWS[0]])
    valid = torch.ones_like(ids, dtype=torch.bool)
    logits = half.forward_logits(ids, valid)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, full.forward_logits(ids, valid), atol=0.15, rtol=0.05)


def test_a_window_run_against_cached_keys_values_matches_the_full_pass() -> None:
    """The forward pass the block-cached engine relies on: keys/values of every position from one
    full pass, then a window of positions run against the cached rest, give the full pass's logits
    for that window (attention is non-causal and order-free; rotary positions come from ids)."""
    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64
    )
    network = BidirectionalTransformer(config).eval()
    ids = torch.randint(0, 50, (2, 12))
    full, kv = network(ids, return_kv=True)  # [2, 12, 50], per layer [2, 2, 12, 8]
    start, end = 4, 8
    rest = torch.cat([torch.arange(0, start), torch.arange(end, 12)])
    past = [(k[:, :, rest], v[:, :, rest]) for k, v in kv]
    positions = torch.arange(start, end).expand(2, -1)
    window = network(ids[:, start:end], position_ids=positions, past=past)
    torch.testing.assert_close(window, full[:, start:end], atol=1e-5, rtol=1e-5)
