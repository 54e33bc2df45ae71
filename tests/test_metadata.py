"""The metadata pipeline: vocabularies, alignment rules, LIME+1 shift, spaCy end to end."""
import json
import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lime_jax.annotation import align, vocab
from lime_jax.annotation.annotator import split_long_text
from lime_jax.annotation.pipeline import DocumentProcessor, check_invariants
from lime_jax.annotation.spm import Tokenizer
from lime_jax.data import packing
from lime_jax.ids import EOS_ID, EOS_TAG_ID, NONE_ID, NUM_RESERVED_TAGS, PAD_ID

# --- vocabularies -----------------------------------------------------------------------------


def test_reserved_ids_and_sizes(annotator):
    pos, ner = annotator.vocabularies()
    assert (PAD_ID, NONE_ID, EOS_TAG_ID) == (0, 1, 2)
    assert pos.size == 53 and pos.id(pos.labels[0]) == 3
    assert ner.size == 40 and ner.tokens[:4] == ("<pad>", "<none>", "<eos>", "O")
    assert ner.id("B-PERSON") != ner.id("I-PERSON")
    assert vocab.ner_vocab(scheme="types").size == 22


def test_vocab_roundtrip_and_unknown_tag(tmp_path):
    v = vocab.pos_vocab(["NN", "VB"])
    v.save(tmp_path / "v.json")
    assert vocab.TagVocab.load(tmp_path / "v.json") == v
    with pytest.raises(vocab.UnknownTagError, match="unknown pos tag 'XYZ'.*NN, VB"):
        v.id("XYZ")
    (tmp_path / "bad.json").write_text('{"name": "pos", "tokens": ["NN"]}')
    with pytest.raises(ValueError, match="bad.json.*must start with"):
        vocab.TagVocab.load(tmp_path / "bad.json")
    # A vocabulary from before EOS had its own tag id (labels from 2) says how to replace it.
    (tmp_path / "v1.json").write_text('{"name": "pos", "tokens": ["<pad>", "<none>", "NN"]}')
    with pytest.raises(ValueError, match=r"v1.json: field 'tokens' must start with '<pad>', '<none>', '<eos>'.*"
                                         r"before EOS had its own tag id: rebuild the cache"):
        vocab.TagVocab.load(tmp_path / "v1.json")


# --- alignment rules on hand-made offsets (no spaCy) ------------------------------------------

def _tags(*ids):
    return np.array(ids, np.int32)


def test_plain_alignment_rules():
    text = "ab cd,ef  g"
    #       01234567890
    words = (np.array([0, 3, 5, 6, 10]), np.array([2, 5, 6, 8, 11]))  # ab | cd | , | ef | g
    word_tags = [_tags(10, 11, 12, 13, 14)]
    pieces = [  # (begin, end, has_content)
        (0, 1, True),    # "a"      -> word 0
        (1, 2, True),    # "b"      -> word 0 (a word split in k pieces repeats its tags)
        (2, 5, True),    # " cd"    -> word 1 (first non-space character)
        (5, 8, True),    # ",ef"    -> word 2 (covers several words: the first one's tags)
        (8, 10, False),  # "  "     -> NONE (whitespace only)
        (10, 10, True),  # ""       -> word 4 (leading byte of a byte-fallback character)
        (10, 11, True),  # "g"      -> word 4
    ]
    b, e, c = (np.array(x) for x in zip(*pieces))
    (got,), word = align.align_plain(text, b, e, c, *words, word_tags)
    np.testing.assert_array_equal(got, [10, 10, 11, 12, NONE_ID, 14, 14])
    np.testing.assert_array_equal(word, [0, 0, 1, 2, -1, 4, 4])
    # Places within words: 2 = first piece, 3 = second; NONE for the piece of spaces.
    np.testing.assert_array_equal(align.subword_index(word), [2, 3, 2, 2, NONE_ID, 2, 3])


def test_piece_of_space_before_rewritten_char_takes_next_word():
    # NFKC turns "ﬁ" into "fi": SentencePiece emits "▁f" spanning only the space.
    text = "a ﬁne"
    (got,), _ = align.align_plain(text, np.array([0, 1, 2]), np.array([1, 2, 5]), np.array([True] * 3),
                                  np.array([0, 2]), np.array([1, 5]), [_tags(5, 6)])
    np.testing.assert_array_equal(got, [5, 6, 6])


@pytest.mark.parametrize("shift,expected", [(0, [5, 6, 7, 1]), (1, [6, 7, 1, 1]), (-1, [1, 5, 6, 7])])
def test_shift(shift, expected):
    np.testing.assert_array_equal(packing.shift_tags(_tags(5, 6, 7, 1), shift), expected)


def test_split_long_text_cuts_at_whitespace():
    text = "word " * 50 + "x" * 30
    parts = split_long_text(text, 64)
    assert "".join(p for _, p in parts) == text
    assert all(len(p) <= 64 for _, p in parts)
    assert all(text[o:o + len(p)] == p for o, p in parts)
    assert all(p.endswith(" ") for _, p in parts[:-2])


# --- end to end with the real spaCy pipeline and a SentencePiece model trained here --------------

@pytest.fixture(scope="module", params=["lime", "plain"])
def processor(request, annotator, spm_model):
    return DocumentProcessor(annotator, spm_model, request.param)


def _rows(processor, text):
    features = processor.align(text, processor.annotator.annotate([text])[0])
    pieces = [processor.tokenizer.id_to_piece(i) for i in features[0]]
    return features, pieces


