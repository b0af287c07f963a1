"""The demo's image tokenizer: the recipe the package ships, trained once (demo/pretrained.py)."""

import numpy as np
import pytest
from conftest import CONFIGS

from cm3leon_jax.config import ConfigError, load_config
from cm3leon_jax.data.prepare import prepare
from cm3leon_jax.demo import job as demo
from cm3leon_jax.demo import pretrained
from cm3leon_jax.layout import DataDir
from cm3leon_jax.tokenizers.image import ImageTokenizer

# the demo's 4 rows a step do not split over the tests' 8 host devices
EIGHT_ROWS = ["train.batch_size=8"]
# configs/demo.yaml's tokenizer recipe, trained for a few steps on a few scenes
SHORT = ["source.size=40", "vqgan_train.steps=3", "vqgan_train.images=16",
         "vqgan_train.eval_images=8", "vqgan_train.restart_every=0", "vqgan_train.log_every=1",
         *EIGHT_ROWS]


def test_the_demo_config_describes_the_shipped_recipe():
    assert pretrained.config() == load_config(CONFIGS / "demo.yaml").vqgan
    assert len(pretrained.provenance()["sha256"][pretrained.WEIGHTS]) == 64


def test_build_trains_what_prepare_trains_and_keeps_only_finished_weights(tmp_path):
    """The built weights are the bytes `demo.image_tokenizer=train` gives on the same data,
    and load as the recipe's tokenizer."""
    cfg = demo.demo_config(CONFIGS / "demo.yaml", tmp_path / "demo", SHORT)
    where = tmp_path / "tokenizer"
    where.mkdir()
    assert not pretrained.is_built(where)
    lines = []
    digest = pretrained.build(cfg, DataDir(tmp_path / "build"), where, log=lines.append)
    assert pretrained.is_built(where) and sorted(p.name for p in where.iterdir()) == ["vqgan.npz"]
    assert "sha256 " + digest[:16] in lines[-1]
    trained = demo.demo_config(CONFIGS / "demo.yaml", tmp_path / "demo",
                               [*SHORT, "demo.image_tokenizer=train"])
    prepare(trained)
    assert (where / "vqgan.npz").read_bytes() == \
        (DataDir(trained.data.dir).image_tokenizer / "vqgan.npz").read_bytes()
    (where / "vqgan.json").write_bytes((pretrained.DIRECTORY / "vqgan.json").read_bytes())
    tok = ImageTokenizer.load(where)
    assert tok.config == pretrained.config()
    images = np.zeros((2, 32, 32, 3), np.uint8)
    assert tok.decode(tok.encode(images)).shape == images.shape


def test_the_demo_uses_the_shipped_tokenizer_unless_told_otherwise(tmp_path):
    def given(*overrides):
        return demo.demo_config(CONFIGS / "demo.yaml", tmp_path,
                                [*EIGHT_ROWS, *overrides]).prepare.image_tokenizer

    assert given() == str(pretrained.DIRECTORY)
    assert given("demo.image_tokenizer=train") is None  # prepare trains one
    assert given(f"prepare.image_tokenizer={tmp_path / 'mine'}") == str(tmp_path / "mine")
    with pytest.raises(ConfigError, match=r"vqgan.codebook_size=512, but vqgan.codebook_size is "
                                          r"256; set demo.image_tokenizer=train"):
        given("vqgan.codebook_size=256", "vocab.image_size=256")
