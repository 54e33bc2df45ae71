"""Tag sources: honest sources never look past piece i; the oracle does (so the check can fail)."""
import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lime_jax.annotation import tag_sources
from lime_jax.annotation.pipeline import DocumentProcessor
from lime_jax.annotation.tag_sources import parse_tag_source

# Honest sources the causality property is checked on. A tagger joins with
# LIME_JAX_TEST_TAGGER=DIR (trained with the SentencePiece model the test gets: see `source_fn`).
HONEST = ["prefix"] + ([f"tagger:{os.environ['LIME_JAX_TEST_TAGGER']}"]
                       if os.environ.get("LIME_JAX_TEST_TAGGER") else [])

WORDS = ["I", "saw", "her", "the", "man", "duck", "light", "said", "went", "to", "a", "company",
         "Bob", "Smith", "Jordan", "Washington", "Paris", "New", "York", "Apple", "Monday", "President",
         "42", "1999", "3.5", "$", "million", "n't", "'s", "Dr.", ",", ".", "!", "?", "(", ")"]
ATTACHED = {",", ".", "!", "?", ")", "n't", "'s"}  # written without a space before them


def join(words: list[str]) -> str:
    return "".join(w if i == 0 or w in ATTACHED else " " + w for i, w in enumerate(words))


@pytest.fixture(scope="module")
def processors(annotator, spm_model):
    return {t: DocumentProcessor(annotator, spm_model, t) for t in ("plain", "lime")}


def source_fn(spec: str, processor: DocumentProcessor) -> tag_sources.TagFn:
    source = parse_tag_source(spec)
    tagger = None
    if source.kind == "tagger":
        from lime_jax.tagger.infer import CausalTagger

        tagger = CausalTagger.load(source.path)
        tagger.check_spm(processor.tokenizer.path)
    return tag_sources.tag_function(source, processor.tokenizer, processor.annotator, tagger=tagger)


def pieces(processor: DocumentProcessor, text: str) -> list[int]:
    """The pipeline's pieces of `text` (EOS dropped): the sequence the model sees."""
    return processor.align(text, processor.annotator.annotate([text])[0])[0, :-1].tolist()


def tags_before_boundary(tags_of, processor, prefix: str, suffixes: list[str]) -> tuple[list[np.ndarray], int]:
    """The tags of the pieces of `prefix` within `prefix + " " + suffix`, for each suffix."""
    head = pieces(processor, prefix)
    seqs = [pieces(processor, f"{prefix} {s}") for s in suffixes]
    for seq in seqs:  # otherwise "the pieces before the boundary" would not be the same pieces
        assert seq[:len(head)] == head
    return [t[:, :len(head)] for t in tags_of(seqs)], len(head)


@pytest.mark.parametrize("spec", HONEST)
@pytest.mark.parametrize("tokenization", ["plain", "lime"])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=st.lists(st.sampled_from(WORDS), min_size=1, max_size=10),
       suffixes=st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6), min_size=2, max_size=2))
def test_honest_tags_ignore_the_text_after_a_piece(processors, spec, tokenization, prefix, suffixes):
    processor = processors[tokenization]
    (a, b), n = tags_before_boundary(source_fn(spec, processor), processor, join(prefix), [join(s) for s in suffixes])
    assert a.shape == (2, n)
    np.testing.assert_array_equal(a, b)


def test_oracle_tags_depend_on_the_text_after_a_piece(processors):
    """The same check fails for the oracle: spaCy tags "her" PRP$ before "duck", PRP before
    "yesterday" (and the prefix source, seeing neither, gives one tag)."""
    processor = processors["plain"]
    oracle = source_fn("oracle", processor)
    (a, b), n = tags_before_boundary(oracle, processor, "I saw her", ["duck", "yesterday."])
    pos = processor.pos_vocab
    assert [pos.tag(a[0, n - 1]), pos.tag(b[0, n - 1])] == ["PRP$", "PRP"]
    (a, b), _ = tags_before_boundary(source_fn("prefix", processor), processor, "I saw her", ["duck", "yesterday."])
    np.testing.assert_array_equal(a, b)


