"""Model loading: every supported checkpoint format behind the `DiffusionModel` interface."""

from editor.models.base import DiffusionModel, SpecialIds, aligned_logits
from editor.models.dream import load_dream
from editor.models.hf_masked import MaskedLMAdapter, load_masked_lm
from editor.models.llada import load_llada
from editor.models.loading import bundled_path, load_model, load_native, model_format, save_native
from editor.models.native import ModelLoadError, NativeDiffusionModel

__all__ = [
    "DiffusionModel",
    "MaskedLMAdapter",
    "ModelLoadError",
    "NativeDiffusionModel",
    "SpecialIds",
    "aligned_logits",
    "bundled_path",
    "load_dream",
    "load_llada",
    "load_masked_lm",
    "load_model",
    "load_native",
    "model_format",
    "save_native",
]
