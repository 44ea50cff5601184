"""hf_vsa: Hugging Face training that skips the backward passes measured to add nothing."""
from .config import VSAArguments, VSATrainingArguments
from .controller import Phase, PhaseController
from .predictor import GradientPredictor
from .trainer import VSAMixin, VSATrainer

__all__ = ["VSATrainer", "VSATrainingArguments", "VSAMixin", "VSAArguments", "PhaseController", "Phase",
           "GradientPredictor", "VSASFTTrainer", "VSASFTConfig"]
__version__ = "0.1.0"
_TRL = ("VSASFTTrainer", "VSASFTConfig")


def __getattr__(name):
    # TRL's pair is imported on first use: trl is an optional dependency, and a slow import.
    if name in _TRL:
        try:
            from . import trl_trainers
        except ImportError as e:
            raise ImportError(f"hf_vsa.{name} needs trl: pip install 'hf_vsa[trl]' ({e})") from e
        return getattr(trl_trainers, name)
    raise AttributeError(f"module 'hf_vsa' has no attribute {name!r}")
