"""hf_vsa: Hugging Face fine-tuning with most backward passes replaced by predicted gradients."""
from .config import VSATrainingArguments
from .controller import Phase, PhaseController
from .predictor import GradientPredictor
from .trainer import VSATrainer

__all__ = ["VSATrainer", "VSATrainingArguments", "PhaseController", "Phase", "GradientPredictor"]
__version__ = "0.1.0"
