"""InternEvo's own checkpoint folders: weights load as the same weights from Hugging Face do,
to-internevo then from-internevo is the identity, and a resumed InternEvo run continues with its
LR, counters, sampler position and optimizer moments.

The InternEvo folders are written here, from the spec's layout (§4.5, §6.2, §7), by code that
shares nothing with ``internevo.convert.internevo``.
"""

import math

import numpy as np
import pytest
import torch

from internevo import cli
from internevo.checkpoint import format as ckpt_format
from internevo.config import config_from_dict, load_config
from internevo.convert import hf, hf_folder, safetensors_io
from internevo.convert import internevo as ie
from internevo.models.build import build_model
from internevo.models.loss import lm_loss
from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout
from internevo.parallel.spawn import spawn_ranks
from internevo.train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

TINY = dict(num_layers=3, hidden_size=32, num_attention_heads=4, vocab_size=96, mlp_ratio=1.5,
            multiple_of=16, dtype="torch.float32", use_flash_attn=False, layer_norm_epsilon=1e-6)


def tiny_cfg(model_type, **model):
    return config_from_dict({"model_type": model_type, "model": {**TINY, **model}})


def random_state(cfg, seed=0):
    """A single-process state dict with weights large enough that every mistake shows."""
    model = build_model(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    return {k: v.detach() + torch.randn(v.shape, generator=gen) * 0.05
            for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ InternEvo's layout (the test's)


def stage_sizes(layers, pp):
    """§3.7: ``L // pp`` each, the last ``L % pp`` stages one more."""
    return [layers // pp + (1 if p >= pp - layers % pp else 0) for p in range(pp)]


def v1_rank_tensors(hf_sd, cfg, t, tp, split_hidden):
    """InternLM v1 names of tensor rank ``t`` (global block index), from Llama-layout HF tensors:
    ``Wqkv`` rows are this rank's heads of q, then k, then v (§4.1, §7.2)."""
    m = cfg.model
    rows = m.hidden_size // tp  # (H / tp) * d rows of each of q, k, v

    def part(x, dim):
        return x.chunk(tp, dim)[t]

    out = {"embedding.word_embeddings.weight" if not split_hidden else "embedding.weight":
           part(hf_sd["model.embed_tokens.weight"], 1 if split_hidden else 0),
           "norm.weight": hf_sd["model.norm.weight"],
           "head.weight": part(hf_sd["lm_head.weight"], 0)}
    for i in range(m.num_layers):
        a, b = f"blocks.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            out[a + f"mixer.Wqkv.{kind}"] = torch.cat(
                [hf_sd[b + f"self_attn.{n}_proj.{kind}"][t * rows:(t + 1) * rows] for n in "qkv"])
        out[a + "mixer.out_proj.weight"] = part(hf_sd[b + "self_attn.o_proj.weight"], 1)
        out[a + "mixer.out_proj.bias"] = hf_sd[b + "self_attn.o_proj.bias"]
        out[a + "mlp.w1.weight"] = part(hf_sd[b + "mlp.gate_proj.weight"], 0)
        out[a + "mlp.w3.weight"] = part(hf_sd[b + "mlp.up_proj.weight"], 0)
        out[a + "mlp.w2.weight"] = part(hf_sd[b + "mlp.down_proj.weight"], 1)
        out[a + "norm1.weight"] = hf_sd[b + "input_layernorm.weight"]
        out[a + "norm2.weight"] = hf_sd[b + "post_attention_layernorm.weight"]
    return out


def v2_rank_tensors(hf_sd, cfg, t, tp, split_hidden):
    """InternLM2 names of tensor rank ``t`` from the published InternLM2 HF layout: ``wqkv`` is
    KV-group-major, so a rank's rows are one contiguous block (§4.2, §7.3)."""

    def part(x, dim):
        return x.chunk(tp, dim)[t]

    out = {"tok_embeddings.weight": part(hf_sd["model.tok_embeddings.weight"],
                                         1 if split_hidden else 0),
           "norm.weight": hf_sd["model.norm.weight"],
           "output.weight": part(hf_sd["output.weight"], 0)}
    for i in range(cfg.model.num_layers):
        a, b = f"layers.{i}.", f"model.layers.{i}."
        out[a + "attention.wqkv.weight"] = part(hf_sd[b + "attention.wqkv.weight"], 0)
        out[a + "attention.wo.weight"] = part(hf_sd[b + "attention.wo.weight"], 1)
        for w, dim in (("w1", 0), ("w3", 0), ("w2", 1)):
            out[a + f"feed_forward.{w}.weight"] = part(hf_sd[b + f"feed_forward.{w}.weight"], dim)
        for n in ("attention_norm", "ffn_norm"):
            out[a + f"{n}.weight"] = hf_sd[b + f"{n}.weight"]
    return out


def to_stages(rank_sd, cfg, pp, prefix=""):
    """Global names -> per-stage dicts with local block indices (§4.5), in module order."""
    blocks = "blocks" if cfg.model_type == "INTERNLM" else "layers"
    first = "embedding" if cfg.model_type == "INTERNLM" else "tok_embeddings"
    sizes = stage_sizes(cfg.model.num_layers, pp)
    stages = [{} for _ in range(pp)]
    for key, value in rank_sd.items():
        if key.startswith(first):
            stages[0][prefix + key] = value
    start = 0
    for p, size in enumerate(sizes):
        for i in range(start, start + size):
            for key, value in rank_sd.items():
                if key.startswith(f"{blocks}.{i}."):
                    local = key.replace(f"{blocks}.{i}.", f"{blocks}.{i - start}.", 1)
                    stages[p][prefix + local] = value
        start += size
    for key, value in rank_sd.items():
        if not key.startswith((first, blocks)):
            stages[-1][prefix + key] = value
    stages[-1][prefix + "rotary_emb.inv_freq"] = torch.ones(4)  # a buffer some versions save
    return stages


def write_internevo_model(folder, hf_sd, cfg, tp, pp, split_hidden=False, prefix=""):
    """``model_tp{t}_pp{p}.pt`` files; returns {(t, p): stage dict}."""
    folder.mkdir(parents=True, exist_ok=True)
    rank_fn = v1_rank_tensors if cfg.model_type == "INTERNLM" else v2_rank_tensors
    files = {}
    for t in range(tp):
        rank = rank_fn(hf_sd, cfg, t, tp, split_hidden)
        for p, stage in enumerate(to_stages(rank, cfg, pp, prefix)):
            stage = {k: v.clone() for k, v in stage.items()}
            torch.save(stage, folder / f"model_tp{t}_pp{p}.pt")
            files[(t, p)] = stage
    return files


def loss_of(cfg, sd, ids):
    model = build_model(cfg)
    model.load_state_dict(sd)
    with torch.no_grad():
        logits = model(ids[:, :-1])
    return lm_loss(logits, ids[:, 1:])


CASES = {  # model type, model keys, tp, pp, embed_split_hidden, key prefix
    "v1-tp1-pp1": ("INTERNLM", {}, 1, 1, False, ""),
    "v1-tp2-pp2-vocab-split-model-prefix": ("INTERNLM", {}, 2, 2, False, "model."),
    "v1-tp2-pp1-hidden-split": ("INTERNLM", {}, 2, 1, True, ""),
    "v2-tp2-pp2-gqa": ("INTERNLM2_PUBLIC", dict(num_kv_attention_heads=2), 2, 2, True, ""),
    "v2-tp1-pp2": ("INTERNLM2_PUBLIC", dict(num_kv_attention_heads=2), 1, 2, False, "model."),
}


@pytest.mark.parametrize("case", CASES)
def test_weights_load_as_the_same_weights_from_hf(tmp_path, case):
    model_type, model, tp, pp, split_hidden, prefix = CASES[case]
    cfg = tiny_cfg(model_type, **model)
    fmt = "llama" if model_type == "INTERNLM" else "internlm2"
    sd = random_state(cfg)
    hf_folder.export_hf(sd, cfg, tmp_path / "hf", None, fmt, dtype=torch.float32)
    from_hf = hf_folder.load_hf_for_training(tmp_path / "hf", cfg)
    hf_sd = safetensors_io.read_safetensors(tmp_path / "hf")
    write_internevo_model(tmp_path / "ie" / "5", hf_sd, cfg, tp, pp, split_hidden, prefix)
    (tmp_path / "ie" / "5" / "5.step").write_text("{}")

    got = ie.read_checkpoint(tmp_path / "ie", cfg, frozenset({"model"}))  # a save folder
    lay = got["layout"]
    assert got["folder"] == tmp_path / "ie" / "5" and (lay.tensor, lay.pipeline) == (tp, pp)
    ids = torch.randint(0, TINY["vocab_size"], (1, 33), generator=torch.Generator().manual_seed(3))
    assert torch.equal(loss_of(cfg, got["model"], ids), loss_of(cfg, from_hf, ids))
    assert all(torch.equal(got["model"][k], sd[k]) for k in sd)


@pytest.mark.parametrize("model_type,model", [
    ("INTERNLM", dict(embed_split_hidden=True)),
    ("INTERNLM2_PUBLIC", dict(num_kv_attention_heads=2, adapt_hf=False)),
])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2), (2, 3)])
def test_to_internevo_then_from_internevo_is_identity(tmp_path, model_type, model, tp, pp):
    cfg = tiny_cfg(model_type, **model)
    sd = random_state(cfg, seed=tp + pp)
    written = ie.write_model(sd, cfg, tmp_path, tp, pp)
    assert sorted(p.name for p in written) == sorted(
        f"model_tp{t}_pp{p}.pt" for t in range(tp) for p in range(pp))
    # the stage files hold InternEvo's partition: the last L % pp stages one block more
    blocks = "blocks" if model_type == "INTERNLM" else "layers"
    counts = [ie.block_count(torch.load(tmp_path / f"model_tp0_pp{p}.pt"), blocks)
              for p in range(pp)]
    assert counts == stage_sizes(TINY["num_layers"], pp)
    back = ie.read_model(tmp_path, cfg)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


