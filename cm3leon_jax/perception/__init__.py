"""Frozen pretrained perception networks in JAX: the FID InceptionV3, CLIP and LPIPS.

They load the standard published weight files when a user has them (nothing here
downloads) and are tested equal to the reference PyTorch implementations on random
weights (`weights.py` reads the torch files for Inception and LPIPS). Evaluation (FID, CLIP
score), retrieval (`retrieval.encoder: clip`) and generation (CLIP reranking) use them;
LPIPS is the image tokenizer's perceptual distance. Of our packages they import only
`config` and `storage`.
"""
