"""The image tokenizer the package ships for `cm3leon demo` (demo/pretrained.py)."""

import hashlib

import numpy as np
import pytest
from conftest import CONFIGS

from cm3leon_jax.config import ConfigError, load_config
from cm3leon_jax.demo import job as demo
from cm3leon_jax.demo import pretrained
from cm3leon_jax.tokenizers.image import ImageTokenizer


def test_the_demo_config_describes_the_shipped_tokenizer_and_its_record_its_bytes():
    assert pretrained.config() == load_config(CONFIGS / "demo.yaml").vqgan
    shipped = (pretrained.DIRECTORY / "vqgan.npz").read_bytes()
    assert hashlib.sha256(shipped).hexdigest() == pretrained.provenance()["sha256"]["vqgan.npz"]


def test_the_shipped_tokenizer_scores_what_its_record_says_on_the_reported_scenes():
    """The detector reads its reconstructions of the demo's 512 reported scenes (never
    trained on) as trained.json recorded when it was made: above issue 21's 0.85."""
    cfg = demo.demo_config(CONFIGS / "demo.yaml", "/unused")
    tok = ImageTokenizer.load(pretrained.DIRECTORY, batch_size=128)
    scenes = demo.held_out(cfg, tok.config.resolution)
    recon = tok.decode(tok.encode(np.stack([s.image for s in scenes])))
    accuracy = demo.accuracy(recon, scenes)
    recorded = pretrained.provenance()["scores"]["detector_on_reconstructions"]
    assert len(scenes) == 512 and accuracy == pytest.approx(recorded, abs=1e-12) and accuracy > 0.85


def test_the_demo_uses_the_shipped_tokenizer_unless_told_otherwise(tmp_path):
    def given(*overrides):
        return demo.demo_config(CONFIGS / "demo.yaml", tmp_path, overrides).prepare.image_tokenizer

    assert given() == str(pretrained.DIRECTORY)
    assert given("demo.image_tokenizer=train") is None  # prepare trains one
    assert given(f"prepare.image_tokenizer={tmp_path / 'mine'}") == str(tmp_path / "mine")
    with pytest.raises(ConfigError, match=r"vqgan.codebook_size=512, but vqgan.codebook_size is "
                                          r"256; set demo.image_tokenizer=train"):
        given("vqgan.codebook_size=256", "vocab.image_size=256")