# ----------------------------------------------------------------------- resuming an InternEvo run


def write_internevo_optimizer(folder, stages, values, zo, world, step, scaler):
    """§3.5 / §6.2: per (t, p) the fp32 parameters form group 1 and the rest group 0; each group
    sorted by numel (largest first) is dealt greedily to the least-loaded zero1 rank, whose flat
    fp32 master and AdamW moments are the concatenation of its parameters."""
    for (t, p), stage in stages.items():
        params = {n: v for n, v in stage.items() if not n.endswith("inv_freq")}
        groups = [[n for n in params if params[n].dtype != torch.float32],
                  [n for n in params if params[n].dtype == torch.float32]]
        plan, owned = [], []
        for members in groups:
            ids, own, load = [[] for _ in range(zo)], [[] for _ in range(zo)], [0] * zo
            for i, n in enumerate(sorted(members, key=lambda n: params[n].numel(), reverse=True)):
                r = load.index(min(load))
                ids[r].append("_".join([str(i), *map(str, params[n].shape)]))
                own[r].append(n)
                load[r] += params[n].numel()
            plan.append(ids)
            owned.append(own)
        for z in range(zo):
            state, param_groups, flat, index = {}, [], {}, 0
            for g, members in enumerate(groups):
                if owned[g][z]:
                    vecs = [torch.cat([values[j][(t, p)][n].flatten() for n in owned[g][z]])
                            for j in range(3)]
                    flat[g] = vecs[0]
                    state[index] = {"step": torch.tensor(float(step)), "exp_avg": vecs[1],
                                    "exp_avg_sq": vecs[2]}
                    param_groups.append({"params": [index], "lr": 1e-3, "name": str(g)})
                    index += 1
                else:  # the rank owns nothing here: torch numbers the unreplaced params
                    param_groups.append({"params": list(range(index, index + len(members)))})
                    index += len(members)
            torch.save({"grad_scaler": scaler, "flat_fp32_weights": flat,
                        "base_optim_states": {"state": state, "param_groups": param_groups}},
                       folder / f"optimizer_tp{t}_pp{p}_zo{z}.pt")
            torch.save(plan, folder / f"gpus-{world}_wp-0_tp-{t}_dp-{z}_pp-{p}_zo-{z}.pt")


