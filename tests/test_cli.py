"""`editor fill` as users run it: text or JSON on stdout, parse errors on stderr with nothing on
stdout, every sampler option a flag with its default in --help, and the bundled model working
offline with no --model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from editor.cli import main
from editor.options import SamplerOptions

pytestmark = pytest.mark.usefixtures("tiny_one_thread")

LETTER = (
    "Dear [MASK 3 name=greeting],\n"
    'Your refund will reach you [MASK 6 must="Monday" name=when]. Thanks, [MASK 2]\n'
    "The end."
)


def run(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), input=stdin)
    return result.exit_code, result.stdout, result.stderr


def test_fill_json_reports_spans_with_offsets_into_the_text(tiny_model_dir: Path, tmp_path: Path) -> None:
    document = tmp_path / "letter.txt"
    document.write_text(LETTER, encoding="utf-8")
    code, out, err = run("fill", str(document), "--model", str(tiny_model_dir), "--json", "--seed", "5")
    assert code == 0, err
    payload = json.loads(out)
    assert set(payload) >= {"text", "spans", "model", "seed", "steps", "elapsed_s"}
    assert payload["seed"] == 5
    text = payload["text"]
    assert text.startswith("Dear ") and text.endswith("\nThe end.")
    assert [span["name"] for span in payload["spans"]] == ["greeting", "when", None]
    for span in payload["spans"]:
        assert set(span) >= {"index", "name", "start", "end", "text", "token_ids", "confidence"}
        assert text[span["start"] : span["end"]] == span["text"]
    assert len(payload["spans"][0]["token_ids"]) == 3
    assert len(payload["spans"][1]["token_ids"]) == 6
    assert "Monday" in payload["spans"][1]["text"]


def test_fill_reads_stdin_and_prints_plain_text(tiny_model_dir: Path) -> None:
    code, out, err = run("fill", "-", "--model", str(tiny_model_dir), "--seed", "1", stdin="Hello [MASK 2], bye.")
    assert code == 0, err
    assert out.startswith("Hello ") and out.endswith(", bye.\n")


def test_cache_refresh_every_takes_none_on_the_command_line(tiny_model_dir: Path) -> None:
    """`--cache-refresh-every none` (refresh at block starts only: the dual cache of `blocks`), as
    the docs tell users to write it; anything else that is not an integer is a usage error."""
    base = ("fill", "-", "--model", str(tiny_model_dir), "--json", "--seed", "2", "--schedule", "blocks")
    code, out, err = run(*base, "--cache-refresh-every", "none", stdin="A [MASK 6] b")
    assert code == 0, err
    assert json.loads(out)["options"]["cache_refresh_every"] is None
    code, out, err = run(*base, "--cache-refresh-every", "3", stdin="A [MASK 6] b")
    assert code == 0 and json.loads(out)["options"]["cache_refresh_every"] == 3
    code, _, err = run(*base, "--cache-refresh-every", "often", stdin="A [MASK 6] b")
    assert code == 2 and "'often' is neither an integer nor 'none'" in err


def test_same_seed_same_text_from_the_command_line(tiny_model_dir: Path) -> None:
    args = ("fill", "-", "--model", str(tiny_model_dir), "--temperature", "1", "--schedule", "random", "--seed", "9")
    first = run(*args, stdin="A [MASK 6] b")
    second = run(*args, stdin="A [MASK 6] b")
    assert first[0] == 0 and first[1] == second[1]


def test_a_bad_document_exits_non_zero_with_the_error_on_stderr_only(tiny_model_dir: Path) -> None:
    code, out, err = run("fill", "-", "--model", str(tiny_model_dir), stdin="ok\nDear [MASK 3 colour=red]")
    assert code != 0
    assert out == ""
    assert "line 2, column 14" in err and "colour" in err


def test_a_bad_sampler_option_is_refused_before_anything_runs(tiny_model_dir: Path) -> None:
    code, out, err = run("fill", "-", "--model", str(tiny_model_dir), "--top-p", "0", stdin="A [MASK 2]")
    assert code != 0 and out == ""
    assert "top_p" in err


def test_help_lists_every_sampler_option_with_its_default() -> None:
    code, out, _ = run("fill", "--help")
    assert code == 0
    flat = " ".join(out.split())
    for name, field in SamplerOptions.model_fields.items():
        flag = "--" + name.replace("_", "-")
        assert flag in flat
        shown = re.search(re.escape(flag) + r".*?\[default: ([^\]]+)\]", flat)
        assert shown is not None, f"{flag} shows no default"
        if field.default is not None:
            assert shown.group(1) == str(field.default)


def test_the_bundled_model_fills_offline_with_no_model_flag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The issue's must-show: three spans, a must word and a fixed suffix, no --model, offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    document = tmp_path / "doc.txt"
    document.write_text(
        'Dear [MASK 3],\nThank you for your letter. We will send [MASK 6 must="refund"] next week.\n'
        "The [MASK 2] team will call you on Friday.",
        encoding="utf-8",
    )
    code, out, err = run("fill", str(document), "--json", "--seed", "0")
    assert code == 0, err
    payload = json.loads(out)
    text = payload["text"]
    assert text.startswith("Dear ")
    assert text.endswith(" team will call you on Friday.")
    assert "refund" in payload["spans"][1]["text"]
    assert [len(s["token_ids"]) for s in payload["spans"]] == [3, 6, 2]
    # Reads as English: the fills are made of words, not byte soup or special tokens.
    filled = " ".join(s["text"] for s in payload["spans"])
    assert "<|" not in filled and "\ufffd" not in filled
    assert len(re.findall(r"[A-Za-z]{2,}", filled)) >= 4


def test_fill_takes_model_and_limits_from_the_editor_settings(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDITOR_MODEL", str(tiny_model_dir))
    code, out, err = run("fill", "-", "--json", "--seed", "2", stdin="A [MASK 2] and [MASK 2].")
    assert code == 0, err
    assert json.loads(out)["model"] == str(tiny_model_dir)
    monkeypatch.setenv("EDITOR_MAX_SPANS", "1")
    code, out, err = run("fill", "-", stdin="A [MASK 2] and [MASK 2].")
    assert code != 0 and out == ""
    assert "line 1, column 16" in err and "too many spans" in err


def test_serve_address_goes_with_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDITOR_REPLICAS", raising=False)
    code, _, err = run("serve", "--address", "10.0.0.1:6379")
    assert code == 2 and "--address goes with --replicas" in err


def test_bench_engine_measures_naive_and_fast_fills(tmp_path: Path) -> None:
    """`editor bench engine` (run on the GPU for results/engine-bench.md) still runs end to end:
    a short CPU run writes every mode's figure."""
    out = tmp_path / "engine.json"
    arguments = ["bench", "engine", "--model", "tiny", "--batch", "1,2", "--tokens", "8", "--context", "24"]
    arguments += ["--tokens-per-step", "4", "--refresh", "2", "--repeats", "0", "--threads", "1", "--json", str(out)]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())["figures"]
    assert [(f["mode"], f["batch"]) for f in figures] == [
        ("naive", 1),
        ("fast", 1),
        ("fast-r2", 1),
        ("fast", 2),
        ("fast-r2", 2),
    ]
    assert all(f["steps"] == 2 and f["tokens_per_s"] > 0 for f in figures)
    assert figures[0]["work"]["windows"] == 0 and figures[1]["work"]["windows"] == 1  # the cache did run


