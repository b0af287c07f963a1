"""The hf-opt export as transformers reads it: the tokenizer of the whole vocabulary, sharded
weights, the generation config and the model card.

The run is test_export's random-weight checkpoint of the tiny config whose tokenizers
(`sft.tokenizers`, the first place `weights.tokenizer_dir` looks) are a sentencepiece model
trained here and a random VQ-GAN with the vocabulary's 512 codes. References: sentencepiece
itself (through `TextTokenizer` and `Vocab`), `Vocab.token_name`, and our prompt layouts.
"""

import dataclasses
import json

import numpy as np
import pytest

from cm3leon_jax.config import ConfigError, load_config
from cm3leon_jax.export import hf_tokenizer
from cm3leon_jax.export.write import export
from cm3leon_jax.generate import prompts
from cm3leon_jax.layout import DataDir
from cm3leon_jax.tokenizers.text import TextTokenizer, train_text_tokenizer
from cm3leon_jax.vocab import Vocab
from conftest import CONFIGS, run_cli
from test_export import HAS_TORCH, RUN, mesh_of, write_run

interop = pytest.mark.skipif(not HAS_TORCH, reason="needs the interop extra (torch, transformers)")

CAPTIONS = ["a red square on the left", "two blue circles above a green cross",
            "three  small   triangles", "a cat at 12:30, photo 2024!", "ÜBER café naïve",
            " leading space", "trailing space ", "tab\tand\nnewline", "unseen: 日本 🙂 ß"]
