"""Language-model loss: cross entropy with label smoothing, token mean over labels != -100."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, labels: torch.Tensor,
            label_smoothing: float = 0.0) -> torch.Tensor:
    """Token-mean cross entropy of ``logits [..., V]`` against ``labels [...]`` (fp32 math).

    A row without any supervised token gives 0 (not NaN), so such rows simply add nothing.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX,
                            label_smoothing=label_smoothing, reduction="sum")
    count = (flat_labels != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


@torch.no_grad()
def token_stats(logits: torch.Tensor, labels: torch.Tensor, type_ids: torch.Tensor,
                num_types: int) -> dict[str, torch.Tensor]:
    """Per-type sums for metrics: supervised tokens, correct argmax predictions, summed NLL."""
    flat_labels = labels.reshape(-1)
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    nll = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="none")
    correct = flat_logits.argmax(-1) == flat_labels
    return type_sums(type_ids, flat_labels != IGNORE_INDEX, num_types, correct, nll)


def type_sums(type_ids: torch.Tensor, mask: torch.Tensor, num_types: int,
              correct: torch.Tensor, nll: torch.Tensor) -> dict[str, torch.Tensor]:
    """``tokens`` / ``correct`` / ``nll`` summed per data type over the tokens where ``mask``
    (fp64, on the tokens' device; no boolean indexing, so no data-dependent shapes)."""
    types = type_ids.reshape(-1).clamp(0, num_types - 1)
    mask = mask.reshape(-1)
    zeros = torch.zeros(num_types, dtype=torch.float64, device=nll.device)
    return {"tokens": zeros.index_add(0, types, mask.double()),
            "correct": zeros.index_add(0, types, (correct.reshape(-1) & mask).double()),
            "nll": zeros.index_add(0, types, torch.where(mask, nll.reshape(-1).detach().double(),
                                                         0.0))}


# --------------------------------------------------------------------------------------------
# fused head + cross entropy (tensor parallel off)

DEFAULT_CHUNK_ELEMENTS = 1 << 26
"""Logits per chunk of :func:`fused_linear_cross_entropy` (256 MiB in fp32; on a 2-core CPU
this measured ~15 % faster per step than 2**24, the matmuls of small chunks being slower)."""


def _chunk_loss_and_grad(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         smoothing: float, want_grad: bool):
    """One chunk: summed loss, per-token NLL and argmax hits, and d(summed loss)/d(logits).

    The logits ``[c, V]`` are computed once in the model dtype, cast to fp32 (what
    :func:`lm_loss` does) and then turned into the softmax in place.
    """
    logits = (hidden @ weight.t()).float()
    valid = labels != IGNORE_INDEX
    targets = labels.clamp(min=0).unsqueeze(1)
    target_logit = logits.gather(1, targets).squeeze(1)
    top, argmax = logits.max(dim=1)
    mean_logit = logits.mean(dim=1) if smoothing > 0 else None
    probs = logits.sub_(top.unsqueeze(1)).exp_()  # the logits are not needed any more
    sums = probs.sum(dim=1)
    lse = top + sums.log()
    nll = torch.where(valid, lse - target_logit, 0.0)
    loss = nll if mean_logit is None else (1 - smoothing) * nll + torch.where(
        valid, smoothing * (lse - mean_logit), 0.0)
    correct = valid & (argmax == targets.squeeze(1))
    if not want_grad:
        return loss.sum(), nll, correct, None
    # d loss_i / d logit_ij = p_ij - (1 - eps) [j = t_i] - eps / V; zero for ignored tokens
    probs.mul_(torch.where(valid, sums.reciprocal(), 0.0).unsqueeze(1))
    probs.scatter_add_(1, targets, torch.where(valid, smoothing - 1.0, 0.0).unsqueeze(1))
    if smoothing > 0:
        probs.sub_(torch.where(valid, smoothing / logits.shape[1], 0.0).unsqueeze(1))
    return loss.sum(), nll, correct, probs


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross entropy of ``hidden @ weight.T`` computed chunk by chunk.

    Forward computes the gradients too (each chunk's logits live only while it is processed), so
    backward only scales them by the incoming gradient.  Outputs: the loss sum (differentiable),
    the per-token NLL and argmax-correct flags (not differentiable).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, smoothing, chunk, want_grad):
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
        correct = torch.empty(n, dtype=torch.bool, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        grad_weight = None
        if want_grad:  # accumulate in fp32 when the weight is 16-bit
            grad_weight = torch.zeros(weight.shape, dtype=torch.promote_types(
                weight.dtype, torch.float32), device=weight.device)
        for start in range(0, n, chunk):
            sl = slice(start, min(start + chunk, n))
            h = hidden[sl]
            loss, nll[sl], correct[sl], dlogits = _chunk_loss_and_grad(
                h, weight, labels[sl], smoothing, want_grad)
            total += loss
            if dlogits is not None:
                dlogits = dlogits.to(hidden.dtype)
                torch.mm(dlogits, weight, out=grad_hidden[sl])
                if grad_weight.dtype == dlogits.dtype:
                    grad_weight.addmm_(dlogits.t(), h)
                else:
                    grad_weight += (dlogits.t() @ h).float()
        ctx.mark_non_differentiable(nll, correct)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total, nll, correct

    @staticmethod
    def backward(ctx, grad_total, _grad_nll, _grad_correct):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is None:
            raise RuntimeError("fused_linear_cross_entropy ran without gradients (no_grad)")
        if not (grad_total == 1).all():
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
            grad_weight = grad_weight * grad_total
        return grad_hidden, grad_weight.to(ctx.weight_dtype), None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               label_smoothing: float = 0.0, chunk: Optional[int] = None
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``F.cross_entropy(hidden @ weight.T, labels, reduction="sum")`` without the whole logits.

    ``hidden [..., h]`` (e.g. the final-normed hidden states), ``weight [V, h]`` (the head),
    ``labels [...]`` with ``-100`` for no loss.  Returns ``(loss_sum, nll, correct)``: the summed
    (label-smoothed) loss as an fp32 scalar, and per token the unsmoothed NLL (fp32, 0 where
    ignored) and whether the argmax is the label (False where ignored) — the metrics' inputs.
    ``chunk`` tokens are processed at a time (default: about 64M logits per chunk).
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).to(flat_hidden.device)
    chunk = chunk or max(1, DEFAULT_CHUNK_ELEMENTS // weight.shape[0])
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    fn = _FusedLinearCrossEntropy
    total, nll, correct = fn.apply(flat_hidden, weight, flat_labels, float(label_smoothing),
                                   int(chunk), want_grad)
    return total, nll.view(labels.shape), correct.view(labels.shape)


def fused_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                  type_ids: torch.Tensor, num_types: int, label_smoothing: float = 0.0,
                  chunk: Optional[int] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`lm_loss` of the logits ``hidden @ weight.T`` plus :func:`token_stats`, in one pass."""
    total, nll, correct = fused_linear_cross_entropy(hidden, weight, labels, label_smoothing,
                                                     chunk)
    mask = labels.reshape(-1) != IGNORE_INDEX
    loss = total / mask.sum().clamp(min=1)
    return loss, type_sums(type_ids, mask, num_types, correct.bool(), nll)
