"""SentencePiece: training a model here, and encoding with character offsets.

Models use the T5/SeqIO id convention (0 = PAD, 1 = EOS, 2 = UNK, no BOS), so that id 0 means
padding in every feature and `seqio.SentencePieceVocabulary` reads them as they are. Byte
fallback keeps rare characters (emoji, other scripts) out of UNK.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import sentencepiece as sentencepiece_lib

from lime_jax.ids import EOS_ID, PAD_ID, UNK_ID

WORD_BOUNDARY = "\u2581"  # "▁", SentencePiece's marker of a preceding space
# A serialized ModelProto holding only `normalizer_spec { add_dummy_prefix: false }` (field 3,
# then its field 3 = 0). Protobuf parsing merges concatenated messages, so appending it to a
# model turns the dummy prefix off without sentencepiece's generated protobuf module (whose
# runtime pin clashes with apache-beam's protobuf).
_NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"


def train_spm(
    texts: Iterator[str],
    out_prefix: str,
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    input_sentence_size: int = 2_000_000,
    seed_sentencepiece_size: int = 1_000_000,
    num_threads: int | None = None,
) -> str:
    """Trains a model on `texts` (one sentence or paragraph each); returns the .model path."""
    parent = os.path.dirname(os.path.abspath(out_prefix))
    os.makedirs(parent, exist_ok=True)
    nonempty = (t for t in texts if t.strip())
    sentencepiece_lib.SentencePieceTrainer.train(
        sentence_iterator=nonempty,
        model_prefix=out_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=True,
        split_digits=True,  # one piece per digit: arithmetic stays learnable
        # Printable ASCII always gets pieces of its own, however rare ("?", "+" in prose).
        required_chars="".join(chr(c) for c in range(33, 127)),
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=seed_sentencepiece_size,
        max_sentence_length=1 << 16,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    return out_prefix + ".model"


class Tokenizer:
    """Encodes text, or words one by one, into piece ids with character offsets."""

    def __init__(self, model_path: str | os.PathLike):
        path = os.fspath(model_path)
        try:
            with open(path, "rb") as f:
                self.model_bytes = f.read()
        except OSError as e:
            raise ValueError(f"cannot read SentencePiece model {path}: {e.strerror}") from None
        try:
            self.sp = sentencepiece_lib.SentencePieceProcessor(model_proto=self.model_bytes)
        except Exception as e:  # sentencepiece raises RuntimeError or OSError by version
            raise ValueError(f"{path} is not a SentencePiece model ({e})") from None
        if self.sp.pad_id() != PAD_ID or self.sp.eos_id() != EOS_ID:
            raise ValueError(
                f"{path}: SentencePiece model must have pad_id={PAD_ID} and eos_id={EOS_ID} "
                f"(has pad_id={self.sp.pad_id()}, eos_id={self.sp.eos_id()}); train it with "
                "`lime-jax spm-train`"
            )
        self.path = path
        # A second processor over the same pieces but without the dummy "▁" prefix, for words
        # that follow the previous word with no space between them ("dog" "." / "do" "n't").
        self.sp_attached = sentencepiece_lib.SentencePieceProcessor(model_proto=self.model_bytes + _NO_DUMMY_PREFIX)
        pieces = [self.sp.id_to_piece(i) for i in range(self.vocab_size)]
        # A piece "has content" unless it is made of word boundaries only ("▁"): such pieces
        # stand for whitespace and get the NONE tag.
        self.has_content = np.array(
            [bool(p.replace(WORD_BOUNDARY, "")) and not self.sp.is_control(i) for i, p in enumerate(pieces)]
        )

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Plain encoding: ids and the [begin, end) character span of each piece in `text`."""
        out = self.sp.encode(text, return_type="offset_mapping")
        offsets = np.asarray(out["offsets"], np.int64).reshape(-1, 2)
        return np.asarray(out["ids"], np.int32), offsets[:, 0], offsets[:, 1]

    def encode_words(self, words: Sequence[str], attached: Sequence[bool]) -> list[list[int]]:
        """Encodes each word on its own; `attached` words get no leading "▁"."""
        spaced_idx = [i for i, a in enumerate(attached) if not a]
        attached_idx = [i for i, a in enumerate(attached) if a]
        out: list[list[int]] = [[] for _ in words]
        for idx, proc in ((spaced_idx, self.sp), (attached_idx, self.sp_attached)):
            if idx:
                for i, ids in zip(idx, proc.encode([words[i] for i in idx])):
                    out[i] = ids
        return out

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


def training_texts(patterns: Sequence[str], max_docs: int | None = None,
                   text_field: str = "text") -> Iterator[str]:
    """The lines of the first `max_docs` documents of the inputs (`lime-jax spm-train`'s input);
    `text_field`: the JSONL field or Parquet/Arrow column of the text."""
    from lime_jax.annotation.inputs import iter_input_documents

    for n, (_, text) in enumerate(iter_input_documents(patterns, text_field=text_field)):
        if max_docs is not None and n >= max_docs:
            return
        # Paragraph lines keep sentences whole while staying under max_sentence_length.
        yield from text.splitlines()
