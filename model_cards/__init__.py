"""Jinja templates for the model card section that VSATrainer adds (installed as hf_vsa.model_cards)."""
