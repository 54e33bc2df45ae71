"""The pieces of a text with the POS and NER tags a model would see from a tag source."""
from __future__ import annotations

import numpy as np

from lime_jax.annotation import tag_sources
from lime_jax.annotation.pipeline import DocumentProcessor
from lime_jax.annotation.tag_sources import ORACLE, TagSource
from lime_jax.data.packing import shift_tags
from lime_jax.ids import EOS_TAG_ID

PLUS_ONE_HONEST_NOTE = (
    "LIME+1: each piece shows the tags of the piece after it. From {source} those are computed from "
    "the text up to and including that next piece, i.e. the piece the model is predicting: at "
    "generation they come from a guide, not from the model's own text. Shown for display.")


def show(text: str, processor: DocumentProcessor, plus_one: bool = False, source: TagSource = ORACLE,
         tagger=None) -> dict:
    """`pieces`, `ids`, `pos`, `ner` (equal-length lists, EOS last) and `tag_source`.

    The pieces are the training pipeline's; `oracle` tags are its own alignment, other sources tag
    those pieces (EOS gets tag EOS). `tagger` is the loaded tagger of a `tagger:DIR` source.
    """
    features = processor.align(text, processor.annotator.annotate([text])[0])
    ids, pos, ner = features[:3]
    if source.honest:
        tags_of = tag_sources.tag_function(source, processor.tokenizer, processor.annotator, tagger=tagger)
        tags = np.asarray(tags_of([ids[:-1].tolist()])[0])
        pos, ner = (np.append(row, EOS_TAG_ID) for row in tags)
    if plus_one:
        pos, ner = shift_tags(np.stack([pos, ner]), 1)
    rows = {
        "tag_source": str(source),
        "pieces": [processor.tokenizer.id_to_piece(i) for i in ids.tolist()],
        "ids": ids.tolist(),
        "pos": [processor.pos_vocab.tag(i) for i in pos.tolist()],
        "ner": [processor.ner_vocab.tag(i) for i in ner.tolist()],
    }
    if plus_one and source.honest:
        rows["note"] = PLUS_ONE_HONEST_NOTE.format(source=source)
    return rows


def format_table(rows: dict, source: TagSource) -> str:
    header = ("piece", "id", f"POS ({source})", f"NER ({source})")
    cols = [rows["pieces"], [str(i) for i in rows["ids"]], rows["pos"], rows["ner"]]
    cols = [[repr(p)[1:-1] for p in cols[0]]] + cols[1:]  # show control characters escaped
    widths = [max([len(h)] + [len(c) for c in col]) for h, col in zip(header, cols)]
    lines = [f"tags: {source}: {source.describe()}"]
    if "note" in rows:
        lines.append(rows["note"])
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in zip(*cols)]
    return "\n".join(lines)
