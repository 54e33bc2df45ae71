"""A causal POS/NER tagger distilled from spaCy: tags of piece i from pieces <= i only."""