def internlm2_rank_stages(sd, cfg, tp, pp):
    """Our full tensors -> {(t, p): InternEvo stage dict} (through the published HF layout)."""
    hf_sd = hf.to_hf_state_dict(sd, cfg, "internlm2")
    ranks = [v2_rank_tensors(hf_sd, cfg, t, tp, False) for t in range(tp)]
    return {(t, p): stage for t in range(tp)
            for p, stage in enumerate(to_stages(ranks[t], cfg, pp))}


def resume_cfg(tmp_path, total_steps, load_from="ie", save_to="ours"):
    """The resumed run's config file (InternEvo's keys)."""
    path = tmp_path / f"resume_{load_from}_{save_to}.py"
    path.write_text(f"""
model_type = "INTERNLM2_PUBLIC"
model = {dict(TINY, vocab_size=256, num_kv_attention_heads=2)!r}
data = dict(seq_len=16, micro_bsz=2, micro_num=2, total_steps={total_steps}, num_worker=0)
adam = dict(lr=1e-2)
enable_tb = False
lr_scheduler = dict(total_steps=10, warmup_ratio=0.2, eta_min=1e-3)
ckpt = dict(save_ckpt_folder={str(tmp_path / save_to)!r}, enable_save_ckpt=False,
            load_ckpt_info=dict(path={str(tmp_path / load_from)!r}, content=("all",),
                                ckpt_type="internevo"))
""")
    return load_config(path)


