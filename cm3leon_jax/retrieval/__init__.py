"""Retrieval: encoders, the ScaNN index over the memory bank, offline neighbor tables."""
