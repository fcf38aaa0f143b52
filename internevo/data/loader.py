"""The trainer's data entry points: :func:`build_train_loader` and :func:`build_valid_loaders`.

A :class:`TrainLoader` yields one Batch (``docs/architecture.md``) per optimizer step of this
data-parallel rank.  Its resume state is kept on the consumer side: each produced batch travels
with the loader position *after* it, and the loader records that position when it hands the batch
to the trainer — so prefetching (DataLoader workers, the streaming thread) never makes the saved
state run ahead, and after ``load_state_dict`` the next batch is the one an uninterrupted run
would have seen.  See ``docs/data.md`` for the three data paths and the state format.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Optional

import numpy as np
import torch

from internevo.config import TrainConfig
from internevo.data.dummy import DUMMY_TRAIN_SAMPLES, DUMMY_TYPES, RandomDataset
from internevo.data.errors import DataError
from internevo.data.folders import min_length_for, train_files, valid_sets
from internevo.data.packing import IGNORE, ConcatPacks, Pack, PackedDataset
from internevo.data.sampler import BatchSampler, batch_size_at, parse_skip_batches
from internevo.data.streaming import StreamPacker, start_position
from internevo.data.tokenized import TokenizedFile

log = logging.getLogger(__name__)
STATE_VERSION = 1
Batch = dict


_ROW_KEYS = ("input_ids", "labels", "indexes", "type_ids")


def stack_rows(packs: list[Pack]) -> dict:
    """Packed rows as NumPy arrays: ``[M, P]`` int64 per key, ``cu_seqlens`` a list of int32.
    (Loader workers return these: NumPy pickles through the pipe much faster than tensors
    travel through shared memory, for batches this small.)"""
    out: dict = {key: np.stack([p[key] for p in packs]).astype(np.int64) for key in _ROW_KEYS}
    out["cu_seqlens"] = [p["cu_seqlens"].astype(np.int32) for p in packs]
    return out


def to_batch(rows: dict) -> Batch:
    """NumPy rows from :func:`stack_rows` -> a Batch of tensors (no copy)."""
    batch = {key: torch.from_numpy(rows[key]) for key in _ROW_KEYS}
    batch["cu_seqlens"] = [torch.from_numpy(c) for c in rows["cu_seqlens"]]
    return batch


def collate(packs: list[Pack]) -> Batch:
    """Stack packed rows into a Batch: ``[M, P]`` int64 tensors and a list of ``cu_seqlens``."""
    return to_batch(stack_rows(packs))


# ------------------------------------------------------------------------------ train loader


class TrainLoader:
    """Infinite iterable of Batches for one data-parallel rank, with an exact resume state.

    ``state_dict()`` is a small dict of plain Python values (torch.save-able with
    ``weights_only=True``).  Tokenized and dummy states are the same on every rank; a streaming
    state belongs to its rank.  ``load_state_dict`` may be called before or during iteration;
    iteration continues from the restored position.  A state saved with another data-parallel
    size is accepted with a warning: tokenized/dummy positions carry over approximately,
    streaming ranks restart their shard (the batch count, hence the ramp-up, carries over).
    """

    def __init__(self, source: Any, dataset_types: list[str], num_worker: int,
                 skip_batches: str = "", micro_num: int = 1, rampup: Optional[str] = ""):
        self._source = source
        self.dataset_types = list(dataset_types)
        self.num_worker = num_worker
        self.skip_batches = parse_skip_batches(skip_batches)
        """Batch indices the trainer consumes without training (``data.skip_batches``)."""
        self._micro_num, self._rampup = micro_num, rampup
        self._state = source.initial_state()
        self._loads = 0

    @property
    def batch_count(self) -> int:
        """Batches handed out so far (including restored ones): the index of the next batch."""
        return self._source.batch_count(self._state)

    def micro_num_at(self, batch_index: int) -> int:
        """Rows (M) of batch ``batch_index`` under ``data.rampup_batch_size``."""
        return batch_size_at(batch_index, self._micro_num, self._rampup)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            loads = self._loads
            for batch, state in self._source.batches(self._state, self.num_worker):
                if loads != self._loads:
                    break  # restored while iterating: restart from the restored position
                self._state = state
                yield batch
            else:
                return  # sources are infinite; a finished one simply ends the iteration

    def state_dict(self) -> dict:
        """The position after the last batch handed out."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Continue after the batch at which ``state`` was saved."""
        if state.get("version") != STATE_VERSION or state.get("kind") != self._source.kind:
            raise DataError(f"data state is version {state.get('version')} of a "
                            f"{state.get('kind')!r} loader; this is version {STATE_VERSION} "
                            f"of a {self._source.kind!r} loader (data.type / train_folder "
                            "changed?)")
        self._state = self._source.restore(copy.deepcopy(state))
        self._loads += 1


class _PackedSource:
    """Tokenized files or dummy data: packed rows drawn by the seeded :class:`BatchSampler`."""

    kind = "packed"

    def __init__(self, packs: ConcatPacks, micro_num: int, dp_rank: int, dp_size: int,
                 seed: int, rampup: Optional[str]):
        self.packs = packs
        self._args = (len(packs), micro_num, dp_rank, dp_size, seed, rampup)
        self._sampler()  # validates sizes now

    def _sampler(self, state: Optional[dict] = None) -> BatchSampler:
        sampler = BatchSampler(*self._args)
        if state is not None:
            sampler.load_state_dict(state["sampler"])
        return sampler

    def initial_state(self) -> dict:
        return {"version": STATE_VERSION, "kind": self.kind,
                "sampler": self._sampler().state_dict()}

    def restore(self, state: dict) -> dict:
        return {**state, "sampler": self._sampler(state).state_dict()}

    def batch_count(self, state: dict) -> int:
        return state["sampler"]["batch_count"]

    def batches(self, state: dict, num_worker: int) -> Iterator[tuple[Batch, dict]]:
        producer, shadow = self._sampler(state), self._sampler(state)
        if num_worker > 0:
            # A private generator: DataLoader otherwise draws its worker base seed from the
            # global torch RNG, so a resumed run's dropout stream would differ (not bitwise).
            loader: Iterable[dict] = torch.utils.data.DataLoader(
                self.packs, batch_sampler=producer, num_workers=num_worker,
                collate_fn=stack_rows, generator=torch.Generator())
        else:
            loader = (stack_rows([self.packs[i] for i in idx]) for idx in producer)
        for rows in loader:
            shadow.next_batch()  # the consumer-side copy: advanced once per consumed batch
            yield to_batch(rows), {**state, "sampler": shadow.state_dict()}


class _StreamSource:
    """Streaming data: rows from this rank's :class:`StreamPacker`, ramp-up applied here."""

    kind = "streaming"

    def __init__(self, packer: StreamPacker, micro_num: int, rampup: Optional[str]):
        self.packer, self.micro_num, self.rampup = packer, micro_num, rampup

    def initial_state(self) -> dict:
        return {"version": STATE_VERSION, "kind": self.kind, "dp_rank": self.packer.dp_rank,
                "dp_size": self.packer.dp_size, "batch_count": 0, "position": start_position()}

    def restore(self, state: dict) -> dict:
        rank, size = self.packer.dp_rank, self.packer.dp_size
        if state["dp_size"] != size:
            # Stream positions belong to one sharding; another one cannot continue them.
            log.warning("streaming data state saved with %d data-parallel ranks, resumed with "
                        "%d: each rank restarts its part of the stream from the beginning",
                        state["dp_size"], size)
            return {**self.initial_state(), "batch_count": state["batch_count"]}
        if state["dp_rank"] != rank:
            raise DataError(f"streaming data state of rank {state['dp_rank']}/{state['dp_size']}"
                            f" loaded on rank {rank}/{size}: save and restore every "
                            "data-parallel rank's own state")
        return state

    def batch_count(self, state: dict) -> int:
        return state["batch_count"]

    def batches(self, state: dict, num_worker: int) -> Iterator[tuple[Batch, dict]]:
        gen = self._produce(state)
        # Tokenizing on the fly: with workers asked for, one thread tokenizes ahead.
        return _prefetch(gen, depth=2 * num_worker) if num_worker > 0 else gen

    def _produce(self, state: dict) -> Iterator[tuple[Batch, dict]]:
        packs = self.packer.packs(state["position"])
        count = state["batch_count"]
        while True:
            rows, pos = [], state["position"]
            for _ in range(batch_size_at(count, self.micro_num, self.rampup)):
                pack, pos = next(packs)
                rows.append(pack)
            count += 1
            yield collate(rows), {**state, "batch_count": count, "position": pos}


def _prefetch(gen: Iterator, depth: int) -> Iterator:
    """Run ``gen`` in a daemon thread, ``depth`` items ahead; exceptions re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def run() -> None:
        try:
            for item in gen:
                put((True, item))
                if stop.is_set():
                    return
        except BaseException as err:  # handed to the consumer, which re-raises it
            put((False, err))

    threading.Thread(target=run, daemon=True, name="internevo-data-prefetch").start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            yield item
    finally:
        stop.set()


def _packed_source_files(cfg: TrainConfig) -> tuple[list[str], list[PackedDataset]]:
    d = cfg.data
    types, files = train_files(d.train_folder)
    datasets, dropped, samples = [], 0, 0
    for path, type_id in files:
        ds = TokenizedFile(path, min_length_for(path, d.min_length, d.min_length_dict), type_id)
        dropped, samples = dropped + ds.num_dropped, samples + len(ds)
        datasets.append(PackedDataset(ds, d.seq_len, cfg.packed_length, d.pack_sample_into_one))
    tokens = sum(p.num_tokens for p in datasets)
    log.info("train data %s: %d files, types %s, %d samples (%d dropped by min_length), "
             "%d tokens", d.train_folder, len(files), types, samples, dropped, tokens)
    return types, datasets


def build_train_loader(cfg: TrainConfig, dp_rank: int, dp_size: int) -> TrainLoader:
    """The training loader of data-parallel rank ``dp_rank`` of ``dp_size`` (see module doc).

    ``data.type="streaming"`` reads ``train_folder`` with ``datasets`` streaming; otherwise
    ``train_folder`` is a tokenized folder, or None for InternEvo's dummy data.
    """
    d = cfg.data
    if not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
    if d.type == "streaming":
        from internevo.data.tokenizer import load_tokenizer

        packer = StreamPacker(d.train_folder, load_tokenizer(d.tokenizer_path), d.seq_len,
                              cfg.packed_length, d.pack_sample_into_one, d.content_name,
                              d.min_length, d.subset_name, dp_rank, dp_size)
        source: Any = _StreamSource(packer, d.micro_num, d.rampup_batch_size)
        types = DUMMY_TYPES
    else:
        if d.train_folder is None:
            dummy = RandomDataset(DUMMY_TRAIN_SAMPLES, d.seq_len, d.fixed_random_dataset_seqlen)
            types, parts = DUMMY_TYPES, [PackedDataset(dummy, d.seq_len, cfg.packed_length,
                                                       d.pack_sample_into_one)]
        else:
            types, parts = _packed_source_files(cfg)
        source = _PackedSource(ConcatPacks(parts), d.micro_num, dp_rank, dp_size, d.seed,
                               d.rampup_batch_size)
    return TrainLoader(source, types, d.num_worker, d.skip_batches, d.micro_num,
                       d.rampup_batch_size)


# ------------------------------------------------------------------------------ validation


class ValidLoader:
    """One validation set: deterministic, rank-strided, every sample in its own window.

    As in InternEvo's validation path, each sample is cut to ``seq_len`` and padded (input 0,
    label -100); a row holds ``micro_bsz`` such windows, so ``cu_seqlens = [0, s, 2s, ..., P]``.
    A batch has ``valid_micro_num`` rows (fewer when the set is small); the last partial batch
    is dropped.  Re-iterable: each pass starts from the beginning.
    """

    def __init__(self, name: str, files: list[TokenizedFile], seq_len: int, micro_bsz: int,
                 rows: int, dp_rank: int, dp_size: int):
        self.name, self.files, self.seq_len, self.micro_bsz = name, files, seq_len, micro_bsz
        self.ends = np.cumsum([len(f) for f in files]).astype(np.int64)
        total = int(self.ends[-1]) if len(self.ends) else 0
        per_rank = total // dp_size
        self.indices = np.arange(total)[dp_rank::dp_size][:per_rank]
        per_batch = min(rows * micro_bsz, per_rank) // micro_bsz * micro_bsz
        self.samples_per_batch = per_batch
        self.num_batches = per_rank // per_batch if per_batch else 0

    def __len__(self) -> int:
        return self.num_batches

    def _sample(self, k: int) -> np.ndarray:
        i = int(np.searchsorted(self.ends, k, side="right"))
        return self.files[i][k - (int(self.ends[i - 1]) if i else 0)]

    def __iter__(self) -> Iterator[Batch]:
        per, w = self.samples_per_batch, self.micro_bsz
        for b in range(self.num_batches):
            ids = self.indices[b * per:(b + 1) * per]
            yield collate([self._row([self._sample(int(k)) for k in ids[r:r + w]])
                           for r in range(0, per, w)])

    def _row(self, samples: list[np.ndarray]) -> Pack:
        s, n = self.seq_len, len(samples)
        input_ids = np.zeros(n * s, np.int64)
        labels = np.full(n * s, IGNORE, np.int64)
        for w, tokens in enumerate(samples):
            tokens = tokens[:s]  # InternEvo truncates validation samples to seq_len
            input_ids[w * s: w * s + len(tokens)] = np.abs(tokens)
            nxt = tokens[1:]
            labels[w * s: w * s + len(nxt)] = np.where(nxt > 0, nxt, IGNORE)
        return {"input_ids": input_ids, "labels": labels, "indexes": np.tile(np.arange(s), n),
                "type_ids": np.zeros(n * s, np.int64),
                "cu_seqlens": np.arange(0, n * s + 1, s, dtype=np.int32)}


def build_valid_loaders(cfg: TrainConfig, dp_rank: int, dp_size: int) -> dict[str, ValidLoader]:
    """``{set name: loader}``, one per leaf folder of ``data.valid_folder`` ({} when None)."""
    d = cfg.data
    if d.valid_folder is None:
        return {}
    rows = d.valid_micro_num or d.micro_num
    out = {}
    for name, paths in valid_sets(d.valid_folder).items():
        files = [TokenizedFile(p) for p in paths]
        long = sum(int((f.lengths > d.seq_len).sum()) for f in files)
        if long:
            log.info("validation set %s: %d samples longer than seq_len=%d are cut to it",
                     name, long, d.seq_len)
        loader = ValidLoader(name, files, d.seq_len, d.micro_bsz, rows, dp_rank, dp_size)
        if not len(loader):
            log.warning("validation set %s has %d samples: fewer than micro_bsz=%d per rank "
                        "for %d ranks; skipped", name, int(loader.ends[-1]), d.micro_bsz,
                        dp_size)
            continue
        out[name] = loader
    return out