def trainer_of(cfg, run_dir):
    from internevo.launch import seed_everything

    seed_everything(1024)
    layout = ParallelLayout.from_config(cfg, 1, 0)
    return Trainer(cfg, layout, Comm(layout), torch.device("cpu"), run_dir)


def test_resumed_internevo_run_continues_with_its_state(tmp_path):
    """An InternEvo run with tp 2, pp 2, dp 2, zero1 2, bf16 weights with fp32 norms (both
    optimizer groups), 3 updates done, at batch 2 of its second epoch, continues here."""
    from internevo.data.loader import collate

    tp, pp, dp, mn, steps = 2, 2, 2, 2, 3
    probe = trainer_of(resume_cfg(tmp_path, 1), tmp_path / "probe")
    rows = len(probe.loader._source.packs)
    per_epoch = rows // (mn * dp)
    batch_count = per_epoch + 2  # two batches into epoch 1
    cfg = resume_cfg(tmp_path, batch_count + 1)
    folder = tmp_path / "ie" / str(steps)
    folder.mkdir(parents=True)

    weights, masters, avg, avg_sq = (random_state(cfg, seed=s) for s in range(4))
    avg_sq = {k: v.abs() for k, v in avg_sq.items()}
    stages = {k: {n: (v.float() if "norm" in n else v.to(torch.bfloat16)) for n, v in s.items()}
              for k, s in internlm2_rank_stages(weights, cfg, tp, pp).items()}
    for (t, p), stage in stages.items():
        torch.save(stage, folder / f"model_tp{t}_pp{p}.pt")
    values = [internlm2_rank_stages(v, cfg, tp, pp) for v in (masters, avg, avg_sq)]
    write_internevo_optimizer(folder, stages, values, zo=2, world=tp * pp * dp, step=steps,
                              scaler={"_scale": 4096.0, "_growth_step": 5, "_hysteresis_step": 1})
    context = dict(batch_count=batch_count - 1, step_count=steps, num_consumed_tokens=12345,
                   inf_nan_skip_batches=1, num_consumed_samples_in_epoch=0,
                   tensorboard_folder=None)
    torch.save(context, folder / "context.pt")
    torch.save({"base_lrs": [1e-2], "last_epoch": steps, "_step_count": steps + 1,
                "after_scheduler_type": "CosineAnnealingLR",
                "after_scheduler_dict": {"T_max": 8, "eta_min": 1e-3, "last_epoch": 0}},
               folder / "schedulder.pt")
    rng = np.random.RandomState(1024)
    rng.shuffle(np.arange(rows))  # epoch 0's permutation
    rng_state = rng.get_state()  # what InternEvo saves: the state before the epoch's shuffle
    perm = np.arange(rows)
    rng.shuffle(perm)  # epoch 1's
    consumed = 2 * mn  # per rank
    torch.save({"batch_size": mn, "raw_rampup_batch_size": "", "rng_state": rng_state, "epoch": 0,
                "seed": 1024, "data_world_size": dp, "num_consumed_samples_in_epoch": consumed,
                "batch_count": batch_count, "indices": perm[:per_epoch * mn * dp]},
               folder / "sampler.pt")
    torch.save("# the run's config text\n", folder / "config_file.pt")
    (folder / f"{steps}.step").write_text("{'step': 3}")

    # auto_resume finds the InternEvo checkpoint in save_ckpt_folder (before load_ckpt_info)
    t = trainer_of(resume_cfg(tmp_path, batch_count + 1, "elsewhere", "ie"), tmp_path / "run")
    assert t.ckpt.resume_request().path == folder
    t.ckpt.maybe_resume()
    st = t.state
    assert (st.batch_count, st.step_count, st.num_consumed_tokens, st.inf_nan_skip_batches) == \
        (batch_count, steps, 12345, 1)
    opt = t.optimizer.state_dict()
    assert opt["step"] == steps
    for name in weights:
        stored = weights[name] if "norm" in name else weights[name].to(torch.bfloat16)
        assert torch.equal(t.model.state_dict()[name], stored.float())
        for key, full in (("master", masters), ("exp_avg", avg), ("exp_avg_sq", avg_sq)):
            assert torch.equal(opt["params"][name][key], full[name]), (name, key)
    # spec §3.12: Wm = int(10 * 0.2) = 2, so update e = 3 is the 2nd of the cosine's 8
    expected_lr = 1e-3 + (1e-2 - 1e-3) * (1 + math.cos(math.pi * (steps - 2) / 8)) / 2
    assert t.schedules.updates_done == steps and t.schedules.lr() == pytest.approx(expected_lr)
    # the same through `internevo convert from-internevo`: our checkpoint loads the same state
    assert cli.main(["convert", "from-internevo", str(tmp_path / "ie"), str(tmp_path / "conv"),
                     "--config", cfg.source]) == 0
    assert (tmp_path / "conv" / str(steps) / f"{steps}.step").is_file()
    u = trainer_of(resume_cfg(tmp_path, batch_count + 1, "conv"), tmp_path / "run2")
    u.ckpt.maybe_resume()
    assert u.state.state_dict() == t.state.state_dict()
    assert u.schedules.state_dict() == t.schedules.state_dict()
    assert u.loader.state_dict() == t.loader.state_dict()
    for name, keys in u.optimizer.state_dict()["params"].items():
        assert all(torch.equal(v, opt["params"][name][k]) for k, v in keys.items())

    # the next batch: the rows after the 2 * consumed rows both InternEvo ranks read in epoch 1
    batch = next(iter(t.loader))
    packs = t.loader._source.packs
    want = collate([packs[i] for i in perm[dp * consumed: dp * consumed + mn]])
    assert torch.equal(batch["input_ids"], want["input_ids"])

    history = t.fit()
    assert len(history) == 1 and t.state.step_count == steps + 1
    assert history[0]["lr"] == pytest.approx(expected_lr)


