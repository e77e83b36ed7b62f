"""editor: constrained and infilling text editing on masked diffusion language models.

Write a document with ``[MASK n]`` holes (see docs/language.md) and fill every hole at once:

>>> import editor
>>> result = editor.fill("The capital of France is [MASK 2].", model="tiny", seed=0)
>>> result.text.startswith("The capital of France is ") and result.text.endswith(".")
True
>>> [span.index for span in result.spans]
[0]

``import editor`` is cheap: torch and transformers load on the first call that needs a model.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

if TYPE_CHECKING:
    from editor.document import Document, DocumentError
    from editor.filling import FillResult, fill_documents
    from editor.models.base import DiffusionModel
    from editor.options import SamplerOptions
    from editor.parser import parse_document

__all__ = [
    "DocumentError",
    "FillResult",
    "SamplerOptions",
    "__version__",
    "fill",
    "fill_documents",
    "load_model",
    "parse_document",
]

# name -> module it lives in; imported on first access (PEP 562), so `import editor` stays light.
_LAZY = {
    "DocumentError": "editor.document",
    "FillResult": "editor.filling",
    "SamplerOptions": "editor.options",
    "fill_documents": "editor.filling",
    "parse_document": "editor.parser",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'editor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def load_model(spec: str | None = None, *, device: str = "auto", dtype: str = "auto") -> DiffusionModel:
    """A model by name or location: None or "default" (the default model), "tiny" (the 17M model
    shipped in the package), a local directory, or a Hugging Face id (from the local cache when
    offline). Loaded models are kept, so calling this again with the same arguments is free."""
    return _load_model_cached(spec, device, dtype)


@lru_cache(maxsize=4)
def _load_model_cached(spec: str | None, device: str, dtype: str) -> DiffusionModel:
    from editor.models.loading import dtype_named
    from editor.models.loading import load_model as load

    return load(spec, device=device, dtype=dtype_named(dtype))


def fill(
    document: str | Document,
    *,
    model: str | DiffusionModel | None = None,
    options: SamplerOptions | None = None,
    instruction: str | None = None,
    **option_values: Any,
) -> FillResult:
    """Fill one document (source text or a parsed `Document`) and return its `FillResult`.

    Sampler options come as a `SamplerOptions` or as keywords (``steps=8, schedule="blocks"``).
    `model` is a name for `load_model` or a loaded model. Raises `DocumentError` (with line and
    column) for a document with a mistake. A document with no span comes back unchanged, and no
    model is loaded for it."""
    from editor.filling import FillResult
    from editor.filling import fill_documents as run
    from editor.options import SamplerOptions
    from editor.parser import parse_document as parse

    if options is not None and option_values:
        raise TypeError("pass either options= or option keywords, not both")
    chosen = options if options is not None else SamplerOptions(**option_values)
    parsed = parse(document) if isinstance(document, str) else document
    if not parsed.spans:
        text = "".join(segment for segment in parsed.segments if isinstance(segment, str))
        name = model if isinstance(model, str) else "default" if model is None else model.name
        return FillResult(text, [], name, chosen.seed or 0, 0, 0.0, chosen)  # any seed gives this text
    loaded = model if model is not None and not isinstance(model, str) else load_model(model)
    [result] = run(loaded, [parsed], chosen, instruction=instruction)
    return result
