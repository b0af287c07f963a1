"""CLIP in JAX against transformers' CLIPModel and its PIL image processor, on random weights.

A small CLIPModel (width 64, 2 layers, 32x32 images of 8x8 patches, 16 text positions) is saved
with a tiny but valid CLIP BPE tokenizer (the 256 byte-level symbols with and without `</w>`,
a few merges, <|startoftext|> and <|endoftext|> last as in OpenAI's vocabulary) and the
processor, then loaded by `load_clip` without torch.
"""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from cm3leon_jax.config import ConfigError
from cm3leon_jax.eval.clip_score import clip_score, clip_score_files, read_captions
from cm3leon_jax.perception.clip import embed_images, embed_texts, load_clip, text_features

MAX_LEN = 16
CAPTIONS = [
    "a photo of the cat",
    "dog",
    "The dog, the CAT and 3 photos of a dog!",
    "",
    "the cat " * 12,  # 24 words: truncated to 14 tokens between <|startoftext|> and the eos
]
SIZES = [(40, 50), (50, 40), (33, 97), (32, 32), (20, 25)]  # (20, 25): upsampled


def _byte_symbols() -> list[str]:
    """GPT-2 / CLIP's printable stand-ins for the 256 bytes."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _write_bpe(d):
    chars = _byte_symbols()
    merges = ["t h", "th e</w>", "c a", "ca t</w>", "d o", "do g</w>", "o f</w>", "p h",
              "ph o", "pho t", "phot o</w>", "phot o"]
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return d / "vocab.json", d / "merges.txt"


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(folder, CLIPModel, tokenizer, PIL image processor), all saved to the folder."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("clip")
    tok = transformers.CLIPTokenizer(*(str(f) for f in _write_bpe(d)))
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=MAX_LEN, hidden_act="quick_gelu",
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8,
                           hidden_act="gelu", layer_norm_eps=1e-6),
        projection_dim=32)
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    # CLIPImageProcessor is the torchvision backend in transformers 5; this is the PIL one
    proc = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                              crop_size={"height": 32, "width": 32})
    proc.save_pretrained(d)
    return d, model, tok, proc


@pytest.fixture(scope="module")
def clip(hf):
    return load_clip(hf[0])


def _images(seed=0):
    """Smooth colour ramps with noise: distinct embeddings (uniform noise gives nearly one)."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in SIZES:
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        a = rng.uniform(-1, 1, (3, 3))
        f = a[:, 0] + 2 * a[:, 1] * yy[..., None] + 2 * a[:, 2] * xx[..., None]
        im = 128 + 100 * np.tanh(f) + rng.normal(0, 10, (h, w, 3))
        out.append(np.clip(im, 0, 255).astype(np.uint8))
    return out


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _features(out):
    """transformers 5 returns a ModelOutput with the projection in pooler_output."""
    return (out.pooler_output if hasattr(out, "pooler_output") else out).numpy()


def _hf_pixels(proc, images):
    return proc(images=images, return_tensors="np",
                input_data_format="channels_last")["pixel_values"]


def _hf_image_emb(hf, images):
    import torch  # the fixture has skipped the test when torch is absent

    _, model, _, proc = hf
    with torch.no_grad():
        return _unit(_features(model.get_image_features(
            pixel_values=torch.from_numpy(_hf_pixels(proc, images)))))


def _hf_text(hf, texts):
    import torch  # the fixture has skipped the test when torch is absent

    _, model, tok, _ = hf
    enc = tok(texts, padding="max_length", truncation=True, max_length=MAX_LEN,
              return_tensors="pt")
    with torch.no_grad():
        emb = _unit(_features(model.get_text_features(**enc)))
    return enc["input_ids"].numpy(), enc["attention_mask"].numpy(), emb


def test_preprocessing_equals_the_pil_image_processor(hf, clip):
    images = _images()
    ours = clip.preprocess(images)
    assert ours.shape == (len(images), 32, 32, 3) and ours.dtype == np.float32
    theirs = _hf_pixels(hf[3], images).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    same = np.stack(images[3:4])  # one [N, H, W, 3] array works as the list does
    np.testing.assert_array_equal(clip.preprocess(same), ours[3:4])


def test_image_embeddings_equal_transformers(hf, clip):
    images = _images()
    ours = embed_images(clip, images, batch_size=2)  # batches of 2, the last one padded
    assert ours.shape == (len(images), 32) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, _hf_image_emb(hf, images), rtol=0, atol=1e-4)


