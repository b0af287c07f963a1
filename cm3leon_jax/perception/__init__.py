"""Frozen pretrained perception networks in JAX: the FID InceptionV3 and CLIP.

They load the standard published weight files when a user has them (nothing here
downloads) and are tested equal to the reference PyTorch implementations on random
weights. Evaluation (FID, CLIP score), retrieval (`retrieval.encoder: clip`) and
generation (CLIP reranking) use them; of our packages they import only `config`.
"""
