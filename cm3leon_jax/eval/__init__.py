"""Evaluation of trained weights: per-token scores (perplexity, reranking)."""
