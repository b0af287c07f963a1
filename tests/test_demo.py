import json

import numpy as np
import pytest
from conftest import CONFIGS

from cm3leon_jax.cli import main as cli
from cm3leon_jax.config import load_config
from cm3leon_jax.demo import job as demo
from cm3leon_jax.export.write import export
from cm3leon_jax.data import sequences
from cm3leon_jax.generate import prompts
from cm3leon_jax.tokenizers.image import ImageTokenizer

VQ = ["vqgan.resolution=32", "vqgan.base_channels=8", "vqgan.channel_mult=[1, 2, 4]",
      "vqgan.num_res_blocks=1", "vqgan.mid_attn=false", "vqgan.norm_groups=4",
      "vqgan.z_channels=8", "vqgan.embed_dim=4", "vqgan.codebook_size=32", "vocab.image_size=32"]
MICRO = ["source.size=40", "retrieval.train_steps=2", "retrieval.train_batch_size=8",
         "retrieval.embed_batch=16", "retrieval.recall_queries=8", "train.steps=2",
         "train.batch_size=8", "train.checkpoint_every=2", "optimizer.warmup_steps=1",
         "model.n_layers=1", "model.d_model=32", "model.d_ff=64", "model.n_heads=2",
         "demo.eval_scenes=3", "demo.grid_rows=2", "generate.seed=3"]


@pytest.mark.slow
def test_demo_end_to_end_and_rerun_reuses_stages(tmp_path):
    # an untrained image tokenizer: VQ-GAN training has its own tests; this checks the flow
    tok = tmp_path / "vq"
    ImageTokenizer.create(load_config(CONFIGS / "demo.yaml", VQ).vqgan, seed=0).save(tok)
    work = tmp_path / "demo"
    overrides = [*VQ, *MICRO, f"prepare.image_tokenizer={tok}"]
    first = demo.demo(CONFIGS / "demo.yaml", work, overrides, log=lambda *_: None)
    saved = json.loads((work / "report.json").read_text())
    assert saved == first
    for key in ("t2i_accuracy", "t2i_accuracy_cfg", "t2i_accuracy_retrieval",
                "caption_accuracy", "chance", "minutes"):
        assert key in saved
    for key in demo.MODES:
        assert 0.0 <= saved[key] <= 1.0
    assert saved["chance"] == round(1 / 24, 4)  # 6 colours x 4 shapes
    assert saved["detector_on_truth"] == 1.0  # the detector reads every true scene
    assert saved["stages"] == {s: "ran" for s in ("prepare", "encoder", "index", "neighbors",
                                                  "train", "evaluate")}
    for name in ("report.md", "loss.png", "samples.png"):
        assert (work / name).stat().st_size > 0
    ckpt = work / "run" / "checkpoints" / "2"
    encoder = work / "data" / "retrieval" / "encoder" / "params.npz"
    stamps = (ckpt.stat().st_mtime_ns, encoder.stat().st_mtime_ns)

    second = demo.demo(CONFIGS / "demo.yaml", work, overrides, log=lambda *_: None)
    assert second["stages"] == {s: "reused" for s in first["stages"]}
    assert (ckpt.stat().st_mtime_ns, encoder.stat().st_mtime_ns) == stamps
    for key in (*demo.MODES, "caption_accuracy"):
        assert second[key] == first[key]

    # the run's export carries its tokenizers: `generate` serves both alike
    export(work / "run", work / "export", "safetensors")
    codes = {}
    for name in ("run", "export"):
        out = tmp_path / f"{name}.png"
        assert cli(["generate", "image", "--workdir", str(work / name), "--prompt",
                    "one shape: a small red circle at the center", "--num", "2", "--out",
                    str(out), "generate.temperature=0"]) == 0
        codes[name] = np.load(out.with_suffix(".npy"))
    assert codes["run"].shape == (1, 2, 1, 64)
    np.testing.assert_array_equal(codes["run"], codes["export"])


def test_retrieved_prompt_is_the_training_layout():
    vocab = load_config(CONFIGS / "demo.yaml").vocab.build()
    rng = np.random.default_rng(0)
    for _ in range(20):
        caption = vocab.text_ids(rng.integers(0, 100, rng.integers(1, 12)))
        image = vocab.image_ids(rng.integers(0, 32, 16))
        docs = [sequences.document(vocab.text_ids(rng.integers(0, 100, 5)),
                                   vocab.image_ids(rng.integers(0, 32, 16)), vocab)
                for _ in range(rng.integers(0, 3))]
        tokens, _ = sequences.example(sequences.document(caption, image, vocab), docs, vocab)
        cond, _ = prompts.text_to_image(vocab, caption)
        prompt = prompts.with_retrieved(vocab, cond, docs)
        # the prompt is the training example up to where the query's image starts
        np.testing.assert_array_equal(prompt, tokens[:len(tokens) - image.size - 1])
