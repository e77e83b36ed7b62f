"""The package as users meet it: a light `import editor`, a public API, a fast CLI, and a wheel
that carries the templates, the migrations and the bundled model."""

from __future__ import annotations

import doctest
import json
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

import editor
from editor.models import DiffusionModel

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "litestar", "sqlalchemy", "ray")


def _imported_after(code: str) -> list[str]:
    """Which heavy modules a fresh interpreter has imported after running `code`."""
    probe = f"{code}\nimport sys, json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def test_import_editor_loads_no_model_stack() -> None:
    assert _imported_after("import editor; editor.__version__; editor.SamplerOptions") == []


@pytest.mark.parametrize(
    "arguments", [["--help"], ["fill", "--help"], ["serve", "--help"], ["batch", "--help"], ["bench", "--help"]]
)
def test_cli_help_imports_no_torch(arguments: list[str]) -> None:
    code = f"from editor.cli import main\ntry:\n    main({arguments!r})\nexcept SystemExit:\n    pass"
    assert _imported_after(code) == []


def test_the_model_worker_needs_neither_the_web_nor_the_database_layer() -> None:
    """`editor bench worker` runs on a bare GPU image that has torch but not Litestar."""
    imported = _imported_after("import editor.server.worker, editor.benchmarks.worker")
    assert "torch" in imported and "litestar" not in imported and "sqlalchemy" not in imported


def test_the_server_without_replicas_imports_no_ray() -> None:
    code = (
        "from editor.server.app import create_app\nfrom editor.settings import Settings\n"
        "create_app(Settings(_env_file=None, database_url='sqlite://'))"
    )
    imported = _imported_after(code)
    assert "litestar" in imported and "ray" not in imported


def test_version_matches_the_distribution() -> None:
    assert editor.__version__ == version("dllm-editor")
    done = subprocess.run([sys.executable, "-m", "editor", "--version"], capture_output=True, text=True, check=True)
    assert editor.__version__ in done.stdout


def test_public_api_names_are_the_real_objects() -> None:
    from editor.document import DocumentError
    from editor.filling import FillResult, fill_documents
    from editor.options import SamplerOptions
    from editor.parser import parse_document

    assert callable(editor.fill) and editor.fill.__module__ == "editor"
    assert editor.fill_documents is fill_documents
    assert editor.parse_document is parse_document
    assert editor.SamplerOptions is SamplerOptions
    assert editor.FillResult is FillResult
    assert editor.DocumentError is DocumentError
    assert set(editor.__all__) <= set(dir(editor))
    with pytest.raises(AttributeError):
        _ = editor.no_such_name


def test_docstring_example_runs() -> None:
    failures, tried = doctest.testmod(editor, raise_on_error=False)
    assert tried >= 3 and failures == 0


def test_fill_reports_document_mistakes_and_rejects_mixed_options(tiny_model: DiffusionModel) -> None:
    with pytest.raises(editor.DocumentError) as caught:
        editor.fill("Hello [MASK 0].", model=tiny_model)
    assert (caught.value.line, caught.value.column) == (1, 13)  # points at the bad length
    with pytest.raises(TypeError, match="either options= or option keywords"):
        editor.fill("Hi [MASK 2].", model=tiny_model, options=editor.SamplerOptions(), steps=2)


def test_fill_takes_keywords_and_a_loaded_model(tiny_model: DiffusionModel) -> None:
    result = editor.fill("Hi [MASK 3 name=who].", model=tiny_model, steps=3, seed=5)
    again = editor.fill("Hi [MASK 3 name=who].", model=tiny_model, options=editor.SamplerOptions(steps=3, seed=5))
    assert result.text == again.text and result.text.startswith("Hi ") and result.text.endswith(".")
    assert [(s.name, len(s.token_ids)) for s in result.spans] == [("who", 3)]


def test_wheel_carries_templates_migrations_and_the_bundled_model(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("dllm_editor-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"editor/__init__.py", "editor/py.typed", "editor/templates/__init__.py"} <= names
    assert {"editor/migrations/env.py", "editor/migrations/script.py.mako"} <= names
    assert any(n.startswith("editor/migrations/versions/0001_") for n in names)
    assert any(n.startswith("editor/bundled/") and n.endswith(".safetensors") for n in names)
    assert not any(n.startswith(("tests/", "templates/", "migrations/")) for n in names)
