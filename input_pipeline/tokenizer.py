"""Sentencepiece tokenizer trained on the training reports. [CLS] first, padding id 0."""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, CLS_ID, EOS_ID = 0, 1, 2, 3


def normalize(text: str) -> str:
    # Prompts and reports differ in case ("Emphysema." vs "... emphysema"); the vocabulary should not.
    return " ".join(text.lower().split())


def train_tokenizer(texts: Iterable[str], path: str, vocab_size: int) -> None:
    """Trains a unigram sentencepiece model on `texts` and writes it to `path`."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(normalize(t) for t in texts if t.strip()), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, hard_vocab_limit=False, pad_id=PAD_ID, unk_id=UNK_ID,
        bos_id=CLS_ID, eos_id=EOS_ID, num_threads=1, minloglevel=2)
    with open(path, "wb") as f:
        f.write(model.getvalue())


class Tokenizer:
    def __init__(self, path: str):
        self.sp = spm.SentencePieceProcessor(model_file=path)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, texts: Sequence[str], length: int) -> np.ndarray:
        """Texts -> int32 [len(texts), length]: [CLS] pieces [EOS], truncated, zero-padded."""
        out = np.zeros((len(texts), length), np.int32)
        for i, ids in enumerate(self.sp.encode([normalize(t) for t in texts])):
            ids = [CLS_ID, *ids][: length - 1] + [EOS_ID]
            out[i, : len(ids)] = ids
        return out

    def lengths(self, texts: Sequence[str]) -> np.ndarray:
        """Token counts including [CLS] and [EOS], untruncated (for choosing text_len from data)."""
        return np.array([len(ids) + 2 for ids in self.sp.encode([normalize(t) for t in texts])])
