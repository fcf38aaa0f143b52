"""The training loop: build every part from the config, resume, step, measure, evaluate, save."""

from __future__ import annotations

import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from internevo.config import TrainConfig
from internevo.data.errors import DataError
from internevo.errors import Interrupted
from internevo.models.build import model_dtype
from internevo.models.common import NormHead
from internevo.models.loss import fused_lm_loss, token_stats
from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout
from internevo.parallel.pipeline import (
    Chunk,
    PipelineRunner,
    chunk_blocks,
    forward_only,
    layout_chunks,
    train_schedule,
)
from internevo.parallel.scaler import LossScaler
from internevo.profiling.report import eta_text, write_report
from internevo.train.diag import StepDiagnostics
from internevo.train.interrupt import StopSignals
from internevo.train.metrics import MetricsWriter, device_peak_flops, step_flops
from internevo.train.schedules import Schedules


@dataclass
class TrainState:
    """Progress counters (checkpointed)."""

    batch_count: int = 0
    """Batches consumed so far (including skipped and overflowed ones); the next batch's index."""
    step_count: int = 0
    """Successful optimizer updates."""
    num_consumed_tokens: int = 0
    """Tokens of every trained batch, summed over data parallel."""
    inf_nan_skip_batches: int = 0
    """Batches whose update was skipped for non-finite gradients."""
    skipped_batches: int = 0
    """Batches consumed without training because ``data.skip_batches`` named them."""

    def state_dict(self) -> dict:
        """Checkpointable state."""
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`."""
        for key, value in state.items():
            setattr(self, key, int(value))


def _to_device(batch: dict, device: torch.device) -> dict:
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "cu_seqlens"}
    out["cu_seqlens"] = [c.to(device) for c in batch["cu_seqlens"]]
    return out


class Trainer:
    """Owns the model, optimizer, schedules, data and metrics of one run on one rank."""

    def __init__(self, cfg: TrainConfig, layout: ParallelLayout, comm: Comm,
                 device: torch.device, run_dir: Path, seed: int = 1024,
                 signals: Optional[StopSignals] = None):
        from internevo.checkpoint.manager import CheckpointManager
        from internevo.data.loader import build_train_loader, build_valid_loaders
        from internevo.data.sampler import parse_skip_batches
        from internevo.parallel.apply import build_loss, build_optimizer, parallelize

        self.cfg, self.layout, self.comm, self.device = cfg, layout, comm, device
        self.run_dir, self.seed = Path(run_dir), seed
        self.signals = signals
        """SIGTERM / SIGINT stop request, looked at between steps (None: not watched)."""
        self.model = parallelize(cfg, layout, comm, device, seed)
        self.scaler = LossScaler.from_config(cfg)
        self.optimizer = build_optimizer(self.model, cfg, layout, comm, self.scaler)
        self.loss_fn = build_loss(cfg, layout, comm)
        self.schedules = Schedules(cfg)
        self.state = TrainState()
        self.loader = build_train_loader(cfg, layout.dp_rank, layout.data)
        self.valid_loaders = build_valid_loaders(cfg, layout.dp_rank, layout.data)
        self.skip_batches = parse_skip_batches(cfg.data.skip_batches)
        self.num_types = max(1, len(getattr(self.loader, "dataset_types", []) or [""]))
        self.peak = device_peak_flops(cfg, device)
        self.writer = MetricsWriter(self.run_dir, cfg.enable_tb, cfg.tensorboard_folder,
                                    layout.is_log_rank)
        self.ckpt = CheckpointManager(cfg, layout, comm, device, {
            "model": self.model, "optimizer": self.optimizer, "schedules": self.schedules,
            "train_state": self.state, "loader": self.loader})
        self.history: list[dict] = []
        self.diagnostics = StepDiagnostics(cfg, layout, comm, device)
        self.fused_head = self.can_fuse_head()
        """Loss by :func:`fused_lm_loss` (tensor parallel off, plain single-device head)."""
        mtp = layout.tensor if layout.tensor_mode == "mtp" else 1
        self.pipeline = PipelineRunner(comm, layout.pp_rank, layout.pipeline, cfg.model.num_chunks,
                                       split=mtp) if layout.pipeline > 1 else None
        """Runs the pipeline schedule (None without pipeline parallel)."""
        self.chunks = layout_chunks(cfg, layout) if self.pipeline else []
        """This stage's model chunks."""
        self.pipeline_metrics: dict = {}
        """Busy time and idle share of this stage in the last step."""

    def can_fuse_head(self) -> bool:
        """The chunked head + loss applies: no tensor parallel or FSDP, a bias-free Linear head."""
        model = self.model
        head = getattr(model, getattr(model, "head_attr", ""), None)
        return (self.layout.tensor == 1 and not self.layout.fsdp
                and type(head) in (torch.nn.Linear, NormHead) and head.bias is None
                and type(head.weight) is torch.nn.Parameter)

    # ------------------------------------------------------------------------------- stepping
    def forward_backward(self, batch: dict, loss_scale: float) -> tuple[float, dict]:
        """Run all micro-batches of ``batch``; gradients accumulate, nothing is communicated
        (except the activations and gradients between pipeline stages)."""
        if self.pipeline is not None:
            return self.pipeline_forward_backward(batch, loss_scale)
        rows = batch["input_ids"].shape[0]
        loss_sum = 0.0
        stats = None
        for m in range(rows):
            self.optimizer.start_micro_step(last=m == rows - 1)  # gradient sync / overlap
            loss, row_stats = self.row_loss(batch, m)
            loss = loss / rows
            (loss * loss_scale).backward() if loss_scale != 1.0 else loss.backward()
            loss_sum += loss.item()
            stats = row_stats if stats is None else {k: stats[k] + row_stats[k] for k in stats}
            del loss
        return loss_sum, stats

    def row_args(self, batch: dict, m: int, inputs: Optional[torch.Tensor] = None,
                 chunk: Optional[Chunk] = None) -> dict:
        """Model arguments for row ``m``: its tokens (or the hidden states ``inputs`` a pipeline
        stage received), segments and positions, and the blocks of pipeline ``chunk``."""
        args = {"input_ids": batch["input_ids"][m:m + 1] if inputs is None else inputs,
                "cu_seqlens": batch["cu_seqlens"][m], "indexes": batch["indexes"][m:m + 1]}
        if chunk is not None:
            args["blocks"] = chunk_blocks(self.model, chunk)
        return args

    def row_loss(self, batch: dict, m: int, inputs: Optional[torch.Tensor] = None,
                 chunk: Optional[Chunk] = None) -> tuple[torch.Tensor, dict]:
        """Token-mean loss of row ``m`` and its per-type metrics (see :meth:`row_args`)."""
        args = self.row_args(batch, m, inputs, chunk)
        if self.fused_head:
            return self.fused_row_loss(batch, m, args)
        logits = self.model(**args)
        return self.loss_fn(logits, batch["labels"][m:m + 1]), self.row_stats(logits, batch, m)

    def fused_row_loss(self, batch: dict, m: int, args: dict) -> tuple[torch.Tensor, dict]:
        """Loss and metrics of row ``m`` by the chunked head + cross entropy (no [P, V] logits)."""
        hidden = self.model(**args, return_hidden=True)
        return fused_lm_loss(hidden, self.model.head_weight(), batch["labels"][m:m + 1],
                             batch["type_ids"][m:m + 1], self.num_types,
                             self.cfg.loss.label_smoothing)

    def row_stats(self, logits: torch.Tensor, batch: dict, m: int) -> dict:
        """Per-type token counts, correct predictions and NLL of one row (for metrics)."""
        sharded = getattr(self.loss_fn, "token_stats", None)
        if sharded is not None:  # vocab-sharded logits: counted collectives, no logits gather
            return sharded(logits.detach(), batch["labels"][m:m + 1],
                           batch["type_ids"][m:m + 1], self.num_types)
        full = getattr(logits, "full_tensor", None)
        logits = full() if callable(full) else logits
        return token_stats(logits.detach(), batch["labels"][m:m + 1], batch["type_ids"][m:m + 1],
                           self.num_types)

    # ------------------------------------------------------------------------ pipeline parallel
    def pipeline_forward_backward(self, batch: dict, loss_scale: float) -> tuple[float, dict]:
        """The 1F1B / interleaved schedule over the rows of ``batch`` (spec §3.7): the last stage
        computes each row's loss / rows; loss and metrics come back from it to every stage."""
        rows = batch["input_ids"].shape[0]
        acc: dict = {"loss": torch.zeros(1, dtype=torch.float64, device=self.device),
                     "stats": self.zero_stats()}

        def forward(chunk: Chunk, m: int, x: Optional[torch.Tensor]) -> torch.Tensor:
            if not chunk.last:
                return self.model(**self.row_args(batch, m, x, chunk), final=False)
            loss, stats = self.row_loss(batch, m, x, chunk)
            acc["loss"] += loss.detach().double() / rows  # no host sync inside the schedule
            acc["stats"] = {k: acc["stats"][k] + stats[k] for k in stats}
            return loss / rows

        lay = self.layout
        actions = train_schedule(lay.pipeline, lay.pp_rank, rows, self.cfg.model.num_chunks)
        timing = self.pipeline.run(actions, self.chunks, forward, self.optimizer.start_micro_step,
                                   self.activation_shape(batch), model_dtype(self.cfg),
                                   self.device, loss_scale)
        self.pipeline_metrics = {"pipeline/busy_s": timing.busy_s,
                                 "pipeline/idle_fraction": timing.idle_fraction,
                                 "pipeline/max_in_flight": timing.max_in_flight}
        return self.from_last_stage(acc["loss"], acc["stats"])

    def activation_shape(self, batch: dict) -> tuple[int, int, int]:
        """The hidden state crossing a stage boundary: ``[1, P, h]``, ``P / tp`` tokens under
        sequence parallel (msp, fsp, isp)."""
        lay = self.layout
        shards = lay.tensor if lay.tensor_mode in ("msp", "fsp", "isp") else 1
        return (1, batch["input_ids"].shape[1] // shards, self.cfg.model.hidden_size)

    def zero_stats(self) -> dict:
        """Empty per-type metric sums (what a stage without the head contributes)."""
        return {k: torch.zeros(self.num_types, dtype=torch.float64, device=self.device)
                for k in ("tokens", "correct", "nll")}

    def from_last_stage(self, loss: torch.Tensor, stats: dict) -> tuple[float, dict]:
        """The last pipeline stage's loss (a 1-element tensor) and metric sums, broadcast to
        every stage."""
        packed = torch.cat([loss.reshape(1), *stats.values()])
        self.comm.broadcast(packed, "pipeline", self.layout.pipeline - 1)
        parts = packed[1:].split(self.num_types)
        return packed[0].item(), dict(zip(stats, parts))

    def train_step(self, batch: dict) -> dict:
        """One optimizer step on ``batch``; returns its metrics record."""
        self.comm.reset()
        start = time.perf_counter()
        self.model.train()
        self.check_token_ids(batch)
        batch = _to_device(batch, self.device)
        loss, stats = self.forward_backward(batch, self.scaler.scale)
        outcome = self.optimizer.step(self.schedules.lr(), self.schedules.beta2())
        lr = self.schedules.lr()
        if outcome.success:
            self.schedules.step()
            self.state.step_count += 1
        else:
            self.state.inf_nan_skip_batches += 1
        loss_t = torch.tensor([loss], dtype=torch.float64, device=self.device)
        self.comm.all_reduce(loss_t, "data", op="avg")
        elapsed = time.perf_counter() - start
        record = self._record(batch, loss_t.item(), lr, outcome, stats, elapsed)
        record.update(self.pipeline_metrics)
        return record

    def check_token_ids(self, batch: dict) -> None:
        """Token ids at or beyond the vocabulary would index out of the embedding: say so."""
        top = int(batch["input_ids"].max())
        vocab = self.cfg.model.vocab_size
        if top >= vocab:
            source = self.cfg.data.train_folder or "the dummy dataset (ids up to 199)"
            raise DataError(f"batch {self.state.batch_count}: token id {top} from {source} is "
                            f"outside model.vocab_size={vocab}; use the tokenizer's vocabulary "
                            "size")

    def _record(self, batch: dict, loss: float, lr: float, outcome: Any, stats: dict,
                elapsed: float) -> dict:
        lay = self.layout
        tokens = batch["labels"].numel() * lay.data
        self.state.num_consumed_tokens += tokens
        seg = [n for c in batch["cu_seqlens"] for n in torch.diff(c).tolist()]
        flops = step_flops(self.cfg, batch["labels"].numel(), seg) * lay.data / lay.world_size
        tflops = flops / elapsed / 1e12
        correct, count = stats["correct"].sum().item(), stats["tokens"].sum().item()
        record = {
            "step": self.state.step_count, "batch": self.state.batch_count, "loss": loss,
            "lr": lr, "grad_norm": outcome.grad_norm, "loss_scale": outcome.loss_scale,
            "success": outcome.success, "tokens": tokens,
            "tgs": tokens / lay.world_size / elapsed, "tflops": tflops,
            "mfu": flops / elapsed / self.peak if self.peak else None,
            "acc": correct / count if count else None, "step_time": elapsed,
            "micro_num": batch["labels"].shape[0],
            "num_consumed_tokens": self.state.num_consumed_tokens,
            "comm_bytes": self.comm.total_bytes(),
        }
        record.update(self.comm.snapshot())
        record.update(self.per_type_metrics(stats))
        return record

    def per_type_metrics(self, stats: dict) -> dict:
        """``acc/<type>``, ``loss/<type>`` and ``tokens/<type>`` of this rank's rows."""
        names = getattr(self.loader, "dataset_types", None) or ["all"]
        out = {}
        for i, name in enumerate(names[: self.num_types]):
            count = stats["tokens"][i].item()
            if count:
                out[f"acc/{name}"] = stats["correct"][i].item() / count
                out[f"loss/{name}"] = stats["nll"][i].item() / count
                out[f"tokens/{name}"] = count
        return out

    # ----------------------------------------------------------------------------- the loop
    def fit(self) -> list[dict]:
        """Train until ``data.total_steps`` batches are consumed or the stop file says so; the
        save folder's lock is given back however the run ends."""
        try:
            self.ckpt.maybe_resume()
            self.run_steps()
            self.ckpt.finish()
            self.writer.close()
            if self.cfg.monitor.plot and self.layout.is_log_rank:
                write_report(self.run_dir)
        finally:
            self.ckpt.release()
        return self.history

    def run_steps(self) -> None:
        """The loop: a step per batch (skipped batches consumed), validation, checkpoints."""
        batches = iter(self.loader)
        while self.state.batch_count < self.cfg.data.total_steps:
            self.stop_if_signalled()
            batch = next(batches)
            if self.state.batch_count in self.skip_batches:
                self.state.batch_count += 1
                self.state.skipped_batches += 1
                continue
            record = self.train_step(batch)
            self.state.batch_count += 1
            self.diagnostics.after_step(self.state.batch_count, record["step_time"])
            self.history.append(record)
            self.writer.write(record, self.console_line(record))
            if self.should_validate():
                self.validate()
            if self.ckpt.after_step():
                break

    def stop_if_signalled(self) -> None:
        """When any rank got SIGTERM / SIGINT: save (if configured) and raise
        :class:`~internevo.errors.Interrupted`; all ranks decide together."""
        if self.signals is None:
            return
        flag = torch.tensor([self.signals.received or 0], dtype=torch.int64, device=self.device)
        self.comm.all_reduce(flag, "world", op="max")
        signum = int(flag.item())
        if not signum:
            return
        st = self.state
        saved = self.ckpt.save_now()
        self.writer.close()
        where = (f"saved step {st.step_count} to {saved}" if saved is not None else
                 "no checkpoint saved (ckpt.enable_save_ckpt and ckpt.save_ckpt_folder are not "
                 "both set); progress since the last checkpoint is lost")
        raise Interrupted(f"{signal.Signals(signum).name} after step {st.step_count} (batch "
                          f"{st.batch_count}/{self.cfg.data.total_steps}): {where}", signum)

    def should_validate(self) -> bool:
        """Validation every ``data.valid_every`` successful steps."""
        every = self.cfg.data.valid_every
        return bool(every and self.valid_loaders and self.state.step_count % every == 0)

    def console_line(self, r: dict) -> str:
        """Human-readable one-line summary of a step."""
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "unknown"
        skipped = "" if r["success"] else " (update skipped: non-finite gradients)"
        return (f"step {r['step']:>5} batch {r['batch'] + 1}/{self.cfg.data.total_steps} "
                f"loss {r['loss']:.4f} lr {r['lr']:.3e} grad_norm {r['grad_norm']:.3f} "
                f"tgs {r['tgs']:.0f} tflops {r['tflops']:.3f} mfu {mfu} "
                f"eta {eta_text(self.history, self.cfg.data.total_steps - r['batch'] - 1)}"
                f"{skipped}")

    # ---------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean token loss and accuracy on every validation set, averaged over data parallel."""
        self.model.eval()
        results = {}
        for name, loader in self.valid_loaders.items():
            totals = torch.zeros(3, dtype=torch.float64, device=self.device)
            for batch in loader:
                totals += self.valid_totals(_to_device(batch, self.device))
            self.comm.broadcast(totals, "pipeline", self.layout.pipeline - 1)  # the head's stage
            self.comm.all_reduce(totals, "data")
            count = max(totals[2].item(), 1.0)
            loss = totals[0].item() / count
            results[f"valid/{name}/loss"] = loss
            results[f"valid/{name}/acc"] = totals[1].item() / count
            results[f"valid/{name}/ppl"] = math.exp(min(loss, 50.0))
        self.model.train()
        record = {"step": self.state.step_count, **results}
        line = " ".join(f"{k} {v:.4f}" for k, v in results.items())
        self.writer.write(record, "validation " + line)
        return results

    def valid_totals(self, batch: dict) -> torch.Tensor:
        """Summed NLL, correct predictions and tokens of one validation batch (forward only;
        through the pipeline stages under pipeline parallel, zeros except on the last stage)."""
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        rows = batch["input_ids"].shape[0]
        if self.pipeline is None:
            for m in range(rows):
                totals += _valid_sums(self.row_stats(self.model(**self.row_args(batch, m)),
                                                     batch, m))
            return totals

        def forward(chunk: Chunk, m: int, x: Optional[torch.Tensor]) -> torch.Tensor:
            out = self.model(**self.row_args(batch, m, x, chunk), final=chunk.last)
            if chunk.last:
                totals.add_(_valid_sums(self.row_stats(out, batch, m)))
            return out

        self.pipeline.run(forward_only(rows, self.cfg.model.num_chunks), self.chunks, forward,
                          lambda last: None, self.activation_shape(batch),
                          model_dtype(self.cfg), self.device)
        return totals


def _valid_sums(stats: dict) -> torch.Tensor:
    return torch.stack([stats["nll"].sum(), stats["correct"].sum(), stats["tokens"].sum()])


def run_dir_for(cfg: TrainConfig, run_dir: Optional[str]) -> Path:
    """``--run-dir`` when given, else ``runs/<JOB_NAME>``."""
    return Path(run_dir) if run_dir else Path("runs") / cfg.JOB_NAME