def test_token_ids_and_text_embeddings_equal_transformers(hf, clip):
    ids, mask, theirs = _hf_text(hf, CAPTIONS)
    our_ids, our_mask = clip.tokenize(CAPTIONS)
    np.testing.assert_array_equal(our_ids, ids)
    np.testing.assert_array_equal(our_mask, mask)
    assert our_ids[-1, -1] == hf[2].eos_token_id and our_mask[-1].all()  # truncated, eos kept
    ours = embed_texts(clip, CAPTIONS, batch_size=3)
    assert ours.shape == (len(CAPTIONS), 32)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_legacy_eos_token_id_pools_at_the_largest_id(hf, clip):
    """Configs with eos_token_id 2 (OpenAI's): transformers pools at argmax(ids)."""
    import torch  # the fixture has skipped the test when torch is absent

    model = hf[1]
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 520, (3, MAX_LEN)).astype(np.int32)
    ids[0, 0] = hf[2].bos_token_id  # the largest id at 0, 5 and 9; no eos anywhere
    ids[1, 5] = hf[2].bos_token_id
    ids[2, 9] = 522
    mask = np.ones_like(ids)
    legacy = dataclasses.replace(clip, eos_token_id=2)
    model.text_model.eos_token_id = 2
    try:
        with torch.no_grad():
            theirs = _unit(_features(model.get_text_features(
                input_ids=torch.from_numpy(ids.astype(np.int64)),
                attention_mask=torch.from_numpy(mask.astype(np.int64)))))
    finally:
        model.text_model.eos_token_id = hf[2].eos_token_id
    ours = text_features(legacy.params, ids, mask, legacy.text, 2)
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=1e-4)


def test_clip_score_equals_the_one_from_transformers_features(hf, clip, tmp_path):
    from PIL import Image  # pillow is a dependency; only this test writes images

    images = _images()
    _, _, text = _hf_text(hf, CAPTIONS)
    cos = _hf_image_emb(hf, images) @ text.T  # every image with every caption: 25 pairs
    assert (cos > 0).any() and (cos < 0).any()  # the clipping at 0 matters
    expected = float(np.mean(100 * np.maximum(cos, 0)))
    pairs = [(i, j) for i in range(len(images)) for j in range(len(CAPTIONS))]
    got = clip_score(clip, [images[i] for i, _ in pairs], [CAPTIONS[j] for _, j in pairs],
                     batch_size=8)
    assert got["n"] == len(pairs)
    assert abs(got["clip_score"] - expected) < 1e-4
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    (tmp_path / "captions.jsonl").write_text("".join(
        json.dumps({"image": f"{i}.png", "caption": CAPTIONS[j]}) + "\n" for i, j in pairs))
    files = clip_score_files(clip, tmp_path, tmp_path / "captions.jsonl", batch_size=8)
    assert files["n"] == len(pairs)
    assert abs(files["clip_score"] - expected) < 1e-4


def test_a_sharded_checkpoint_loads_the_same(hf, clip, tmp_path):
    import jax  # only to compare the two parameter trees
    import safetensors.numpy  # a dependency; only this test writes shards

    d = tmp_path / "sharded"
    shutil.copytree(hf[0], d)
    weights = safetensors.numpy.load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        safetensors.numpy.save_file({k: weights[k] for k in keys}, str(d / shard))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}))
    sharded = load_clip(d)
    jax.tree.map(np.testing.assert_array_equal, sharded.params, clip.params)


def test_a_model_folder_without_tokenizer_json_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=rf"{tmp_path}: no tokenizer\.json .*save the "
                                          r"processor"):
        load_clip(tmp_path)


def test_a_copied_model_without_its_tokenizer_is_refused(hf, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(hf[0], d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=rf"{d}: no tokenizer\.json"):
        load_clip(d)


@pytest.mark.parametrize("line, message", [
    ("{not json", r"captions\.jsonl:2: not JSON"),
    ('{"image": "a.png"}', r"captions\.jsonl:2: no 'caption' key"),
    ('{"image": "b.png", "caption": "x"}', r"captions\.jsonl:2: image 'b\.png' not found"),
    ('["a.png", "x"]', r"captions\.jsonl:2: a JSON object expected"),
])
def test_a_bad_captions_line_is_named(tmp_path, line, message):
    (tmp_path / "a.png").write_bytes(b"")
    f = tmp_path / "captions.jsonl"
    f.write_text('{"image": "a.png", "caption": "a cat"}\n' + line + "\n")
    with pytest.raises(ConfigError, match=message):
        read_captions(f, tmp_path)


def test_captions_are_read_with_blank_lines_skipped(tmp_path):
    f = tmp_path / "captions.jsonl"
    f.write_text('{"image": "a.png", "caption": "a cat"}\n\n{"image": "b.png", '
                 '"caption": "a dog", "seed": 3}\n')
    assert read_captions(f) == [{"image": "a.png", "caption": "a cat"},
                                {"image": "b.png", "caption": "a dog", "seed": 3}]
