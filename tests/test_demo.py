import json

import numpy as np
import pytest
from conftest import CONFIGS, run_cli
from PIL import Image

from cm3leon_jax.cli import main as cli
from cm3leon_jax.config import load_config
from cm3leon_jax.demo import job as demo
from cm3leon_jax.export.write import export
from cm3leon_jax.data import sequences
from cm3leon_jax.generate import prompts
from cm3leon_jax.perception.clip import embed_images, embed_texts, load_clip
from cm3leon_jax.perception.inception import random_init, save_npz
from cm3leon_jax.tokenizers.directory import load_tokenizers
from cm3leon_jax.tokenizers.image import ImageTokenizer
from cm3leon_jax.train.metrics import read_metrics
from cm3leon_jax.train.trainer import train
from test_clip import hf  # noqa: F401 (fixture)

VQ = ["vqgan.resolution=32", "vqgan.base_channels=8", "vqgan.channel_mult=[1, 2, 4]",
      "vqgan.num_res_blocks=1", "vqgan.mid_attn=false", "vqgan.norm_groups=4",
      "vqgan.z_channels=8", "vqgan.embed_dim=4", "vqgan.codebook_size=32", "vocab.image_size=32"]
MICRO = ["source.size=40", "retrieval.train_steps=2", "retrieval.train_batch_size=8",
         "retrieval.embed_batch=16", "retrieval.recall_queries=8", "train.steps=2",
         "train.batch_size=8", "train.checkpoint_every=2", "optimizer.warmup_steps=1",
         "model.n_layers=1", "model.d_model=32", "model.d_ff=64", "model.n_heads=2",
         "demo.eval_scenes=3", "demo.grid_rows=2", "demo.heldout_docs=16", "generate.seed=3",
         "demo.rerank_samples=2", "demo.baseline=true"]


@pytest.fixture(scope="module")
def micro_demo(tmp_path_factory):
    """(demo directory, overrides, first report) of a micro demo run."""
    tmp_path = tmp_path_factory.mktemp("micro_demo")
    # an untrained image tokenizer: VQ-GAN training has its own tests; this checks the flow
    tok = tmp_path / "vq"
    ImageTokenizer.create(load_config(CONFIGS / "demo.yaml", VQ).vqgan, seed=0).save(tok)
    work = tmp_path / "demo"
    overrides = [*VQ, *MICRO, f"prepare.image_tokenizer={tok}"]
    return work, overrides, demo.demo(CONFIGS / "demo.yaml", work, overrides,
                                      log=lambda *_: None)


@pytest.mark.slow
def test_demo_end_to_end_and_rerun_reuses_stages(micro_demo, tmp_path):
    work, overrides, first = micro_demo
    saved = json.loads((work / "report.json").read_text())
    assert saved == first
    for key in ("t2i_accuracy", "t2i_accuracy_cfg", "t2i_accuracy_retrieval",
                "caption_accuracy", "chance", "minutes"):
        assert key in saved
    for key in demo.MODES:
        assert 0.0 <= saved[key] <= 1.0
    assert saved["chance"] == round(1 / 24, 4)  # 6 colours x 4 shapes
    assert saved["detector_on_truth"] == 1.0  # the detector reads every true scene
    assert saved["stages"] == {s: "ran" for s in ("prepare", "heldout", "encoder", "index",
                                                  "neighbors", "train", "evaluate")}
    # the no-retrieval baseline: the same steps of the same rows, scored on the same scenes
    baseline = read_metrics(work / "ablation" / "k0")
    assert baseline[-1]["step"] == saved["train_steps"]
    assert saved["final_eval_loss_no_retrieval_training"] == baseline[-1]["eval_loss"] > 0
    for key in demo.BASELINE_MODES:
        assert 0.0 <= saved[f"{key}_no_retrieval_training"] <= 1.0
    for key in ("image_nll", "image_nll_retrieval", "image_nll_no_retrieval_training"):
        assert saved[key] > 0
    assert 0.0 <= saved[demo.RERANKED] <= 1.0 and saved[demo.fd_key(demo.RERANKED)] >= 0
    assert set(saved["stage_minutes"]) == set(saved["stages"])  # where the wall time went
    assert 0 < sum(saved["stage_minutes"].values()) <= saved["minutes"] + 0.01
    for mode in demo.MODES:  # the distribution-level score of every mode, and its floor
        assert saved[demo.fd_key(mode)] >= 0
    assert saved["fd_reconstructions"] >= 0
    # the held-out loss is logged at the last step, on the other seed's prepared scenes
    logged = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval_loss" in r] == [2]
    assert saved["final_eval_loss"] == logged[-1]["eval_loss"] > 0
    assert json.loads((work / "heldout" / "manifest.json").read_text())["documents"] == 16
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


