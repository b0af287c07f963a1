"""Sequence assembly and CM3 masking: exact layouts and properties over thousands of
random examples."""

import math

import numpy as np
import pytest
from scipy import stats

from cm3leon_jax.data import cm3, sequences
from cm3leon_jax.vocab import Vocab

VOCAB = Vocab(text_size=100, image_size=100, num_sentinels=6)
HALF = 50  # ids below HALF (in both ranges) go to retrieved documents, above to the query


def random_example(rng, vocab=VOCAB, max_k=3, min_len=0):
    """(tokens, is_retrieved, k): random documents, some text- or image-only."""
    def doc(query):
        lo, hi = (HALF, 100) if query else (0, HALF)
        n_text, n_image = rng.integers(0, 12), rng.integers(0, 40)
        if n_text + n_image == 0 or n_text + n_image < min_len:
            n_text, n_image = max(1, min_len // 3), max(1, min_len)
        return sequences.document(vocab.text_ids(rng.integers(lo, hi, n_text)),
                                  vocab.image_ids(rng.integers(lo, hi, n_image)), vocab,
                                  image_first=bool(rng.random() < 0.3))
    k = int(rng.integers(0, max_k + 1))
    tokens, flags = sequences.example(doc(True), [doc(False) for _ in range(k)], vocab)
    return tokens, flags, k


def test_document_and_example_layout():
    v = VOCAB
    t, i = v.text_ids([1, 2]), v.image_ids([3, 4, 5])
    assert sequences.document(t, i, v).tolist() == [*t, v.brk, *i]
    assert sequences.document(t, i, v, image_first=True).tolist() == [*i, v.brk, *t]
    assert sequences.document(t[:0], i, v).tolist() == i.tolist()
    r1, r2, q = v.text_ids([7]), v.image_ids([8, 9]), v.text_ids([10, 11])
    tokens, flags = sequences.example(q, [r1, r2], v)
    assert tokens.tolist() == [v.eos, *r1, v.brk, *r2, v.brk, *q, v.eos]
    assert flags.tolist() == [True] * 6 + [False] * 3
    tokens, flags = sequences.example(q, [], v)
    assert tokens.tolist() == [v.eos, *q, v.eos] and not flags.any()
    with pytest.raises(ValueError, match="doc 3: field 'image' holds ids outside"):
        sequences.document(t, t, v, where="doc 3")
    with pytest.raises(ValueError, match="both 'text' and 'image' are empty"):
        sequences.document(t[:0], i[:0], v)


def test_undo_restores_every_example_exactly():
    rng = np.random.default_rng(0)
    truncated = 0
    for trial in range(3000):
        tokens, _, _ = random_example(rng)
        lam = float(rng.choice([0.5, 1.0, 3.0]))
        whole = float(rng.choice([0.0, 0.5]))
        max_len = 10_000 if trial % 2 else int(rng.integers(8, 120))
        masked, origin, cut, _ = cm3.cm3_transform(tokens, rng, VOCAB, lam, max_len, whole)
        assert masked.size <= max_len
        np.testing.assert_array_equal(cm3.unmask(masked, VOCAB), tokens[:tokens.size - cut])
        moved = ~(VOCAB.is_sentinel(masked) | (masked == VOCAB.eoss))
        np.testing.assert_array_equal(masked[moved], tokens[origin[moved]])
        truncated += cut > 0
        if max_len == 10_000:
            assert cut == 0
    assert truncated > 500  # the truncation path was exercised


def test_no_span_crosses_or_masks_a_boundary():
    rng = np.random.default_rng(1)
    for trial in range(3000):
        tokens, _, _ = random_example(rng)
        whole = 1.0 if trial % 3 == 0 else 0.0
        spans = cm3.choose_spans(tokens, int(rng.integers(0, 6)), rng, VOCAB, whole)
        boundary = (tokens == VOCAB.eos) | (tokens == VOCAB.brk)
        prev_end = 0
        for s, e in spans:
            assert prev_end <= s < e  # sorted, disjoint, non-empty
            assert not boundary[s:e].any()
            prev_end = e
        if whole and spans:  # one of them a whole segment: boundaries on both sides
            assert any(boundary[s - 1] and (e == tokens.size or boundary[e]) for s, e in spans)
        masked, _ = cm3.apply_spans(tokens, spans, VOCAB)
        # every <break> and <eos> stays in the source part, in place
        n = len(spans)
        source = masked[:masked.size - sum(e - s + 2 for s, e in spans)]
        assert np.sum(masked == VOCAB.brk) == np.sum(source == VOCAB.brk) == np.sum(tokens == VOCAB.brk)
        assert np.sum(VOCAB.is_sentinel(source)) == n


def test_a_whole_segment_span_lands_on_every_segment_equally_often():
    """metaseq's full-segment rotation: the segment is uniform among the example's segments,
    not drawn in proportion to its length (a 3-token caption as often as a 60-token image)."""
    v = VOCAB
    lengths = [3, 60, 5, 40, 2, 30]  # caption, image, caption, image, query caption, image
    parts = [v.text_ids(np.zeros(n, int)) if i % 2 == 0 else v.image_ids(np.zeros(n, int))
             for i, n in enumerate(lengths)]
    docs = [np.concatenate([parts[i], [v.brk], parts[i + 1]]) for i in (0, 2, 4)]
    tokens, _ = sequences.example(docs[2], docs[:2], v)
    starts = np.flatnonzero((tokens == v.eos) | (tokens == v.brk))[:-1] + 1
    rng = np.random.default_rng(3)
    hits = np.zeros(len(lengths), int)
    for _ in range(6000):
        (span,) = cm3.choose_spans(tokens, 1, rng, v, whole_segment=1.0)
        hits[int(np.searchsorted(starts, span[0], side="right")) - 1] += 1
        assert span[1] - span[0] == lengths[int(np.searchsorted(starts, span[0], "right")) - 1]
    assert stats.chisquare(hits).pvalue > 1e-3, hits  # uniform over the six segments
    by_length = np.asarray(lengths) / sum(lengths)  # what growing a random span would give
    assert stats.chisquare(hits, hits.sum() * by_length).pvalue < 1e-6, hits
    # with more spans, one is whole and the others keep out of it
    for _ in range(500):
        spans = cm3.choose_spans(tokens, 3, rng, v, whole_segment=1.0)
        assert len(spans) == 3
        whole = [(s, e) for s, e in spans if e - s in lengths and s in starts]
        assert whole


def clamped_poisson(lam, top):
    p = [math.exp(-lam) * lam**i / math.factorial(i) for i in range(top)]
    return np.array(p + [1 - sum(p)])


def test_span_counts_follow_clamped_poisson():
    rng = np.random.default_rng(2)
    lam, top = 1.5, VOCAB.num_sentinels - 1  # clamp at S - 1 = 5
    counts = np.zeros(top + 1, int)
    for _ in range(5000):
        tokens, _, _ = random_example(rng, min_len=12)  # >= 2*top - 1 maskable tokens
        masked, _, cut, _ = cm3.cm3_transform(tokens, rng, VOCAB, lam, 10_000)
        counts[int(VOCAB.is_sentinel(masked).sum()) // 2] += 1
    assert counts[top] > 0  # the clamp was hit
    p_ok = stats.chisquare(counts, counts.sum() * clamped_poisson(lam, top)).pvalue
    assert p_ok > 1e-3, counts
    # the same test rejects a nearby distribution, so it has power
    p_off = stats.chisquare(counts, counts.sum() * clamped_poisson(lam * 1.1, top)).pvalue
    assert p_off < 1e-3, counts


def span_region(masked):
    """Region (True = retrieved) of each span i, from its first moved token's id."""
    sent = np.flatnonzero(VOCAB.is_sentinel(masked))
    n = sent.size // 2
    first = masked[sent[n:] + 1]
    return {i: bool((first[i] - np.where(VOCAB.is_text(first[i]), VOCAB.text_offset,
                                          VOCAB.image_offset)) < HALF) for i in range(n)}


def test_loss_weights_follow_documents_and_sentinels():
    rng = np.random.default_rng(3)
    sw, rw = 0.0, 0.1
    for _ in range(1000):
        tokens, flags, k = random_example(rng)
        masked, origin, _, _ = cm3.cm3_transform(tokens, rng, VOCAB, 2.0, 10_000)
        w = cm3.target_weights(masked, origin, flags, VOCAB, sw, rw)
        region = span_region(masked)
        # reference: region of each token from its id, or its span, or the token before it
        ref_region = np.zeros(masked.size, bool)
        span = None
        for j, t in enumerate(masked):
            if VOCAB.is_sentinel(t):
                span = int(t - VOCAB.sentinel_offset)
                ref_region[j] = region[span]
            elif t == VOCAB.eoss:
                ref_region[j] = region[span]
            elif t in (VOCAB.brk, VOCAB.eos):
                ref_region[j] = j == 0 or ref_region[j - 1]
            else:
                base = VOCAB.text_offset if VOCAB.is_text(t) else VOCAB.image_offset
                ref_region[j] = t - base < HALF
        ref = np.where(ref_region[1:], rw, 1.0) * np.where(VOCAB.is_sentinel(masked[1:]), sw, 1.0)
        np.testing.assert_allclose(w, ref.astype(np.float32), rtol=0, atol=0)
        assert w.dtype == np.float32


def test_bad_examples_are_refused():
    with pytest.raises(ValueError, match="already holds"):
        cm3.cm3_transform(np.array([VOCAB.eos, VOCAB.sentinel(0), VOCAB.eos]),
                          np.random.default_rng(0), VOCAB, 1.0, 10)
    with pytest.raises(ValueError, match="sentinels out of order"):
        cm3.unmask(np.array([VOCAB.sentinel(1), VOCAB.sentinel(0), 50, VOCAB.eoss]), VOCAB)
