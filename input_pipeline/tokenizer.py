"""Tokenizers of the text records: [CLS] first, the end token last, padding id 0.

- `Tokenizer`: sentencepiece trained on the training reports (the default), saved as tokenizer.model.
- `WordPieceTokenizer`: the WordPiece vocabulary of a pretrained BERT (model.text.init), through the `tokenizers`
  library with BERT's normalisation, saved as tokenizer.json. [CLS] pieces [SEP], as BERT was trained on.

`make_tokenizer` chooses one for preparation; `load_tokenizer` reads either back by its file name. A tokenizer's
`identity()` (kind and, for WordPiece, a hash of vocabulary and normalisation) goes into the records' manifest, so
training can refuse records made by a tokenizer other than the text encoder's.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
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

    def identity(self) -> dict:
        return {"kind": "sentencepiece"}

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


# --------------------------------------------------------------------------------------------------------------
# WordPiece (pretrained BERT) and the choice between the two
# --------------------------------------------------------------------------------------------------------------
SENTENCEPIECE_FILE, WORDPIECE_FILE = "tokenizer.model", "tokenizer.json"
TOKENIZER_FILES = (SENTENCEPIECE_FILE, WORDPIECE_FILE)


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("a pretrained BERT's WordPiece tokenizer (model.text.init) needs the tokenizers library: "
                          "pip install 'fvlm-jax[pretrained]'") from None
    return tokenizers


class WordPieceTokenizer:
    """BERT's WordPiece tokenizer: `tokenizers`' WordPiece model with BERT's normaliser and pre-tokeniser, as
    transformers' BertTokenizerFast builds it from vocab.txt. Encodes [CLS] pieces [SEP], padding id 0."""

    def __init__(self, tokenizer):
        self.tk = tokenizer
        ids = {t: self.tk.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]")}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"the WordPiece vocabulary has no {missing}: not a BERT vocab.txt")
        if ids["[PAD]"] != PAD_ID:
            raise ValueError(f"the WordPiece vocabulary has [PAD] at id {ids['[PAD]']}; this project pads with id "
                             f"{PAD_ID} (BERT's vocabularies do)")
        self.cls_id, self.sep_id = ids["[CLS]"], ids["[SEP]"]

    @classmethod
    def from_folder(cls, folder: str) -> WordPieceTokenizer:
        """From a Hugging Face BERT folder: vocab.txt, and tokenizer_config.json's do_lower_case and strip_accents
        if it is there (else BERT's defaults: lower case, accents stripped with it)."""
        tokenizers = _tokenizers()
        vocab = os.path.join(folder, "vocab.txt")
        if not os.path.isfile(vocab):
            raise FileNotFoundError(f"{folder} has no vocab.txt (a BERT checkpoint folder holds config.json, "
                                    "model.safetensors or pytorch_model.bin, and vocab.txt)")
        settings = {}
        path = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(path):
            with open(path) as f:
                settings = json.load(f)
        tk = tokenizers.Tokenizer(tokenizers.models.WordPiece.from_file(vocab, unk_token="[UNK]"))
        tk.normalizer = tokenizers.normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=settings.get("tokenize_chinese_chars", True),
            strip_accents=settings.get("strip_accents"), lowercase=settings.get("do_lower_case", True))
        tk.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
        return cls(tk)

    @classmethod
    def from_file(cls, path: str) -> WordPieceTokenizer:
        """From the tokenizer.json that `save` wrote."""
        return cls(_tokenizers().Tokenizer.from_file(path))

    def save(self, path: str) -> None:
        self.tk.save(path)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def identity(self) -> dict:
        """{"kind": "wordpiece", "sha256": hash of the vocabulary, normaliser and pre-tokeniser}."""
        spec = json.loads(self.tk.to_str())
        key = json.dumps({k: spec[k] for k in ("normalizer", "pre_tokenizer", "model")}, sort_keys=True)
        return {"kind": "wordpiece", "sha256": hashlib.sha256(key.encode()).hexdigest()}

    def _pieces(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, texts: Sequence[str], length: int) -> np.ndarray:
        """Texts -> int32 [len(texts), length]: [CLS] pieces [SEP], truncated, zero-padded (BERT's truncation)."""
        out = np.zeros((len(texts), length), np.int32)
        for i, ids in enumerate(self._pieces(texts)):
            ids = [self.cls_id, *ids][: length - 1] + [self.sep_id]
            out[i, : len(ids)] = ids
        return out

    def lengths(self, texts: Sequence[str]) -> np.ndarray:
        """Token counts including [CLS] and [SEP], untruncated."""
        return np.array([len(ids) + 2 for ids in self._pieces(texts)])


def make_tokenizer(bert_folder: str, train_texts: Sequence[str], out_dir: str, vocab_size: int):
    """Preparation's tokenizer: the WordPiece of the BERT folder `bert_folder` (model.text.init), else sentencepiece
    trained on `train_texts` with `vocab_size` pieces. Saved in `out_dir`; returns (tokenizer, its file name)."""
    if bert_folder:
        tok = WordPieceTokenizer.from_folder(bert_folder)
        tok.save(os.path.join(out_dir, WORDPIECE_FILE))
        return tok, WORDPIECE_FILE
    train_tokenizer(train_texts, os.path.join(out_dir, SENTENCEPIECE_FILE), vocab_size)
    return Tokenizer(os.path.join(out_dir, SENTENCEPIECE_FILE)), SENTENCEPIECE_FILE


def load_tokenizer(path: str):
    """The tokenizer saved at `path`: a WordPieceTokenizer for tokenizer.json, else sentencepiece."""
    return WordPieceTokenizer.from_file(path) if path.endswith(".json") else Tokenizer(path)