@pytest.mark.slow
def test_the_baseline_trained_beside_the_run_equals_one_trained_alone(micro_demo, tmp_path):
    """demo.baseline trains data.k=0 in a child process next to the run: the same steps,
    the same losses and held-out losses as the same config trained in this process, and
    its output in its own log, not the terminal's."""
    work, overrides, _ = micro_demo
    cfg = demo.with_k(demo.demo_config(CONFIGS / "demo.yaml", work, overrides), 0)
    train(cfg, tmp_path / "alone")
    facts = lambda rows: [(r["step"], r["loss"], r.get("eval_loss")) for r in rows]
    beside = read_metrics(work / "ablation" / "k0")
    assert facts(beside) == facts(read_metrics(tmp_path / "alone"))
    assert beside[-1]["step"] == cfg.train.steps
    assert "trained steps 1..2" in (work / "ablation" / "k0" / "train.log").read_text()


@pytest.mark.slow
def test_a_preempted_training_stops_the_ablation_before_it_is_scored(micro_demo, tmp_path,
                                                                      monkeypatch):
    """SIGTERM while a run trains: its checkpoint stays where it stopped and the command
    fails saying so, instead of scoring a half-trained model as the run's result."""
    import os
    import shutil
    import signal

    from cm3leon_jax.demo import ablate
    from cm3leon_jax.train.trainer import Hook

    work, overrides, _ = micro_demo
    copy = tmp_path / "demo"
    shutil.copytree(work, copy)
    overrides = [*overrides, "train.steps=3"]
    term = Hook(lambda step, state: os.kill(os.getpid(), signal.SIGTERM), at=frozenset({1}))
    monkeypatch.setattr(demo, "train", lambda cfg, root: train(cfg, root, hooks=(term,)))
    with pytest.raises(RuntimeError, match=r"k2: training stopped at step 2 of 3 \(SIGTERM\); "
                                           r"its checkpoint is saved: run the same command"):
        ablate.ablate(CONFIGS / "demo.yaml", copy, overrides, train_ks=(2,), infer_ks=(0,),
                      log=lambda *_: None)
    assert sorted(p.name for p in (copy / "ablation" / "k2" / "checkpoints").iterdir()) == ["2"]
    saved = copy / "ablation" / "ablation.json"
    assert not saved.exists() or "k=2" not in json.loads(saved.read_text())["runs"]


