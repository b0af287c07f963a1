"""The transformers tokenizer of an hf-opt export: our whole vocabulary in one `tokenizer.json`
that `AutoTokenizer.from_pretrained` loads (as `PreTrainedTokenizerFast`).

Text is the sentencepiece model converted by transformers (`SpmConverter.
build_tokenizer_from_spm_proto`, which follows the model's own normalizer, dummy prefix, byte
fallback and BPE or unigram pieces); we only move its ids to ours: piece k at
`vocab.text_offset + k`. The other ids are tokens of their own, by `Vocab.token_name`:
`<pad>` ... `<unk>` and `<mask:i>` (special), `<image:c>` (code c, at `image_offset + c`), and
`<text:k>` for text ids sentencepiece never writes as text (its `<unk>` and control pieces,
and the ids the model leaves unfilled). They sit in the model's vocabulary at their ids and are
added tokens too, so the text between them is encoded chunk by chunk, each chunk with its own
dummy prefix: the way our captions are encoded, one at a time. No token is added around the
text: `tokenizer(caption).input_ids` are exactly our ids.

Conversions have changed between transformers versions, so the result is held to
sentencepiece on probe strings (every piece, runs of pieces, whitespace, digits, bytes)
before anything is written; a difference refuses the export.
"""

from __future__ import annotations

import importlib.util
import json
import re

from tokenizers import AddedToken, Tokenizer

from cm3leon_jax.config import Config, ConfigError, VQGANConfig
from cm3leon_jax.layout import DataDir
from cm3leon_jax.storage import PathLike
from cm3leon_jax.tokenizers.text import TextTokenizer
from cm3leon_jax.vocab import Vocab

TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"

# sentencepiece ModelProto.SentencePiece.Type values that are written as text
NORMAL, USER_DEFINED, BYTE = 1, 4, 6
TEXT_TYPES = (NORMAL, USER_DEFINED, BYTE)
NAMED = re.compile(r"<(pad|eos|break|eoss|unk|mask:\d+|text:\d+|image:\d+)>")  # token_name's
BYTE_NAME = re.compile(r"<0x[0-9A-F]{2}>")  # sentencepiece's byte pieces
PROBES = ("a", " leading space", "trailing space ", "two  spaces   three", "tab\tand\nnewline",
          "digits 0123456789 and 3.14", "punctuation: a-b_c.d,e;f!g?(h) 'i' \"j\"",
          "Àccénts ß æ ø naïve", "日本語のテキスト", "emoji 🙂👍🏽", "\u2581 lower eighth block")


def _model_proto(model_proto: bytes):
    from transformers.convert_slow_tokenizer import import_protobuf  # optional: interop extra

    try:
        pb2 = import_protobuf()
    except Exception:  # sentencepiece's generated module can need a newer protobuf runtime
        from transformers.utils import sentencepiece_model_pb2_new as pb2  # same: protobuf >= 4
    proto = pb2.ModelProto()
    proto.ParseFromString(model_proto)
    return proto


def token_names(proto, vocab: Vocab, where: str) -> list[str]:
    """The token of every id in [0, vocab.used_size); `where` names the text tokenizer."""
    names = [vocab.token_name(i) for i in range(vocab.used_size)]
    for k, piece in enumerate(proto.pieces):
        if piece.type in TEXT_TYPES:
            names[vocab.text_offset + k] = piece.piece
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ConfigError(
                f"{where}: piece {i - vocab.text_offset} is {name!r}, the name of "
                f"vocabulary id {seen[name]}: transformers cannot tell them apart (export "
                "with --skip-tokenizers for weights without a tokenizer)")
        seen[name] = i
    return names


def files(cfg: Config, data_dir: PathLike, image: VQGANConfig | None, where: str) -> dict:
    """{file name: text} of the transformers tokenizer of the tokenizers in `data_dir` (whose
    image tokenizer has the config `image`), refused unless every piece and code has its id in
    the model's vocabulary; `where` says where `data_dir` came from."""
    vocab, path = cfg.vocab.build(), DataDir(data_dir).text_tokenizer
    if not path.exists():
        raise ConfigError(f"{where}: {path} does not exist; the transformers tokenizer is built "
                          "from it (export with --skip-tokenizers for the weights alone)")
    if importlib.util.find_spec("transformers") is None:
        raise ConfigError("the transformers tokenizer of an hf-opt export is converted by "
                          "transformers: pip install -e \".[interop]\" (or export with "
                          "--skip-tokenizers for the weights alone)")
    text = TextTokenizer.load(path)
    try:
        vocab.check_tokenizers(text.size, vocab.image_size if image is None
                               else image.codebook_size)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    tok, unk = build(text, vocab, f"{where}: {path}")
    return {TOKENIZER: tok.to_str(pretty=True),
            TOKENIZER_CONFIG: json.dumps(tokenizer_config(unk, vocab, cfg.model.max_seq_len),
                                         indent=2) + "\n"}