TRAIN = [c for c in CAPTIONS[:5] for _ in range(4)] + ["the quick brown fox jumps over it"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from cm3leon_jax.tokenizers.image import ImageTokenizer

    toks = DataDir(tmp_path_factory.mktemp("toks"))
    train_text_tokenizer(TRAIN, 320).save(toks.text_tokenizer)
    cfg = load_config(CONFIGS / "tiny.yaml", [*RUN, f"sft.tokenizers={toks.root}"])
    ImageTokenizer.create(cfg.vqgan, seed=0, batch_size=4).save(toks.image_tokenizer)
    toks.manifest.write_text("{}")  # a data manifest: not a tokenizer, not exported
    return write_run(cfg, tmp_path_factory.mktemp("run")), toks, cfg


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    workdir, _, _ = run
    out = tmp_path_factory.mktemp("hf") / "opt"
    export(workdir, out, "hf-opt", mesh=mesh_of(1, 2, 1))
    return out


def expected_names(text: TextTokenizer, vocab: Vocab) -> list[str]:
    """Every id's token: the sentencepiece piece where sentencepiece writes it as text (its
    normal and byte pieces; here no user-defined ones), else our name."""
    sp = text._sp
    return [sp.id_to_piece(i - vocab.text_offset)
            if vocab.is_text(i) and i - vocab.text_offset < text.size
            and not (sp.is_control(i - vocab.text_offset) or sp.is_unknown(i - vocab.text_offset))
            else vocab.token_name(i) for i in range(vocab.used_size)]


@interop
def test_autotokenizer_encodes_our_ids_and_decodes_back(run, exported):
    from transformers import AutoTokenizer

    _, toks, cfg = run
    vocab, text = cfg.vocab.build(), TextTokenizer.load(toks.text_tokenizer)
    assert sorted(p.name for p in exported.iterdir()) == [
        "README.md", "cm3leon_export.json", "config.json", "generation_config.json",
        "model.safetensors", "tokenizer.json", "tokenizer_config.json", "tokenizers"]
    assert sorted(str(p.relative_to(exported)) for p in (exported / "tokenizers").rglob("*")) == [
        "tokenizers/image_tokenizer", "tokenizers/image_tokenizer/vqgan.json",
        "tokenizers/image_tokenizer/vqgan.npz", "tokenizers/text_tokenizer.model"]
    assert (exported / "tokenizers/text_tokenizer.model").read_bytes() == \
        toks.text_tokenizer.read_bytes()

    tok = AutoTokenizer.from_pretrained(exported)
    assert len(tok) == vocab.used_size == 1045
    assert tok.convert_ids_to_tokens(list(range(vocab.used_size))) == expected_names(text, vocab)
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (
        vocab.pad, vocab.eos, vocab.eos, vocab.text_offset)  # sentencepiece's <unk> piece
    for caption in CAPTIONS:
        want = vocab.text_ids(text.encode(caption)).tolist()
        assert tok(caption).input_ids == want, caption
        assert tok.decode(want) == caption == text.decode(text.encode(caption))
    # byte fallback: piece 1 + b is the byte b (<0x00> follows <unk>)
    assert tok("🙂").input_ids[-4:] == [vocab.text_offset + 1 + b for b in "🙂".encode()]

    codes = np.random.default_rng(0).integers(0, vocab.image_size, 64)
    image = vocab.image_ids(codes).tolist()
    names = "".join(f"<image:{c}>" for c in codes)
    assert tok.decode(image) == names and tok(names).input_ids == image
    assert tok.convert_ids_to_tokens(image) == [f"<image:{c}>" for c in codes]
    # a prompt written as text is our prompt: specials and codes by name, captions between
    cond, uncond = prompts.text_to_image(vocab, vocab.text_ids(text.encode(CAPTIONS[0])))
    assert tok(f"<eos>{CAPTIONS[0]}<break>{names}").input_ids == [*cond, *image]
    assert tok("<eos><mask:0><break>").input_ids == uncond.tolist()
    assert tok.decode([*cond, *image], skip_special_tokens=True) == CAPTIONS[0] + names


@interop
@pytest.mark.parametrize("model_type, byte_fallback", [("bpe", True), ("unigram", True),
                                                       ("bpe", False), ("unigram", False)])
def test_tokenizer_of_each_sentencepiece_kind(tmp_path, model_type, byte_fallback):
    """Both algorithms, with and without byte fallback (unknown characters then become
    sentencepiece's <unk>), as AutoTokenizer loads the files."""
    from transformers import AutoTokenizer

    cfg = load_config(CONFIGS / "tiny.yaml")
    vocab = cfg.vocab.build()
    text = train_text_tokenizer(TRAIN, 320 if byte_fallback else 60, model_type=model_type,
                                byte_fallback=byte_fallback)
    path = DataDir(tmp_path).text_tokenizer
    text.save(path)
    for name, content in hf_tokenizer.files(cfg, tmp_path, None, "test").items():
        (tmp_path / name).write_text(content)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.convert_ids_to_tokens(list(range(vocab.used_size))) == expected_names(text, vocab)
    for caption in CAPTIONS:
        pieces = text.encode(caption)
        assert tok(caption).input_ids == vocab.text_ids(pieces).tolist(), caption
        if text.decode(pieces) == caption:  # without byte fallback, unseen characters are lost
            assert tok.decode(vocab.text_ids(pieces)) == caption
    if not byte_fallback:
        assert vocab.text_offset in tok("🙂").input_ids  # <unk>, as sentencepiece


@interop
def test_sharded_export_loads_with_the_same_log_probs(run, exported, tmp_path, capsys):
    import torch
    from safetensors import safe_open
    from transformers import AutoTokenizer, GenerationConfig, OPTForCausalLM

    workdir, toks, cfg = run
    limit = 200_000
    sharded = tmp_path / "sharded"
    code, out, err = run_cli(capsys, "export", "--workdir", str(workdir), "--format", "hf-opt",
                             "--out", str(sharded), "--shard-bytes", str(limit))
    assert code == 0, err
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    n = len(files)
    assert n >= 3 and f"in {n} files" in out
    assert files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert set(index["weight_map"].values()) == set(files)
    with safe_open(str(exported / "model.safetensors"), "numpy") as f:
        single = {k: f.get_tensor(k) for k in f.keys()}
    assert set(index["weight_map"]) == set(single)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in single.values())
    for name in files:  # each file within the limit unless it holds one larger tensor
        with safe_open(str(sharded / name), "numpy") as f:
            held = {k: f.get_tensor(k) for k in f.keys()}
        assert all(index["weight_map"][k] == name for k in held)
        size = sum(a.nbytes for a in held.values())
        assert size <= limit or len(held) == 1
        for k, a in held.items():
            np.testing.assert_array_equal(a, single[k])

    tok = AutoTokenizer.from_pretrained(sharded)
    codes = np.random.default_rng(1).integers(0, cfg.vocab.image_size, 48)
    batch = tok([f"<eos>{c}<break>" + "".join(f"<image:{k}>" for k in codes) + "<eos>"
                 for c in CAPTIONS[:3]], return_tensors="pt", padding=True)
    log_probs = {}
    for d in (exported, sharded):
        model, info = OPTForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                     output_loading_info=True)
        assert not any(info.values()), info
        with torch.no_grad():
            logits = model.eval()(**batch).logits
        log_probs[d] = torch.log_softmax(logits, -1).numpy()
    assert log_probs[exported].shape[-1] == 1152
    np.testing.assert_array_equal(log_probs[sharded], log_probs[exported])

    gen = GenerationConfig.from_pretrained(sharded)
    g = cfg.generate
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, [1, 3], 0)
    assert (gen.do_sample, gen.temperature, gen.top_p, gen.top_k, gen.max_length) == (
        True, g.temperature, g.top_p, g.top_k, cfg.model.max_seq_len)


