"""Language-model loss: cross entropy with label smoothing, token mean over labels != -100."""

from __future__ import annotations

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
    mask = flat_labels != IGNORE_INDEX
    flat_logits = logits.reshape(-1, logits.shape[-1])[mask].float()
    targets = flat_labels[mask]
    types = type_ids.reshape(-1)[mask].clamp(0, num_types - 1)
    nll = F.cross_entropy(flat_logits, targets, reduction="none")
    correct = (flat_logits.argmax(-1) == targets).float()
    zeros = torch.zeros(num_types, dtype=torch.float64)
    return {
        "tokens": zeros.index_add(0, types, torch.ones_like(nll, dtype=torch.float64)),
        "correct": zeros.index_add(0, types, correct.double()),
        "nll": zeros.index_add(0, types, nll.double()),
    }