def test_bench_document_times_the_naive_and_cached_fills_of_a_file(tmp_path: Path) -> None:
    document = tmp_path / "doc.txt"
    document.write_text("This week we [MASK 6] and the customers said [MASK 4].", encoding="utf-8")
    out = tmp_path / "document.json"
    arguments = ["bench", "document", str(document), "--schedule", "blocks", "--block-length", "4"]
    arguments += ["--refresh", "none", "--repeats", "1", "--threads", "1", "--json", str(out)]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert payload["schedule"] == "blocks" and payload["block_length"] == 4
    assert [f["mode"] for f in payload["figures"]] == ["naive", "fast-rnone"]
    assert all(f["steps"] >= 3 and f["median_s"] > 0 for f in payload["figures"])  # 10 masks, blocks of 4


def test_bench_engine_quality_adds_documents_cut_from_held_out_text(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The quality guard on more than its twelve fixed documents: paragraphs of a held-out split,
    two spans each masked at their own token length; the reference compares with itself."""
    words = " ".join(f"word{n}" for n in range(30))
    valid = tmp_path / "valid.txt"
    valid.write_text(f"too short\n[bracketed] {words}\n{words} one\n{words} two\n", encoding="utf-8")
    out = tmp_path / "quality.json"
    arguments = ["bench", "engine-quality", "--model", str(tiny_model_dir), "--valid", str(valid)]
    arguments += ["--documents", "5", "--setting", "reference", "--setting", "cached/2", "--json", str(out)]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert payload["documents"] == 12 + 2  # the short and the bracketed paragraphs are left out
    assert list(payload["results"]) == ["reference", "cached/2"] and payload["dtype"] == "float32"
    assert payload["results"]["reference"]["same_text"] == 1.0
    assert (
        0 <= payload["results"]["cached/2"]["same_text"] <= 1 and payload["results"]["cached/2"]["masked_token_nll"] > 0
    )
    code, _, err = run("bench", "engine-quality", "--documents", "3")
    assert code == 2 and "--documents needs --valid" in err


def test_held_out_documents_mask_two_spans_at_their_token_length(tiny_tokenizer) -> None:
    from editor.benchmarks.quality import held_out_documents
    from editor.document import MaskSpan
    from editor.parser import parse_document

    # distinct words, so the words behind each mask can be read off the document
    paragraphs = [" ".join(f"w{n}x{i}" for i in range(40)) for n in range(6)]
    documents = held_out_documents(paragraphs, 4, tiny_tokenizer, seed=3)
    assert len(documents) == 4 and documents == held_out_documents(paragraphs, 4, tiny_tokenizer, seed=3)
    assert len(held_out_documents(paragraphs, 10, tiny_tokenizer)) == 6  # no more than there are
    for document in documents:
        segments = parse_document(document).segments
        words = next(p for p in paragraphs if p.split()[0] == document.split()[0]).split()
        assert sum(isinstance(segment, MaskSpan) for segment in segments) == 2
        at = 0
        for number, segment in enumerate(segments):
            if isinstance(segment, str):
                assert segment.split() == words[at : at + len(segment.split())]
                at += len(segment.split())
                continue
            following = segments[number + 1] if number + 1 < len(segments) else None
            end = words.index(following.split()[0]) if isinstance(following, str) else len(words)
            hidden = words[at:end]
            assert 2 <= len(hidden) <= 8
            expected = len(tiny_tokenizer.encode(" " + " ".join(hidden), add_special_tokens=False))
            assert segment.min_tokens == segment.max_tokens == expected
            at = end


# --- threads ---------------------------------------------------------------------------------------


@pytest.fixture
def thread_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """What the command asks of torch.set_num_threads (recorded, not applied: the module keeps one
    thread), on an 8-core machine with no OMP_NUM_THREADS or EDITOR_TORCH_THREADS set."""
    import torch

    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("EDITOR_TORCH_THREADS", raising=False)
    return calls


def test_fill_threads_come_from_the_flag_else_the_setting_else_one_core_fewer_than_the_machine(
    tiny_model_dir: Path, thread_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the server: a thread on every core stalls each step when anything else takes a core."""
    fill = ("fill", "-", "--model", str(tiny_model_dir), "--seed", "0")
    assert run(*fill, stdin="A [MASK 2] b")[0] == 0
    monkeypatch.setenv("EDITOR_TORCH_THREADS", "3")
    assert run(*fill, stdin="A [MASK 2] b")[0] == 0
    assert run(*fill, "--threads", "2", stdin="A [MASK 2] b")[0] == 0
    assert thread_calls == [7, 3, 2]
    code, _, err = run(*fill, "--threads", "0", stdin="A [MASK 2] b")
    assert code == 2 and "--threads" in err


def test_fill_leaves_torch_its_own_threads_under_omp_num_threads(
    tiny_model_dir: Path, thread_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert run("fill", "-", "--model", str(tiny_model_dir), stdin="A [MASK 2] b")[0] == 0
    assert thread_calls == []


def test_batch_threads_come_from_the_flag_else_the_setting_else_one_core_fewer_than_the_machine(
    tiny_model_dir: Path, thread_calls: list[int], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    template = tmp_path / "template.json"
    template.write_text(json.dumps({"id": "{id}", "text": "[MASK 2]"}), encoding="utf-8")
    batch = ("batch", str(template), "-", "-o", "-", "--model", str(tiny_model_dir), "--no-progress")
    records = '{"id": "a"}\n'
    assert run(*batch, stdin=records)[0] == 0
    monkeypatch.setenv("EDITOR_TORCH_THREADS", "5")
    assert run(*batch, stdin=records)[0] == 0
    code, out, err = run(*batch, "--threads", "1", stdin=records)
    assert code == 0, err
    assert json.loads(out)["custom_id"] == "a"
    assert thread_calls == [7, 5, 1]


# --- mistakes and documents with nothing to fill -------------------------------------------------


def test_a_lower_case_tag_is_filled_as_text_with_a_warning_naming_where(tiny_model_dir: Path) -> None:
    source = "Hi [MASK 2],\nsee [mask 3] and [MASK3]."
    code, out, err = run("fill", "-", "--model", str(tiny_model_dir), "--seed", "0", stdin=source)
    assert code == 0, err
    assert out.endswith(",\nsee [mask 3] and [MASK3].\n")  # literal, as the language says
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert "line 2, column 5" in warnings[0] and "did you mean [MASK 3]?" in warnings[0]
    assert "line 2, column 18" in warnings[1] and "did you mean [MASK 3]?" in warnings[1]


def test_a_document_with_no_mask_comes_back_unchanged_without_loading_a_model(tmp_path: Path) -> None:
    """No model exists at --model: loading one would fail."""
    absent = str(tmp_path / "no-such-model")
    source = "Nothing to fill in \\[MASK 2] here.\n"
    code, out, err = run("fill", "-", "--model", absent, stdin=source)
    assert code == 0, err
    assert out == "Nothing to fill in [MASK 2] here.\n\n"  # escapes resolved; echo adds the newline
    assert "nothing is filled" in err
    code, out, err = run("fill", "-", "--model", absent, "--json", stdin=source)
    assert code == 0, err
    payload = json.loads(out)
    assert payload["text"] == "Nothing to fill in [MASK 2] here.\n"
    assert payload["spans"] == [] and payload["steps"] == 0 and payload["model"] == absent


def test_a_mistyped_tag_alone_is_warned_about_and_nothing_is_filled(tmp_path: Path) -> None:
    code, out, err = run("fill", "-", "--model", str(tmp_path / "absent"), stdin="Hi [Mask 3 name=who]")
    assert code == 0
    assert out == "Hi [Mask 3 name=who]\n"
    assert "warning: <stdin>: line 1, column 4:" in err and "did you mean [MASK 3 name=who]?" in err


def test_an_unclosed_tag_is_reported_at_its_start_not_as_an_unknown_option(tiny_model_dir: Path) -> None:
    code, out, err = run("fill", "-", "--model", str(tiny_model_dir), stdin="Hello [MASK 3 world")
    assert code == 1 and out == ""
    assert "line 1, column 7: unclosed tag" in err and "']' to close the tag" in err
    assert "unknown option" not in err


def test_the_python_api_returns_a_document_with_no_mask_unchanged_without_a_model(tmp_path: Path) -> None:
    import editor

    result = editor.fill("No tags, only \\[MASK 1] text.", model=str(tmp_path / "absent"), seed=4)
    assert result.text == "No tags, only [MASK 1] text."
    assert result.spans == [] and result.steps == 0 and result.seed == 4


def test_batch_warns_of_a_mistyped_tag_in_its_template(tmp_path: Path) -> None:
    template = tmp_path / "template.json"
    template.write_text('{"a": "[MASK 2]",\n "b": "see [mask 3 as=word]"}', encoding="utf-8")
    code, out, err = run("batch", str(template), "--print-template")
    assert code == 0, err
    assert out.startswith('{"a": "[MASK 2]"')  # a warning, not an error: the template is still used
    assert f"warning: {template}: line 2, column 12:" in err and "did you mean [MASK 3 as=word]?" in err