@interop
def test_model_card_states_the_vocabulary_and_the_images(run, exported, tmp_path):
    workdir, _, cfg = run
    card = (exported / "README.md").read_text()
    v = cfg.vocab.build()
    assert card.startswith("---\nlibrary_name: transformers\n")
    for line in ("| 0–4 | `<pad>` `<eos>` `<break>` `<eoss>` `<unk>` (special) |",
                 "| 5–20 | sentinels `<mask:0>` … `<mask:15>` (special): CM3 infilling |",
                 "| 21–532 | text: sentencepiece pieces of `tokenizers/text_tokenizer.model`, "
                 "piece k at id 21 + k; ids the model does not write as text are `<text:k>` |",
                 "| 533–1044 | image codes `<image:0>` … `<image:511>` |",
                 "| 1045–1151 | padding of the embedding table (never produced) |",
                 "An image is 32×32 RGB; the VQ-GAN in `tokenizers/image_tokenizer/` turns it "
                 "into 8×8 codes from a codebook of 512, read row by row: 64 tokens, code c "
                 "being `<image:c>` (id 533 + c)."):
        assert line in card, line
    assert (v.text_offset, v.image_offset, v.used_size, v.size) == (21, 533, 1045, 1152)
    meta = json.loads((exported / "cm3leon_export.json").read_text())
    assert meta["weights"] == "model.safetensors"
    assert meta["tokenizers"] == ["tokenizers/text_tokenizer.model",
                                  "tokenizers/image_tokenizer/vqgan.json",
                                  "tokenizers/image_tokenizer/vqgan.npz"]
    # without tokenizers: weights, configs and a card that says so
    bare = tmp_path / "bare"
    export(workdir, bare, "hf-opt", with_tokenizers=False)
    assert sorted(p.name for p in bare.iterdir()) == [
        "README.md", "cm3leon_export.json", "config.json", "generation_config.json",
        "model.safetensors"]
    card = (bare / "README.md").read_text()
    assert "| 21–532 | text: text pieces, piece k at id 21 + k (no text tokenizer was exported) |" \
        in card and "no image tokenizer was exported with this model" in card


def test_shard_bytes_is_refused_where_it_does_not_apply(run, tmp_path, capsys):
    workdir, _, _ = run
    with pytest.raises(ConfigError, match=r"--shard-bytes is for --format hf-opt; a safetensors "
                                          r"export is one model.safetensors"):
        export(workdir, tmp_path / "a", "safetensors", shard_bytes=10)
    with pytest.raises(ConfigError, match=r"--shard-bytes 0 must be >= 1"):
        export(workdir, tmp_path / "b", "hf-opt", shard_bytes=0)
    code, _, err = run_cli(capsys, "export", "--workdir", str(workdir), "--format", "hf-opt",
                           "--out", str(tmp_path / "c"), "--shard-bytes", "5GB")
    assert code == 2 and "invalid int value: '5GB'" in err
    assert not any(tmp_path.iterdir())


