"""hf_vsa for TRL: VSASFTTrainer / VSASFTConfig, the VSA method mixed into trl.SFTTrainer.

Needs trl (pip install 'hf_vsa[trl]'); `from hf_vsa import VSASFTTrainer, VSASFTConfig` imports it
on first use. SFTTrainer keeps the Trainer's training_step contract (its override only wraps the
step in an activation-offloading context), so VSAMixin's training_step runs around it unchanged.
"""
from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from .config import VSAArguments
from .trainer import VSAMixin


@dataclass
class VSASFTConfig(VSAArguments, SFTConfig):
    """trl.SFTConfig plus the vsa_* fields (VSAArguments)."""


class VSASFTTrainer(VSAMixin, SFTTrainer):
    """trl.SFTTrainer whose optimizer steps go through the VSA phase controller."""

    vsa_args_class = VSASFTConfig