def test_known_sentence(processor):
    text = "Barack Obama visited Paris in 2009."
    features, pieces = _rows(processor, text)
    pos = [processor.pos_vocab.tag(i) for i in features[1]]
    ner = [processor.ner_vocab.tag(i) for i in features[2]]
    assert features[0, -1] == EOS_ID and pos[-1] == ner[-1] == "<eos>" and features[3, -1] == NONE_ID
    assert processor.tokenizer.decode(features[0, :-1]) == text
    content = processor.tokenizer.has_content[features[0]]
    runs = [t for i, t in enumerate(zip(pos, ner)) if content[i] and (i == 0 or (pos[i - 1], ner[i - 1]) != t)]
    assert runs == [("NNP", "B-PERSON"), ("NNP", "I-PERSON"), ("VBD", "O"), ("NNP", "B-GPE"), ("IN", "O"),
                    ("CD", "B-DATE"), (".", "O")]


def test_lime_tokenization_never_crosses_words(annotator, spm_model):
    text = "Don't stop: the U.S.-backed plan (costing $5,000) isn't over!"
    proc = DocumentProcessor(annotator, spm_model, "lime")
    doc = annotator.annotate([text])[0]
    features = proc.align(text, doc)
    words = [text[s:e] for s, e in zip(doc.starts, doc.ends)]
    per_word = proc.tokenizer.encode_words(words, align.attached_flags(text, doc.starts))
    # Every word decodes from its own pieces, and the pieces concatenated are the stream.
    assert [proc.tokenizer.decode(p).strip() for p in per_word] == [unicodedata.normalize("NFKC", w) for w in words]
    np.testing.assert_array_equal(features[0, :-1], [i for p in per_word for i in p])
    # subword_index counts each word's pieces from 1 (stored as 1 + place; NONE for "▁" alone).
    content = proc.tokenizer.has_content
    expected = [1 + sum(content[q] for q in p[:j + 1]) if content[i] else NONE_ID
                for p in per_word for j, i in enumerate(p)]
    np.testing.assert_array_equal(features[3, :-1], np.minimum(expected, 65))


def test_lime_and_plain_tag_every_word_piece(processor):
    text = "The committee approved 3 new bills on Tuesday."
    features, pieces = _rows(processor, text)
    content = processor.tokenizer.has_content[features[0, :-1]]
    # Pieces with characters have a real tag; pieces of spaces only have NONE (never EOS).
    assert (features[1, :-1][content] >= NUM_RESERVED_TAGS).all()
    assert (features[1, :-1][~content] == NONE_ID).all()


ODD_TEXT = st.text(
    alphabet=st.characters(min_codepoint=1, max_codepoint=0x1FAFF, blacklist_categories=("Cs",)),
    max_size=80,
) | st.sampled_from([
    "", "   ", "\t\n", "\u200b\u200d", "🙂🙂 👍🏽 ok", "e\u0301te\u0301", "مرحبا بالعالم", "Straße ﬁne Ⅻ ½",
    "a" * 3000, "\x07\x1b[31mred\x1b[0m", "日本語のテキスト", "x\u202eevil\u202c y",
])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=ODD_TEXT)
def test_invariants_on_generated_text(processor, text):
    (features,), stats = processor.process([text])
    if features is None:
        assert stats.empty_documents == 1
        return
    check_invariants(features, list(processor.vocab_sizes.values()))
    assert features.dtype == np.int32 and features[0, -1] == EOS_ID
    assert (features[1:3, -1] == EOS_TAG_ID).all() and features[3, -1] == NONE_ID  # subword_index: no word
    assert (features[1:3, :-1] != EOS_TAG_ID).all()  # the EOS tag only ends a document


def test_empty_documents_are_skipped_and_counted(processor):
    out, stats = processor.process(["", "Hello there.", "   \n ", "Bye."])
    assert out[0] is None and out[2] is None
    assert out[1] is not None and out[3] is not None
    assert (stats.documents, stats.empty_documents) == (4, 2)


def test_megabyte_line(processor):
    text = "It starts here. " + "x" * 1_000_000 + " and ends here."
    (features,), stats = processor.process([text])
    check_invariants(features, list(processor.vocab_sizes.values()))
    assert features.shape[1] > 1_000_000 // 16  # the long word is kept, cut into pieces


def test_long_text_is_tagged_in_pieces(annotator, monkeypatch):
    text = "The Senate met in Washington on Monday. " * 20
    whole = annotator.annotate([text])[0]
    monkeypatch.setattr(annotator, "max_chars", 100)
    cut = annotator.annotate([text])[0]
    # Cut at whitespace, the words are the same and keep their offsets in the whole text.
    np.testing.assert_array_equal(cut.starts, whole.starts)
    np.testing.assert_array_equal(cut.ends, whole.ends)
    assert [text[s:e] for s, e in zip(cut.starts, cut.ends)][:4] == ["The", "Senate", "met", "in"]


def test_tokenizer_rejects_foreign_model(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model is not a SentencePiece model"):
        Tokenizer(bad)
    with pytest.raises(ValueError, match="cannot read SentencePiece model"):
        Tokenizer(tmp_path / "missing.model")


def test_show_json(spm_model, capsys):
    from lime_jax.cli import show

    assert show.main(["--spm", spm_model, "--json", "--plus-one", "Hi", "Bob."]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows.pop("tag_source") == "oracle" and "note" not in rows
    assert len({len(v) for v in rows.values()}) == 1
    # LIME+1: "Hi" carries the tags of the piece after it; the last position NONE.
    assert rows["pos"][-1] == rows["ner"][-1] == "<none>"
    assert rows["pos"][-2] == rows["ner"][-2] == "<eos>"  # "." carries EOS's tag: "stop here"
    assert show.main(["--spm", spm_model, "A", "table."]) == 0
    assert "piece" in capsys.readouterr().out
