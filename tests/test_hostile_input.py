"""Hostile and odd text through annotate + align, and the policy for unprocessable documents.

tests/test_metadata.py checks invariants on random short text and a megabyte line; here the
generator aims at what breaks tokenizers and aligners: combining marks, right-to-left text
with bidi controls, zero-width characters, tokens thousands of characters long, batches mixing
empty and odd documents. Beyond the cache invariants, word-level invariants must hold: pieces
of one word carry that word's tags and count 1, 2, 3... in `subword_index`.
"""
import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lime_jax.annotation.align import MAX_SUBWORD_INDEX
from lime_jax.annotation.pipeline import DocumentProcessor, check_invariants
from lime_jax.cli import annotate
from lime_jax.ids import EOS_ID, EOS_TAG_ID, NONE_ID

COMBINING = st.characters(whitelist_categories=("Mn", "Me", "Mc"))
RTL = st.characters(min_codepoint=0x0590, max_codepoint=0x06FF) | st.sampled_from(
    ["\u200f", "\u202b", "\u202e", "\u2067", "\u2069", "\u202c"])
ZERO_WIDTH = st.sampled_from(["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u180e"])
SPACES = st.sampled_from([" ", "  ", "\n", "\t", "\u00a0", "\u3000", "\u2028", "\r\n"])
WORDY = st.text(st.characters(whitelist_categories=("Lu", "Ll", "Nd", "Po", "Sm", "So", "Lo")), min_size=1,
                max_size=12)
FRAGMENT = WORDY | COMBINING | RTL | ZERO_WIDTH | SPACES | st.builds(
    lambda c, n: c * n, st.sampled_from(["x", "\u0301", "é", "🙂", "ب", "9", "-"]), st.integers(300, 3000))
HOSTILE = st.lists(FRAGMENT, max_size=20).map("".join) | st.sampled_from(["", " ", "\u200b", "\u0301"])


@pytest.fixture(scope="module", params=["lime", "plain"])
def processor(request, annotator, spm_model):
    return DocumentProcessor(annotator, spm_model, request.param)


def _check_word_invariants(features):
    ids, pos, ner, sub = features[:, :-1]
    assert features[0, -1] == EOS_ID and (features[1:3, -1] == EOS_TAG_ID).all() and features[3, -1] == NONE_ID
    no_word = sub == NONE_ID
    # A piece has a word exactly when it has tags (pieces of spaces only have neither).
    np.testing.assert_array_equal(pos == NONE_ID, no_word)
    np.testing.assert_array_equal(ner == NONE_ID, no_word)
    cont = np.nonzero(sub[1:] > 2)[0] + 1  # later pieces of a word
    assert (sub[cont - 1] >= 2).all()
    uncapped = cont[sub[cont] <= MAX_SUBWORD_INDEX]
    np.testing.assert_array_equal(sub[uncapped], sub[uncapped - 1] + 1)
    np.testing.assert_array_equal(pos[cont], pos[cont - 1])
    np.testing.assert_array_equal(ner[cont], ner[cont - 1])


@settings(max_examples=25, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(texts=st.lists(HOSTILE, min_size=1, max_size=3))
def test_hostile_batches_keep_invariants(processor, texts):
    out, stats = processor.process(texts)
    assert len(out) == len(texts) and stats.documents == len(texts)
    sizes = list(processor.vocab_sizes.values())
    for text, features in zip(texts, out):
        if features is None:
            # Only documents with nothing to tokenize are dropped.
            assert not any(c.isalnum() for c in text), repr(text[:200])
            continue
        check_invariants(features, sizes)
        _check_word_invariants(features)
    assert stats.empty_documents == sum(f is None for f in out)


def test_very_long_token_and_bidi_override(processor):
    text = "start " + "\u202e" + "ب" * 20000 + "\u202c" + " end " + "e\u0301" * 3000
    (features,), _ = processor.process([text])
    check_invariants(features, list(processor.vocab_sizes.values()))
    _check_word_invariants(features)
    assert (features[3] == MAX_SUBWORD_INDEX + 1).any()  # a word of more than 64 pieces is capped


# --- documents that cannot be processed: reported by position, skipped only by policy ----------

@pytest.fixture
def corpus_with_bad_document(tmp_path):
    # A JSON "\ud800" escape decodes to a lone surrogate: no tokenizer can encode it.
    path = tmp_path / "corpus.jsonl"
    lines = [{"text": "The Senate met on Monday."}, {"id": "bad-one", "text": "ok \ud800 then"},
             {"text": "The House adjourned."}, {"text": "Another \udfff one."}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return str(path)


def test_unprocessable_document_fails_naming_its_position(tmp_path, corpus_with_bad_document, spm_model, capsys):
    out = str(tmp_path / "cache")
    rc = annotate.main(["--input", corpus_with_bad_document, "--spm", spm_model, "--out", out])
    err = capsys.readouterr().err
    assert rc == 1
    assert "document bad-one cannot be processed: UnicodeEncodeError" in err and "--on-error skip" in err
    assert not os.path.exists(os.path.join(out, "manifest.json"))


def test_skip_policy_skips_counts_and_lists_them(tmp_path, corpus_with_bad_document, spm_model, capsys):
    from lime_jax.data import cache as cache_lib

    out = str(tmp_path / "cache")
    assert annotate.main(["--input", corpus_with_bad_document, "--spm", spm_model, "--out", out,
                          "--on-error", "skip"]) == 0
    assert "skipped document bad-one" in capsys.readouterr().err
    manifest = cache_lib.verify_cache(out, check_records=True)
    assert manifest["counts"]["documents"] == 4 and manifest["counts"]["skipped_documents"] == 2
    assert manifest["counts"]["records"] == 2
    assert [s["id"] for s in manifest["skipped_documents"]] == ["bad-one", "corpus.jsonl:4"]
    assert all("surrogates not allowed" in s["error"] for s in manifest["skipped_documents"])
