"""Scaling sweeps: model sizes under one compute rule; fits of loss vs compute and size."""