def test_prefix_is_sequence_tags_of_each_prefix(processors):
    """Column i of `prefix` is the last column of re-annotating pieces 0..i, as generation does;
    over a partial word that is the partial word's tag ("J" of "Jordan" alone)."""
    processor = processors["plain"]
    tok, annotator = processor.tokenizer, processor.annotator
    ids = pieces(processor, "Jordan met Dr. Smith in New York on Monday, 1999.")
    (prefix,) = tag_sources.prefix_tags(tok, annotator, [ids])
    expected = [tag_sources.sequence_tags(tok, annotator, [ids[:i + 1]])[0][:, i] for i in range(len(ids))]
    np.testing.assert_array_equal(prefix, np.stack(expected, axis=1))
    (whole,) = tag_sources.sequence_tags(tok, annotator, [ids])
    np.testing.assert_array_equal(prefix[:, -1], whole[:, -1])


def test_oracle_call_shape_matches_the_pipeline(processors):
    """On text that decodes back to itself the oracle source gives the pipeline's (cached) tags."""
    for tokenization, processor in processors.items():
        text = "The President met Bob Smith in Paris on Monday."
        features = processor.align(text, processor.annotator.annotate([text])[0])
        ids = features[0, :-1].tolist()
        assert processor.tokenizer.decode(ids) == text
        (tags,) = source_fn("oracle", processor)([ids])
        np.testing.assert_array_equal(tags, features[1:3, :-1], err_msg=tokenization)


def test_prefix_budget_is_checked_before_any_work(spm_model):
    from lime_jax.annotation.spm import Tokenizer

    # annotator=None: reaching spaCy would fail with AttributeError, not the budget's ValueError.
    with pytest.raises(ValueError, match=r"600 pieces, over max_pieces=512.*split documents into windows"):
        tag_sources.prefix_tags(Tokenizer(spm_model), None, [[5] * 10, [5] * 600])


def test_parse_tag_source(tmp_path):
    assert parse_tag_source("oracle") == tag_sources.ORACLE and not tag_sources.ORACLE.honest
    assert parse_tag_source("prefix") == tag_sources.PREFIX and tag_sources.PREFIX.honest
    source = parse_tag_source(f"tagger:{tmp_path}")
    assert (source.kind, source.path, str(source)) == ("tagger", str(tmp_path), f"tagger:{tmp_path}")
    with pytest.raises(ValueError, match="--tags: tagger:DIR needs the directory"):
        parse_tag_source("tagger:")
    with pytest.raises(ValueError, match="--tag-source: unknown tag source 'spacy'"):
        parse_tag_source("spacy", "--tag-source")
    with pytest.raises(ValueError, match="tagger directory .*missing.* does not exist"):
        parse_tag_source(f"tagger:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="'prefix' takes no ':x'"):
        parse_tag_source("prefix:x")
    with pytest.raises(ValueError, match="pass the loaded tagger"):
        tag_sources.tag_function(source, None, None)


# ----------------------------------------------------------------------------- lime-jax show


def test_show_names_its_tag_source(spm_model, capsys):
    from lime_jax.cli import show

    assert show.main(["--spm", spm_model, "--tags", "prefix", "--json", "--tokenization", "plain",
                      "I", "saw", "her", "duck."]) == 0
    prefix = json.loads(capsys.readouterr().out)
    assert show.main(["--spm", spm_model, "--json", "--tokenization", "plain", "I", "saw", "her", "duck."]) == 0
    oracle = json.loads(capsys.readouterr().out)
    assert (prefix["tag_source"], oracle["tag_source"]) == ("prefix", "oracle")
    assert prefix["pieces"] == oracle["pieces"]
    her = prefix["pieces"].index("▁her")
    assert (prefix["pos"][her], oracle["pos"][her]) == ("PRP", "PRP$")
    assert prefix["pos"][-1] == prefix["ner"][-1] == "<eos>"  # EOS

    assert show.main(["--spm", spm_model, "--tags", "prefix", "--plus-one", "Hi", "Bob."]) == 0
    table = capsys.readouterr().out
    assert table.startswith("tags: prefix: spaCy over the text up to and including each piece\nLIME+1:")
    assert "POS (prefix)" in table


def test_show_rejects_a_bad_tag_source(spm_model, tmp_path, capsys):
    from lime_jax.cli import show

    assert show.main(["--spm", spm_model, "--tags", f"tagger:{tmp_path / 'nope'}", "Hi"]) == 1
    assert "--tags: tagger directory" in capsys.readouterr().err
    assert show.main(["--spm", spm_model, "--tags", "gold", "Hi"]) == 1
    assert "--tags: unknown tag source 'gold'" in capsys.readouterr().err