def build(text: TextTokenizer, vocab: Vocab, where: str):
    """(tokenizers.Tokenizer, unk token) of `text` in `vocab`; `where` names the text
    tokenizer in errors."""
    from transformers.convert_slow_tokenizer import SpmConverter  # optional: interop extra

    proto = _model_proto(text.model_proto)
    kind = proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)
    if kind not in ("BPE", "UNIGRAM"):
        raise ConfigError(f"{where}: a sentencepiece {kind} model; only BPE and UNIGRAM models "
                          "convert to transformers (export with --skip-tokenizers)")
    names = token_names(proto, vocab, where)
    pieces = [(p.piece, p.score) for p in proto.pieces]
    bpe = kind == "BPE"
    # a dict of piece ids makes a BPE model (merges from the scores), a list a unigram one
    converted = SpmConverter.build_tokenizer_from_spm_proto(
        proto, {p: k for k, (p, _) in enumerate(pieces)} if bpe else pieces)
    spec = json.loads(converted.to_str())
    ours = names[:vocab.image_offset]  # the model's vocabulary; image codes are added after
    unk = vocab.text_offset + proto.trainer_spec.unk_id
    if bpe:
        spec["model"]["vocab"] = {name: i for i, name in enumerate(ours)}
        spec["model"]["unk_token"] = names[unk]
    else:  # a unigram vocabulary is a list; fillers at the lowest score leave the unk score as is
        floor = min(score for _, score in pieces)
        scores = [floor] * len(ours)
        for k, (_, score) in enumerate(pieces):
            scores[vocab.text_offset + k] = score
        spec["model"]["vocab"] = [[name, s] for name, s in zip(ours, scores)]
        spec["model"]["unk_id"] = unk
    tok = Tokenizer.from_str(json.dumps(spec))
    written = {vocab.text_offset + k for k, p in enumerate(proto.pieces) if p.type in TEXT_TYPES}
    tok.add_special_tokens([AddedToken(names[i], special=True, normalized=False)
                            for i in range(vocab.image_offset) if i not in written])
    tok.add_tokens([AddedToken(names[i], special=False, normalized=False)
                    for i in range(vocab.image_offset, vocab.used_size)])
    # tokenizers' Unigram also matches a byte piece's name in the text; sentencepiece does not
    _check(tok, text, vocab, names, re.compile(f"{NAMED.pattern}|{BYTE_NAME.pattern}") if not bpe
           else NAMED, where)
    return tok, names[unk]


def _check(tok, text: TextTokenizer, vocab: Vocab, names: list[str], skip: re.Pattern,
           where: str) -> None:
    """Refuse a conversion that encodes or decodes a probe otherwise than sentencepiece;
    probes with a `skip` match in them (token names) are left out."""
    import transformers  # optional: interop extra (its version, for the error)

    surfaces = [names[vocab.text_offset + k].replace("\u2581", " ") for k in range(text.size)]
    probes = [*PROBES, *surfaces,
              *("".join(surfaces[k:k + 8]) for k in range(0, len(surfaces), 8))]
    probes = [p for p in probes if not skip.search(p)]
    got = tok.encode_batch(probes, add_special_tokens=False)
    for probe, enc, pieces in zip(probes, got, text.encode_batch(probes)):
        want = vocab.text_ids(pieces).tolist()
        back = tok.decode(want, skip_special_tokens=False)
        if enc.ids != want or (text.decode(pieces) == probe and back != probe):
            raise ConfigError(
                f"{where}: transformers {transformers.__version__} converts the text tokenizer "
                f"otherwise than sentencepiece: {probe!r} encodes to {enc.ids} and decodes to "
                f"{back!r}, sentencepiece gives {want}; use the transformers version of the "
                "interop tests (docs/export.md) or export with --skip-tokenizers")


def tokenizer_config(unk: str, vocab: Vocab, max_len: int) -> dict:
    """`tokenizer_config.json`: the class that loads `tokenizer.json` as it is (OPT's own
    class would read a GPT-2 vocabulary), our specials by role, no space clean-up on decode."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": vocab.token_name(vocab.eos), "eos_token": vocab.token_name(vocab.eos),
        "pad_token": vocab.token_name(vocab.pad), "unk_token": unk,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }
