"""One small tokenizer interface over a SentencePiece ``.model`` file or a Hugging Face folder.

Everything the data tools and the streaming loader need is ``encode``/``encode_batch``,
``bos_id``, ``eos_id``, ``vocab_size`` and ``token_to_id``; a training sample is always
``[bos] + encode(text) + [eos]`` (:meth:`Tokenizer.sample`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from internevo.data.errors import DataError

# Files of which a Hugging Face tokenizer folder has at least one (checked before importing
# transformers, so a wrong folder fails fast).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                      "vocab.json", "vocab.txt", "spiece.model")


class Tokenizer:
    """Common interface; use :func:`load_tokenizer` to get one."""

    path: str
    bos_id: Optional[int]
    eos_id: Optional[int]
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text without BOS/EOS."""
        raise NotImplementedError

    def token_to_id(self, piece: str) -> Optional[int]:
        """Id of a single vocabulary entry, or None when the vocabulary has no such entry."""
        raise NotImplementedError

    def sample(self, ids: list[int]) -> list[int]:
        """A training sample: ``[bos] + ids + [eos]`` (a missing BOS/EOS is left out)."""
        head = [] if self.bos_id is None else [self.bos_id]
        tail = [] if self.eos_id is None else [self.eos_id]
        return head + list(ids) + tail

    # Workers re-open the tokenizer from its path instead of pickling native objects.
    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(load_tokenizer(state["path"]).__dict__)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file (InternLM, InternLM2)."""

    def __init__(self, path: str, num_threads: int = 1):
        import sentencepiece as spm

        self.path = str(path)
        self.num_threads = num_threads
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as err:
            raise DataError(f"{path}: not a SentencePiece model ({err})") from err
        self.vocab_size = int(self.sp.vocab_size())
        self.bos_id = _or_none(self.sp.bos_id())
        self.eos_id = _or_none(self.sp.eos_id())

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (SentencePiece's own ``encode``, no BOS/EOS)."""
        if self.num_threads > 1:
            return self.sp.encode(list(texts), num_threads=self.num_threads)
        # one call per text: measured faster than the batch call's thread pool for short texts
        return [self.sp.encode(t) for t in texts]

    def token_to_id(self, piece: str) -> Optional[int]:
        """Id of ``piece`` or None when it is unknown."""
        idx = self.sp.piece_to_id(piece)
        return None if self.sp.is_unknown(idx) and piece != self.sp.id_to_piece(idx) else idx


class HFTokenizer(Tokenizer):
    """A local Hugging Face tokenizer folder (``tokenizer.json`` / ``tokenizer_config.json``)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.path = str(path)
        try:
            # local_files_only: a folder is never a hub name; trust_remote_code: InternLM2's
            # published tokenizer folder ships its own tokenizer class, as InternEvo allows.
            self.tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True,
                                                     trust_remote_code=True)
        except Exception as err:  # transformers raises many types for a folder it can't read
            raise DataError(f"{path}: not a Hugging Face tokenizer folder ({err})") from err
        self.vocab_size = len(self.tok)
        self.bos_id = self.tok.bos_token_id
        self.eos_id = self.tok.eos_token_id

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (``add_special_tokens=False``)."""
        return self.tok(list(texts), add_special_tokens=False)["input_ids"]

    def token_to_id(self, piece: str) -> Optional[int]:
        """Id of ``piece`` or None when it is not in the vocabulary."""
        return self.tok.get_vocab().get(piece)


def _or_none(idx: int) -> Optional[int]:
    return None if idx < 0 else int(idx)


def load_tokenizer(path: str | Path, num_threads: int = 1) -> Tokenizer:
    """Open a SentencePiece ``.model`` file or a Hugging Face tokenizer folder.

    Raises :class:`DataError` naming ``path`` when it does not exist or is not a tokenizer.
    ``num_threads`` > 1 makes SentencePiece encode batches with that many threads.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: tokenizer path does not exist")
    if p.is_dir():
        if not any((p / name).is_file() for name in HF_TOKENIZER_FILES):
            raise DataError(f"{path}: not a Hugging Face tokenizer folder (none of "
                            f"{', '.join(HF_TOKENIZER_FILES)})")
        return HFTokenizer(str(p))
    return SentencePieceTokenizer(str(p), num_threads=num_threads)
