"""Shared code of the Self-Evolution KD scripts: prompts, data, losses, models, metrics."""
