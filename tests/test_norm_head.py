"""InternLM2 ``norm_head=True``: the head's rows are L2-normalised in every forward, training
uses them, and the Hugging Face export writes them (its logits equal ours)."""

import pytest
import torch
import torch.nn.functional as F

from internevo.config import config_from_dict
from internevo.convert import hf_folder
from internevo.data.loader import build_train_loader
from internevo.launch import seed_everything
from internevo.models.loss import lm_loss
from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout
from internevo.train.trainer import Trainer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def norm_head_cfg():
    return config_from_dict({
        "model_type": "INTERNLM2_PUBLIC",
        "model": dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_kv_attention_heads=2,
                      vocab_size=256, mlp_ratio=1.5, multiple_of=16, dtype="torch.float32",
                      use_flash_attn=False, norm_head=True, layer_norm_epsilon=1e-6),
        "data": dict(seq_len=16, micro_bsz=2, micro_num=2, total_steps=4, num_worker=0),
        "adam": dict(lr=1e-2), "enable_tb": False,
        "lr_scheduler": dict(total_steps=4, warmup_ratio=0.25, eta_min=1e-3),
        "ckpt": dict(enable_save_ckpt=False),
    })


def batch_loss(model, batch):
    """The step loss (mean of row token-means) with the head written out: h @ normalize(W).T."""
    weight = F.normalize(model.output.weight, dim=-1)
    losses = []
    for m in range(batch["input_ids"].shape[0]):
        hidden = model(batch["input_ids"][m:m + 1], cu_seqlens=batch["cu_seqlens"][m],
                       indexes=batch["indexes"][m:m + 1], return_hidden=True)
        losses.append(lm_loss(hidden @ weight.T, batch["labels"][m:m + 1]))
    return torch.stack(losses).mean().item()


def test_norm_head_trains_and_hf_export_logits_equal_ours(tmp_path):
    cfg = norm_head_cfg()
    seed_everything(1024)
    layout = ParallelLayout.from_config(cfg, 1, 0)
    t = Trainer(cfg, layout, Comm(layout), torch.device("cpu"), tmp_path / "run")
    with torch.no_grad():  # rows of very different norms: normalising them matters
        t.model.output.weight.mul_(torch.linspace(0.1, 10, 256).unsqueeze(1))
    t.optimizer.refresh_masters_from_params()
    first = next(iter(build_train_loader(cfg, 0, 1)))
    with torch.no_grad():
        expected = batch_loss(t.model, first)
    history = t.fit()
    assert history[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    assert history[-1]["loss"] < history[0]["loss"]

    model = t.model.eval()
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
        hidden = model(ids, return_hidden=True)
    assert torch.allclose(ours, hidden @ F.normalize(model.output.weight, dim=-1).T, atol=1e-6)
    assert not torch.allclose(ours, hidden @ model.output.weight.T, atol=1e-2)  # raw rows differ
    hf_folder.export_hf(model.state_dict(), cfg, tmp_path / "hf", None, "llama", torch.float32)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        diff = (theirs.eval()(ids).logits - ours).abs().max().item()
    assert diff <= 1e-5, diff
