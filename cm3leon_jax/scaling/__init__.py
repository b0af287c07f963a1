"""Scaling sweeps: a family of sizes under one compute rule, and fits of loss vs compute and size."""