def sentencepiece_model(**options) -> TextTokenizer:
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TRAIN), model_writer=model,
                                   vocab_size=60, hard_vocab_limit=False, unk_id=0, bos_id=-1,
                                   eos_id=-1, pad_id=-1, minloglevel=2, **options)
    return TextTokenizer(model.getvalue())


@interop
def test_tokenizers_transformers_cannot_hold_are_refused(tmp_path):
    """A piece spelled `<break>` would be two ids of one name; a WORD model has no
    transformers conversion. Both before any array is read (`files` runs first)."""
    cfg, path = load_config(CONFIGS / "tiny.yaml"), DataDir(tmp_path).text_tokenizer
    sentencepiece_model(user_defined_symbols=["<break>"]).save(path)
    with pytest.raises(ConfigError, match=r"test: .*text_tokenizer.model: piece 1 is '<break>', "
                                          r"the name of vocabulary id 2: transformers cannot"):
        hf_tokenizer.files(cfg, tmp_path, None, "test")
    sentencepiece_model(model_type="word").save(path)
    with pytest.raises(ConfigError, match=r"a sentencepiece WORD model; only BPE and UNIGRAM"):
        hf_tokenizer.files(cfg, tmp_path, None, "test")
    sentencepiece_model().save(path)
    with pytest.raises(ConfigError, match=r"test: the image tokenizer has 64 codes but "
                                          r"vocab.image_size is 512"):
        hf_tokenizer.files(cfg, tmp_path, dataclasses.replace(cfg.vqgan, codebook_size=64),
                           "test")


@interop
def test_sharded_export_to_gs_equals_the_local_one(run, tmp_path, bucket, capsys):
    """Shards, index, tokenizer and card written to a bucket: the same bytes as locally."""
    from cm3leon_jax import storage

    workdir, _, _ = run
    outs = {"local": str(tmp_path / "opt"), "gs": f"{bucket}/opt"}
    for out in outs.values():
        code, _, err = run_cli(capsys, "export", "--workdir", str(workdir), "--format", "hf-opt",
                               "--out", out, "--shard-bytes", "200000")
        assert code == 0, err
    local = {str(p.relative_to(outs["local"])): p.read_bytes()
             for p in (tmp_path / "opt").rglob("*") if p.is_file()}
    assert "model.safetensors.index.json" in local and "tokenizer.json" in local
    for rel, data in local.items():
        assert storage.path(f"{outs['gs']}/{rel}").read_bytes() == data, rel
    assert not storage.path(f"{outs['gs']}.partial").exists()


@interop
def test_a_conversion_unlike_sentencepiece_is_refused(tmp_path, monkeypatch):
    """A conversion that loses sentencepiece's normalizer (older transformers lost its dummy
    prefix; here all of it) is caught by the probes before anything is written."""
    from transformers.convert_slow_tokenizer import SpmConverter

    real = SpmConverter.build_tokenizer_from_spm_proto

    def without_normalizer(*args, **kwargs):
        tok = real(*args, **kwargs)
        tok.normalizer = None
        return tok

    monkeypatch.setattr(SpmConverter, "build_tokenizer_from_spm_proto", without_normalizer)
    train_text_tokenizer(TRAIN, 320).save(DataDir(tmp_path).text_tokenizer)
    with pytest.raises(ConfigError, match=r"test: .*: transformers \S+ converts the text "
                                          r"tokenizer otherwise than sentencepiece: "
                                          r"' leading space' encodes"):
        hf_tokenizer.files(load_config(CONFIGS / "tiny.yaml"), tmp_path, None, "test")
