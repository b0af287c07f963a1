"""Exports: safetensors (ours) and HF OPT directories, and loading weights back."""