@pytest.mark.slow
def test_eval_t2i_on_the_demo_run(micro_demo, hf, tmp_path, capsys):  # noqa: F811
    """`cm3leon eval t2i` end to end on a run: retrieval at inference, CLIP reranking, FID,
    CLIP score, copy measure and a report that reproduces itself (random CLIP, Inception)."""
    work, _, _ = micro_demo
    weights = tmp_path / "inception.npz"
    save_npz(random_init(0), weights)
    captions = tmp_path / "captions.jsonl"
    scenes = [f"one shape: a {s} {c} {k} at the center" for s in ("small", "large")
              for c in ("red", "blue") for k in ("circle", "square")]
    captions.write_text("".join(json.dumps({"caption": c, "image": f"{i}.png"}) + "\n"
                                for i, c in enumerate(scenes)))
    real = tmp_path / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in range(len(scenes)):
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(real / f"{i}.png")
    args = ["eval", "t2i", "--workdir", str(work / "run"), "--captions", str(captions),
            "--real", str(real), "--inception-weights", str(weights), "--clip", str(hf[0]),
            "--num", "5", "--seed", "1", "--retrieve", "1", "--samples", "2", "--rerank",
            "clip", "--batch-size", "3", "--dims", "64"]
    assert cli([*args, "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["n_fake"] == 5 and report["n_real"] == 8 and report["fid"] > 0
    copies = [json.loads(line)["copy_cosine"] for line in (tmp_path / "a" / "copy.jsonl").open()]
    assert report["retrieved_images"] == len(copies) == 5
    assert report["copy_cosine_mean"] == pytest.approx(np.mean(copies), rel=1e-12)
    assert report["copy_share_above_0.95"] == np.mean(np.asarray(copies) > 0.95)
    assert report["settings"]["clip_score_after_clip_rerank"] is True
    s = report["settings"]
    assert (s["num"], s["seed"], s["retrieve"], s["samples"], s["rerank"], s["dims"]) == \
        (5, 1, 1, 2, "clip", 64)
    assert s["generate"]["candidates"] == 2 and s["checkpoint_step"] == 2
    drawn = [json.loads(line) for line in (tmp_path / "a" / "captions.jsonl").open()]
    assert [d["caption"] for d in drawn] == [scenes[i] for i in np.random.default_rng(1).choice(
        len(scenes), 5, replace=False)]
    assert sorted(p.name for p in (tmp_path / "a" / "images").iterdir()) == \
        [f"{i:06d}.png" for i in range(5)]
    # the numbers are those of the saved images, measured again by the two other commands
    c, out, _ = run_cli(capsys, *["eval", "clip-score", "--clip", str(hf[0]), "--images",
                              str(tmp_path / "a" / "images"), "--captions",
                              str(tmp_path / "a" / "captions.jsonl"), "--json"])
    out = json.loads(out.splitlines()[-1])
    assert c == 0 and out["clip_score"] == pytest.approx(report["clip_score"], abs=1e-4)
    c, out, _ = run_cli(capsys, *["eval", "fid", "--real", str(real), "--fake",
                              str(tmp_path / "a" / "images"), "--inception-weights",
                              str(weights), "--dims", "64", "--json"])
    out = json.loads(out.splitlines()[-1])
    assert c == 0 and out["fid"] == pytest.approx(report["fid"], rel=1e-6)
    # the same command again reproduces the report exactly
    assert cli([*args, "--out", str(tmp_path / "b")]) == 0
    again = json.loads((tmp_path / "b" / "report.json").read_text())
    assert {k: v for k, v in again.items() if k != "settings"} == \
        {k: v for k, v in report.items() if k != "settings"}
    # `generate image --rerank clip` keeps the candidate CLIP likes best among the same draws
    prompt = ["--workdir", str(work / "run"), "--prompt", scenes[0], "--num", "2",
              "--samples", "3"]
    assert cli(["generate", "image", *prompt, "--out", str(tmp_path / "all.png")]) == 0
    assert cli(["generate", "image", *prompt, "--rerank", "clip", "--clip", str(hf[0]),
                "--out", str(tmp_path / "best.png")]) == 0
    every, best = np.load(tmp_path / "all.npy"), np.load(tmp_path / "best.npy")
    assert every.shape == (1, 2, 3, 64) and best.shape == (1, 2, 1, 64)
    toks = load_tokenizers(work / "data", load_config(CONFIGS / "demo.yaml", VQ).vocab.build())
    clip = load_clip(hf[0])
    for j in range(2):
        sims = embed_images(clip, toks.image.decode(every[0, j])) @ embed_texts(clip, scenes[:1])[0]
        np.testing.assert_array_equal(best[0, j, 0], every[0, j, int(np.argmax(sims))])
    # the real set of the drawn captions only, centre-cropped: as many real images as fakes
    assert cli([*args, "--real-drawn", "--center-crop", "--out", str(tmp_path / "d")]) == 0
    drawn_real = json.loads((tmp_path / "d" / "report.json").read_text())
    assert drawn_real["n_real"] == 5 and drawn_real["fid"] != report["fid"]
    # bad requests are refused before any weight is read
    assert cli([*args, "--out", str(tmp_path / "a")]) == 2  # images/ already full
    assert cli([*args[:-2], "--samples", "2", "--rerank", "none", "--out", "x"]) == 2
    assert cli([*args[:-4], "--num", "99", "--out", str(tmp_path / "c")]) == 2


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


@pytest.mark.slow
def test_retrieval_ablation_reuses_the_demo_run_and_scores_every_mode(micro_demo):
    from cm3leon_jax.config import ConfigError
    from cm3leon_jax.demo import ablate

    work, overrides, _ = micro_demo
    saved = json.loads((work / "report.json").read_text())
    run = lambda: ablate.ablate(CONFIGS / "demo.yaml", work, overrides, train_ks=(0, 1),
                                infer_ks=(0, 1), log=lambda *_: None)
    result = run()
    assert set(result["runs"]) == {"k=0", "k=1"}
    # shapes are judged by the detector: on the true scenes and the tokenizer's
    # reconstructions it reads what the demo's report says it reads
    assert (result["source"], result["judge"], result["chance"]) == ("shapes", "detector",
                                                                     demo.chance())
    for key in ("truth", "reconstructions"):
        assert round(result[f"judge_on_{key}"], 4) == saved[f"detector_on_{key}"], key
    # the demo trains with data.k=1: that run is the demo's own, and the same seeds give the
    # demo's samples, so the four modes the demo reports come out the same
    demo_run = result["runs"]["k=1"]
    for mode, key in (("k0", "t2i_accuracy"), ("k0_cfg", "t2i_accuracy_cfg"),
                      ("k1", "t2i_accuracy_retrieval"), ("k1_cfg", "t2i_accuracy_retrieval_cfg")):
        assert round(demo_run[mode]["accuracy"], 4) == saved[key], mode
    for key, value in (("image_nll", demo_run["image_nll_k0"]),
                       ("image_nll_retrieval", demo_run["image_nll_k1"])):
        assert round(value, 4) == saved[key], key
    # the k = 0 run is the demo's baseline, reused, not trained again: the same scores
    baseline = result["runs"]["k=0"]
    for mode, key in (("k0", "t2i_accuracy"), ("k0_cfg", "t2i_accuracy_cfg")):
        assert round(baseline[mode]["accuracy"], 4) == saved[f"{key}_no_retrieval_training"]
    assert round(baseline["image_nll_k0"], 4) == saved["image_nll_no_retrieval_training"]
    k0 = work / "ablation" / "k0"
    assert read_metrics(k0)[-1]["step"] == saved["train_steps"]  # the same steps and rows
    n = saved["eval_scenes"]
    for scores in result["runs"].values():
        for mode in ("k0", "k0_cfg", "k1", "k1_cfg"):
            p = scores[mode]["accuracy"]
            assert scores[mode]["se"] == pytest.approx(np.sqrt(p * (1 - p) / n), abs=0)
            assert round(p * n) == pytest.approx(p * n)  # a share of the n scenes
        for mode in ("k1", "k1_cfg"):
            assert 0 <= scores[mode]["copied"] <= scores[mode]["copied_share"] + 1e-9 <= 1 + 1e-9
        assert "copied" not in scores["k0"] and 0.5 < scores["real_token_share"] <= 1
        assert 0 <= scores["truth_copied_share_k1"] <= 1
    for name in ("ablation.json", "ablation.md", "ablation.png"):
        assert (work / "ablation" / name).stat().st_size > 0
    assert "| k=0 |" in (work / "ablation" / "ablation.md").read_text()
    before = sorted(p.stat().st_mtime_ns for p in k0.rglob("*") if p.is_file())
    assert run() == result  # reused: nothing trained or scored again
    assert sorted(p.stat().st_mtime_ns for p in k0.rglob("*") if p.is_file()) == before
    for bad, match in (((0, -1), "--train-k"), ((0, 9), "retrieval.pool=4")):
        with pytest.raises(ConfigError, match=match):
            ablate.ablate(CONFIGS / "demo.yaml", work, overrides, train_ks=bad, infer_ks=(0,),
                          log=lambda *_: None)
