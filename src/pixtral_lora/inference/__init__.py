"""Inference with a tuned run: archive-scale predict and scene mapping."""
