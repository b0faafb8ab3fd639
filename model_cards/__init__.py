"""Jinja2 templates for the model cards of hf_accel artifacts (installed as hf_accel.model_cards)."""
