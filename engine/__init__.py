"""Thin training engine for self-supervised visual pre-training (HPM, MAE, ...)."""