def test_cli_to_internevo_then_from_internevo(tmp_path):
    cfg = tiny_cfg("INTERNLM", embed_split_hidden=False)
    sd = random_state(cfg, seed=5)
    ckpt_format.save_model_state(tmp_path / "ours", sd, cfg)
    args = ["convert", "to-internevo", str(tmp_path / "ours"), str(tmp_path / "ie"), "--tp", "2",
            "--pp", "2"]
    assert cli.main(args) == 0
    assert sorted(p.name for p in (tmp_path / "ie").iterdir()) == [
        "config_file.pt", "model_config.pt", "model_tp0_pp0.pt", "model_tp0_pp1.pt",
        "model_tp1_pp0.pt", "model_tp1_pp1.pt"]
    stage = torch.load(tmp_path / "ie" / "model_tp1_pp0.pt")
    assert stage["embedding.word_embeddings.weight"].shape == (TINY["vocab_size"] // 2, 32)
    assert torch.load(tmp_path / "ie" / "model_config.pt", weights_only=True)["hidden_size"] == 32
    # back, with the model taken from config_file.pt (no optimizer files: a model-only folder)
    back_args = ["convert", "from-internevo", str(tmp_path / "ie"), str(tmp_path / "back")]
    assert cli.main(back_args) == 0
    back, back_cfg = hf_folder.load_model_state_for_export(tmp_path / "back")
    assert back_cfg.model.hidden_size == 32 and back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert cli.main(args) == 2  # the target already holds model files: one error line


def _load_at_tp2(rank, world, cfg, run_dir):
    """Rank body: load the InternEvo checkpoint of ``cfg`` at tensor size 2; full tensors back."""
    from internevo.checkpoint.format import from_checkpoint_shape
    from internevo.models.registry import get_spec

    layout = ParallelLayout.from_config(cfg, world, rank)
    layout.build_groups()
    t = Trainer(cfg, layout, Comm(layout), torch.device("cpu"), run_dir)
    t.ckpt.maybe_resume()
    spec = get_spec(cfg.model_type)

    def full(name, x):
        x = x.full_tensor() if hasattr(x, "full_tensor") else x
        return from_checkpoint_shape(spec, name, x.detach()).clone()

    opt = t.optimizer.state_dict()
    return {"weights": {n: full(n, p) for n, p in t.model.named_parameters()},
            "optimizer": {n: {k: full(n, v) for k, v in d.items()}
                          for n, d in opt["params"].items()}, "step": opt["step"],
            "batch_count": t.state.batch_count}


def test_internlm_v1_checkpoint_loads_at_tensor_size_2(tmp_path):
    """InternEvo tp 2 / pp 2 / zero1 2 (v1, biases) -> our run at tp 2 (msp, DTensor shards)."""
    cfg = config_from_dict(dict(
        model_type="INTERNLM", model={**TINY, "vocab_size": 256},
        data=dict(seq_len=16, micro_bsz=1, micro_num=2, total_steps=1, num_worker=0),
        enable_tb=False, parallel=dict(tensor=dict(size=2, mode="msp")),
        ckpt=dict(enable_save_ckpt=False, load_ckpt_info=dict(
            path=str(tmp_path / "ie"), content=("model", "optimizer"), ckpt_type="internevo"))))
    fulls = [random_state(cfg, seed=s) for s in range(4)]
    fulls[3] = {k: v.abs() for k, v in fulls[3].items()}
    stages = []
    for full in fulls:
        hf_sd = hf.to_hf_state_dict(full, cfg, "llama")
        stages.append({(t, p): s for t in range(2) for p, s in
                       enumerate(to_stages(v1_rank_tensors(hf_sd, cfg, t, 2, False), cfg, 2))})
    folder = tmp_path / "ie"
    folder.mkdir()
    for key, stage in stages[0].items():
        torch.save(stage, folder / "model_tp{}_pp{}.pt".format(*key))
    write_internevo_optimizer(folder, stages[0], stages[1:], zo=2, world=8, step=5,
                              scaler={"_scale": 1.0, "_growth_step": 0, "_hysteresis_step": 0})
    torch.save(dict(batch_count=6, step_count=5, num_consumed_tokens=0, inf_nan_skip_batches=0),
               folder / "context.pt")
    results = spawn_ranks(_load_at_tp2, 2, cfg, str(tmp_path / "run"))
    for got in results:
        assert got["step"] == 5 and got["batch_count"] == 7
        for name, w in fulls[0].items():
            assert torch.equal(got["weights"][name], w), name
            for key, full in zip(("master", "exp_avg", "exp_avg_sq"), fulls[1:]):
                assert torch.equal(got["optimizer"][name][key], full[name]), (name, key)
