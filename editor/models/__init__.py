"""Model loading: every supported checkpoint format behind the `DiffusionModel` interface."""

from editor.models.base import DiffusionModel, SpecialIds, aligned_logits
from editor.models.checkpoints import DREAM, LLADA, NATIVE, Family, load_checkpoint, load_native
from editor.models.hf_masked import MaskedLMAdapter, load_masked_lm
from editor.models.loading import bundled_path, load_model, model_format, save_native
from editor.models.native import ModelLoadError, NativeDiffusionModel

__all__ = [
    "DREAM",
    "LLADA",
    "NATIVE",
    "DiffusionModel",
    "Family",
    "MaskedLMAdapter",
    "ModelLoadError",
    "NativeDiffusionModel",
    "SpecialIds",
    "aligned_logits",
    "bundled_path",
    "load_checkpoint",
    "load_masked_lm",
    "load_model",
    "load_native",
    "model_format",
    "save_native",
]
