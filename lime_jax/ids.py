"""Reserved integer ids, defined once for annotation, data, model and inference.

Every integer feature reserves 0 for padding (SeqIO packing treats 0 as padding in every
feature). Token ids follow T5: 1 = EOS, 2 = UNK. Tag vocabularies reserve 1 = NONE for pieces
without a word (BOS, whitespace-only pieces, outside a segment) and 2 = EOS for the EOS piece
that ends a document, so a LIME+1 guide says "stop here" with a tag of its own; labels start
at 3.
"""
PAD_ID = 0  # in a tag feature also "no metadata": row 0 of every table adds nothing
NONE_ID = 1
EOS_TAG_ID = 2
NUM_RESERVED_TAGS = 3
EOS_ID = 1
UNK_ID = 2
BOS_INPUT_ID = 0  # T5X/SeqIO: the decoder input at a segment's first position
