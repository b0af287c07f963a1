"""The `README.md` of an hf-opt export: what the ids are, how an image becomes tokens, the
sequence layouts the model was trained on, and how to load it. Everything in it is computed
from the run's vocabulary and the exported image tokenizer's config."""

from __future__ import annotations

from cm3leon_jax.config import Config, VQGANConfig


def text(cfg: Config, origin: str, step: int, image: VQGANConfig | None,
         tokenizer: bool) -> str:
    """The card. `image`: the exported image tokenizer's config (None: none exported);
    `tokenizer`: whether `tokenizer.json` was written."""
    v, m = cfg.vocab.build(), cfg.model
    s, t, i = v.sentinel_offset, v.text_offset, v.image_offset
    if image is not None:
        g = image.latent_size
        images = (
            f"An image is {image.resolution}×{image.resolution} RGB; the VQ-GAN in "
            f"`tokenizers/image_tokenizer/` turns it into {g}×{g} codes from a codebook of "
            f"{image.codebook_size}, read row by row: {image.tokens_per_image} tokens, code c "
            f"being `<image:c>` (id {i} + c). The VQ-GAN is cm3leon_jax's own (`from "
            "cm3leon_jax.tokenizers.image import ImageTokenizer; ImageTokenizer.load(path)` "
            "encodes uint8 images to codes and decodes codes to images), not a transformers "
            "model.")
    else:
        images = (f"Code c of the image tokenizer is `<image:c>` (id {i} + c); no image tokenizer "
                  "was exported with this model.")
    per_image = image.tokens_per_image if image is not None else "the"
    if tokenizer:
        text_tokens = (f"sentencepiece pieces of `tokenizers/text_tokenizer.model`, piece k at id "
                       f"{t} + k; ids the model does not write as text are `<text:k>`")
        use = ("tok = AutoTokenizer.from_pretrained(path)\n"
               "ids = tok(\"<eos>a red square<break>\", return_tensors=\"pt\").input_ids\n"
               "logits = model(ids).logits  # next: the image's first code")
    else:
        text_tokens = f"text pieces, piece k at id {t} + k (no text tokenizer was exported)"
        use = "logits = model(torch.tensor([[1, 21, ...]])).logits  # ids as laid out above"
    return f"""---
library_name: transformers
tags: [cm3leon, opt, text-to-image, image-to-text]
---
# CM3Leon-style decoder (OPT layout)

A decoder-only transformer over one vocabulary of text and image tokens, exported by
cm3leon_jax from `{origin}` (step {step}). `OPTForCausalLM` loads the weights (no biases, no
LayerNorm affine: the layout of metaseq's CM3Leon); `AutoTokenizer` loads the tokenizer.

## Tokens

| ids | tokens |
|---|---|
| 0–{s - 1} | `<pad>` `<eos>` `<break>` `<eoss>` `<unk>` (special) |
| {s}–{t - 1} | sentinels `<mask:0>` … `<mask:{v.num_sentinels - 1}>` (special): CM3 infilling |
| {t}–{i - 1} | text: {text_tokens} |
| {i}–{v.used_size - 1} | image codes `<image:0>` … `<image:{v.image_size - 1}>` |
| {v.used_size}–{v.size - 1} | padding of the embedding table (never produced) |

The tokenizer adds nothing around the text: `tok(caption).input_ids` are the caption's text
ids. Token names in the text (`<eos>`, `<image:3>`) are those tokens.

## Images

{images}

## Sequences

A training document is `<eos> caption <break> image <eos>`; CM3 masking replaces a span by
`<mask:i>` and appends `<mask:i> span <eoss>`. So the prompts are:
- text → image: `<eos> caption <break>`, then {per_image} image tokens;
- image → text: `<eos> <mask:0> <break> image <eos> <mask:0>`, then text until `<eoss>`;
- infilling: `<eos> before <mask:0> after <eos> <mask:0>`, then text until `<eoss>`.

## Use

```python
from transformers import AutoTokenizer, OPTForCausalLM
model = OPTForCausalLM.from_pretrained(path)
{use}
```

`generate` samples from the whole vocabulary; cm3leon_jax's `cm3leon generate` (classifier-free
guidance, image positions restricted to image codes, contrastive decoding) runs on a
`--format safetensors` export. OPT counts positions from the attention mask: pass
`position_ids` for left-padded batches. Context: {m.max_seq_len} tokens.
"""
