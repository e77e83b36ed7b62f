"""The published Dream and LLaDA layouts (tests/published.py): every tensor lands, bfloat16 stays
bfloat16 through the meta-device build, Base and Instruct are framed as the references frame them,
and config keys we do not implement are refused by name."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen2Tokenizer

from editor.models import DREAM, LLADA, Family, ModelLoadError, NativeDiffusionModel, load_checkpoint, load_model
from editor.models.checkpoints import dream_rename, framing_from_identity, llada_rename
from editor.models.transformer import ROTARY_START_ROWS
from editor.settings import Settings
from tests.published import (
    DELETE,
    DREAM_CONFIG,
    DREAM_IDS,
    LLADA_CONFIG,
    LLADA_IDS,
    LLADA_WORD_IDS,
    dream_names,
    dream_text_ids,
    edit_config,
    llada_names,
    write_dream_published,
    write_llada_published,
)

DREAM_INSTRUCT, DREAM_BASE = "Dream-v0-Instruct-7B", "Dream-v0-Base-7B"
LLADA_INSTRUCT, LLADA_BASE = "LLaDA-8B-Instruct", "LLaDA-8B-Base"


def write(tmp_path: Path, name: str) -> tuple[Path, dict[str, torch.Tensor]]:
    directory = tmp_path / name
    tensors = write_dream_published(directory) if name.startswith("Dream") else write_llada_published(directory)
    return directory, tensors


def family_of(name: str) -> Family:
    return DREAM if name.startswith("Dream") else LLADA


def load(directory: Path, **options: Any) -> NativeDiffusionModel:
    return load_checkpoint(family_of(directory.name), directory, **options)


# --------------------------------------------------------------------------- every tensor, in bfloat16


@pytest.mark.parametrize("name", [DREAM_INSTRUCT, LLADA_BASE])
def test_the_published_layout_loads_every_tensor_in_bfloat16_through_the_meta_build(tmp_path: Path, name: str) -> None:
    directory, tensors = write(tmp_path, name)
    layers = 2
    expected_names = dream_names(layers) if name.startswith("Dream") else llada_names(layers)
    assert sorted(tensors) == sorted(expected_names)  # 12 per Qwen2 layer + 3; 9 per LLaDA block + 3
    model = load(directory, dtype=torch.bfloat16, meta_build_parameters=0)  # the 7B/8B path, forced
    state = model.network.state_dict()
    rename = dream_rename if name.startswith("Dream") else llada_rename
    # Every checkpoint tensor is a parameter, bit for bit, and every parameter came from the checkpoint.
    assert sorted(str(rename(key)) for key in tensors) == sorted(state)
    for key, tensor in tensors.items():
        loaded = state[str(rename(key))]
        assert loaded.dtype == torch.bfloat16 and torch.equal(loaded, tensor), key
    for held in [*model.network.parameters(), *model.network.buffers()]:
        assert held.device.type == "cpu" and held.dtype == torch.bfloat16  # nothing left on meta, nothing float32
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    valid = torch.ones_like(ids, dtype=torch.bool)
    on_meta = model.forward_logits(ids, valid)
    on_cpu = load(directory, dtype=torch.bfloat16).forward_logits(ids, valid)  # the small-model path
    assert torch.isfinite(on_meta).all()
    torch.testing.assert_close(on_meta, on_cpu, atol=0, rtol=0)


def test_a_tensor_the_architecture_does_not_have_is_refused_by_name(tmp_path: Path) -> None:
    directory, _ = write(tmp_path, LLADA_INSTRUCT)
    save_file({"model.transformer.blocks.0.q_norm.weight": torch.ones(4)}, str(directory / "extra.safetensors"))
    index = directory / "model.safetensors.index.json"
    index.write_text(index.read_text().replace('"weight_map": {', '"weight_map": {"x": "extra.safetensors", ', 1))
    with pytest.raises(ModelLoadError, match="q_norm"):
        load(directory)


def test_the_rotary_table_is_built_to_the_canvas_not_to_max_position_embeddings(tmp_path: Path) -> None:
    directory, _ = write(tmp_path, DREAM_INSTRUCT)
    model = load(directory)
    assert DREAM_CONFIG["max_position_embeddings"] == 131072
    ids = torch.tensor([[1, 2, 3]])
    model.forward_logits(ids, torch.ones_like(ids, dtype=torch.bool))
    tables = model.network.rotary._tables
    assert tables and all(cos.shape[0] == ROTARY_START_ROWS for cos, _ in tables.values())


def test_dream_s_tokenizer_loads_from_vocab_and_merges_without_its_remote_code(tmp_path: Path) -> None:
    directory, _ = write(tmp_path, DREAM_INSTRUCT)
    assert not (directory / "tokenizer.json").exists()
    model = load(directory)
    assert isinstance(model.tokenizer, Qwen2Tokenizer)
    assert model.tokenizer("the cat", add_special_tokens=False)["input_ids"] == dream_text_ids("the cat")
    assert model.special.mask == DREAM_IDS["<|mask|>"] and model.special.bos == DREAM_IDS["<|beginoftext|>"]


# --------------------------------------------------------------------------- framing


def test_dream_instruct_is_framed_with_its_chat_template(tmp_path: Path) -> None:
    directory, _ = write(tmp_path, DREAM_INSTRUCT)
    model = load(directory)
    prefix, suffix = model.frame("Fill in.")
    im_start, im_end = DREAM_IDS["<|im_start|>"], DREAM_IDS["<|im_end|>"]
    expected = [im_start, *dream_text_ids("system\nYou are a helpful assistant."), im_end, *dream_text_ids("\n")]
    expected += [im_start, *dream_text_ids("user\nFill in."), im_end, *dream_text_ids("\n")]
    expected += [im_start, *dream_text_ids("assistant\n")]
    assert prefix == expected
    assert suffix == [im_end]
    assert model.special.extra_end == (im_end,)


def test_dream_base_is_framed_with_a_bare_bos_though_its_tokenizer_has_a_template(tmp_path: Path) -> None:
    directory, _ = write(tmp_path, DREAM_BASE)
    model = load(directory)
    assert model.tokenizer.chat_template  # the same tokenizer files as Instruct
    assert model.frame("Fill in.") == ([DREAM_IDS["<|beginoftext|>"]], [])
    assert model.special.extra_end == ()  # <|im_end|> is an ordinary token to a base model


def test_llada_instruct_ends_its_turn_with_eot_only(tmp_path: Path) -> None:
    directory, _ = write(tmp_path, LLADA_INSTRUCT)
    model = load(directory)
    prefix, suffix = model.frame("fill in the blanks")
    ids, words = LLADA_IDS, LLADA_WORD_IDS
    header = [ids["<|start_header_id|>"]]
    assert prefix == [
        ids["<|startoftext|>"],
        *header,
        words["user"],
        ids["<|end_header_id|>"],
        *(words[w] for w in ("fill", "in", "the", "blanks")),
        ids["<|eot_id|>"],
        *header,
        words["assistant"],
        ids["<|end_header_id|>"],
    ]
    assert suffix == [ids["<|eot_id|>"]]
    # The template's trailing assistant header is no end token (was: 126346 droppable as an end).
    assert model.special.extra_end == (ids["<|eot_id|>"],)
    assert ids["<|start_header_id|>"] not in model.special.end_ids


def test_llada_base_is_framed_as_plain_text_though_it_ships_the_instruct_template(tmp_path: Path) -> None:
    directory, _ = write(tmp_path, LLADA_BASE)
    model = load(directory)
    assert model.tokenizer.chat_template
    assert model.frame("fill in the blanks") == ([], [])
    assert model.special.extra_end == ()


def test_an_unnamed_checkpoint_with_a_template_needs_the_framing_setting(tmp_path: Path) -> None:
    source, _ = write(tmp_path, LLADA_INSTRUCT)
    directory = tmp_path / "weights"
    shutil.copytree(source, directory / "llada")
    unnamed = directory / "llada"
    with pytest.raises(ModelLoadError, match="EDITOR_FRAMING"):
        load_checkpoint(LLADA, unnamed)
    assert load_checkpoint(LLADA, unnamed, framing="base").frame("the cat") == ([], [])
    chat = load_checkpoint(LLADA, unnamed, framing="chat")
    assert chat.frame("the cat")[1] == [LLADA_IDS["<|eot_id|>"]]
    # A folder above the checkpoint names something else: it decides nothing.
    kept = tmp_path / "base-models" / "llada"
    shutil.copytree(source, kept)
    with pytest.raises(ModelLoadError, match="EDITOR_FRAMING"):
        load_checkpoint(LLADA, kept)
    # A hub cache snapshot is named by its repository directory.
    snapshot = tmp_path / "hub" / "models--GSAI-ML--LLaDA-8B-Base" / "snapshots" / "0123abcd"
    shutil.copytree(source, snapshot)
    assert load_checkpoint(LLADA, snapshot).frame("the cat") == ([], [])
    # The setting reaches the loader from EDITOR_FRAMING through load_model.
    served = load_model(unnamed, framing=Settings(framing="base").framing)
    assert isinstance(served, NativeDiffusionModel) and served.frame("the cat") == ([], [])


def test_chat_framing_without_a_template_is_refused(tmp_path: Path) -> None:
    directory, _ = write(tmp_path, DREAM_INSTRUCT)
    config_file = directory / "tokenizer_config.json"
    config_file.write_text(config_file.read_text().replace('"chat_template"', '"no_template"'))
    with pytest.raises(ModelLoadError, match="chat template"):
        load(directory, framing="chat")
    with pytest.raises(ModelLoadError, match="EDITOR_FRAMING=base"):  # named Instruct: chat, which cannot be
        load(directory)
    assert load(directory, framing="base").frame(None) == ([DREAM_IDS["<|beginoftext|>"]], [])


@pytest.mark.parametrize(
    ("names", "framing"),
    [
        (["Dream-org/Dream-v0-Instruct-7B"], "chat"),
        (["LLaDA-8B-Base"], "base"),
        (["abc123", "snapshots", "models--GSAI-ML--LLaDA-8B-Instruct", "hub"], "chat"),
        (["llada", "weights"], None),
        (["LLaDA-8B-Instruct", "base-models"], "chat"),  # the innermost name decides
    ],
)
def test_framing_is_read_off_the_checkpoint_s_name(names: list[str], framing: str | None) -> None:
    assert framing_from_identity(names) == framing


# --------------------------------------------------------------------------- config keys


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [
        (DREAM_INSTRUCT, "hidden_act", "gelu"),
        (DREAM_INSTRUCT, "use_sliding_window", True),
        (DREAM_INSTRUCT, "rope_scaling", {"type": "yarn", "factor": 4.0}),
        (DREAM_INSTRUCT, "head_dim", 16),
        (LLADA_INSTRUCT, "activation_type", "swiglu"),
        (LLADA_INSTRUCT, "block_type", "sequential"),
        (LLADA_INSTRUCT, "layer_norm_type", "default"),  # LayerNorm, not RMSNorm
        (LLADA_INSTRUCT, "layer_norm_with_affine", False),
        (LLADA_INSTRUCT, "bias_for_layer_norm", True),
        (LLADA_INSTRUCT, "include_bias", True),
        (LLADA_INSTRUCT, "clip_qkv", 8.0),
        (LLADA_INSTRUCT, "alibi", True),
        (LLADA_INSTRUCT, "scale_logits", True),
    ],
)
def test_a_config_value_we_do_not_implement_is_refused_by_name(tmp_path: Path, name: str, key: str, value: Any) -> None:
    directory, _ = write(tmp_path, name)
    edit_config(directory, **{key: value})
    with pytest.raises(ModelLoadError, match=f"{key}=.*not implemented"):
        load(directory)


@pytest.mark.parametrize(
    ("name", "key", "message"),
    [
        (LLADA_INSTRUCT, "activation_type", "activation_type='swiglu' (absent"),  # reference default swiglu
        (LLADA_INSTRUCT, "block_type", "block_type='sequential' (absent"),
        (LLADA_INSTRUCT, "layer_norm_type", "layer_norm_type='default' (absent"),
        (LLADA_INSTRUCT, "include_bias", "include_bias=True (absent"),
        (LLADA_INSTRUCT, "weight_tying", "ties the output head"),  # reference default true, own ff_out present
        (DREAM_INSTRUCT, "num_key_value_heads", "disagree with config.json"),  # reference default 32
    ],
)
def test_a_missing_config_key_takes_the_reference_default(tmp_path: Path, name: str, key: str, message: str) -> None:
    directory, _ = write(tmp_path, name)
    edit_config(directory, **{key: DELETE})
    with pytest.raises(ModelLoadError, match=message.replace("(", r"\(")):
        load(directory)


def test_llada_rotates_q_and_k_in_float32_by_default(tmp_path: Path) -> None:
    directory, _ = write(tmp_path, LLADA_INSTRUCT)
    assert LLADA_CONFIG["rope_full_precision"] is True
    assert load(directory).network.config.rope_full_precision
    edit_config(directory, rope_full_precision=DELETE)  # the reference default is true as well
    assert load(directory).network.config.rope_full_precision
    edit_config(directory, rope_full_precision=False)
    assert not load(directory).network.config.rope_full_precision
    dream_directory, _ = write(tmp_path, DREAM_INSTRUCT)
    assert not load(dream_directory).network.config.rope_full_precision  # Qwen2 rotates in the model dtype
