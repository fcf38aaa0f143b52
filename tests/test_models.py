"""Model code against independent references written here with plain torch ops."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from internevo.config import ModelConfig, TrainConfig
from internevo.models import (
    RotaryEmbedding,
    Segments,
    apply_activation_checkpointing,
    build_model,
    count_parameters,
    ffn_hidden,
    init_parameter,
    model_dtype,
    packed_causal_attention,
)
from internevo.models.init import init_weights

V1, V2, V3 = "INTERNLM", "INTERNLM2_PUBLIC", "LLAMA2"
ALL = [V1, V2, V3]


def tiny_cfg(model_type: str, **model_kw) -> TrainConfig:
    """A 2-layer model: hidden 32, 4 heads of 8 (2 KV heads for InternLM2 and LLaMA), vocab 50."""
    kw = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=50, mlp_ratio=2.5,
              multiple_of=16, dtype="torch.float32", rope_base=100.0)
    if model_type in (V2, V3):
        kw["num_kv_attention_heads"] = 2
    kw.update(model_kw)
    return TrainConfig(model_type=model_type, model=ModelConfig(**kw))


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Large random weights (non-trivial biases and norm weights) so that mistakes show."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1 + 0.3 * noise if "norm" in name else 0.3 * noise)


# --------------------------------------------------------------------------------------------
# independent references


def naive_attention(q, k, v, bounds):
    """[S, Hq, d] attention with an explicit block-diagonal causal mask and softmax."""
    s, hq, d = q.shape
    seg = torch.zeros(s, dtype=torch.long)
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        seg[a:b] = i
    pos = torch.arange(s)
    allowed = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    group = hq // k.shape[1]
    out = []
    for h in range(hq):
        scores = q[:, h] @ k[:, h // group].T / math.sqrt(d)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out.append(probs @ v[:, h // group])
    return torch.stack(out, dim=1)


def rope_complex(x, pos, base, interleaved):
    """RoPE by complex multiplication on x [L, H, d].

    Half-split pairs features (i, i+d/2); interleaved pairs (2i, 2i+1) in the stored layout.
    """
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    rot = torch.polar(torch.ones(len(pos), d // 2, dtype=torch.float64),
                      pos.double()[:, None] * theta[None])[:, None]
    xd = x.double()
    if interleaved:
        z = torch.view_as_complex(xd.reshape(*x.shape[:-1], d // 2, 2).contiguous()) * rot
        return torch.view_as_real(z).reshape(x.shape).to(x.dtype)
    z = torch.complex(xd[..., : d // 2], xd[..., d // 2:]) * rot
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def rms(x, w, eps=1e-5):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def ref_qkv(sd, p, a, cfg, model_type):
    """Per-head q [L, Hq, d], k and v [L, Hkv, d], read from the fused weight row by row."""
    m = cfg.model
    d = m.hidden_size // m.num_attention_heads
    if model_type == V3:
        return tuple((a @ sd[f"{p}attention.w{n}.weight"].T).reshape(len(a), -1, d) for n in "qkv")
    if model_type == V1:
        w, b = sd[p + "mixer.Wqkv.weight"], sd[p + "mixer.Wqkv.bias"]
        qkv = a @ w.T + b
        hd = m.hidden_size
        return (qkv[:, :hd].reshape(-1, m.num_attention_heads, d),
                qkv[:, hd:2 * hd].reshape(-1, m.num_attention_heads, d),
                qkv[:, 2 * hd:].reshape(-1, m.num_attention_heads, d))
    w = sd[p + "attention.wqkv.weight"]
    qpk = m.num_attention_heads // m.num_kv_attention_heads
    rows = lambda r: a @ w[r * d:(r + 1) * d].T  # noqa: E731 - row block r of wqkv
    q = [rows(j // qpk * (qpk + 2) + j % qpk) for j in range(m.num_attention_heads)]
    k = [rows(g * (qpk + 2) + qpk) for g in range(m.num_kv_attention_heads)]
    v = [rows(g * (qpk + 2) + qpk + 1) for g in range(m.num_kv_attention_heads)]
    return torch.stack(q, 1), torch.stack(k, 1), torch.stack(v, 1)


NAMES = {
    V1: dict(emb="embedding.weight", blk="blocks.", n1="norm1.weight", n2="norm2.weight",
             out="mixer.out_proj", mlp="mlp.", head="head.weight"),
    V2: dict(emb="tok_embeddings.weight", blk="layers.", n1="attention_norm.weight",
             n2="ffn_norm.weight", out="attention.wo", mlp="feed_forward.", head="output.weight"),
}
NAMES[V3] = NAMES[V2]


def ref_logits(sd, cfg, ids, pos, interleaved=False):
    """Logits of one causal sequence ``ids [L]`` at RoPE positions ``pos``, from the state_dict."""
    mt, m, n = cfg.model_type, cfg.model, NAMES[cfg.model_type]
    x = sd[n["emb"]][ids]
    for i in range(m.num_layers):
        p = f"{n['blk']}{i}."
        q, k, v = ref_qkv(sd, p, rms(x, sd[p + n["n1"]]), cfg, mt)
        q = rope_complex(q, pos, m.rope_base, interleaved)
        k = rope_complex(k, pos, m.rope_base, interleaved)
        att = naive_attention(q, k, v, [0, len(ids)]).reshape(len(ids), -1)
        att = att @ sd[p + n["out"] + ".weight"].T
        if mt == V1:
            att = att + sd[p + n["out"] + ".bias"]
        x = x + att
        h = rms(x, sd[p + n["n2"]])
        w = {j: sd[f"{p}{n['mlp']}w{j}.weight"] for j in (1, 2, 3)}
        x = x + (F.silu(h @ w[1].T) * (h @ w[3].T)) @ w[2].T
    return rms(x, sd["norm.weight"]) @ sd[n["head"]].T


def make_model(cfg, seed=0):
    model = build_model(cfg)
    randomize(model, seed)
    return model


# --------------------------------------------------------------------------------------------
# attention


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
def test_packed_attention_matches_naive_mask(hq, hkv):
    torch.manual_seed(0)
    bounds = [0, 3, 3, 8, 13]  # includes an empty segment
    q = torch.randn(13, hq, 8, requires_grad=True)
    k = torch.randn(13, hkv, 8, requires_grad=True)
    v = torch.randn(13, hkv, 8, requires_grad=True)
    ref = naive_attention(q, k, v, bounds)
    for cu in (bounds, torch.tensor(bounds, dtype=torch.int32), Segments.build(bounds, q.device)):
        out = packed_causal_attention(q, k, v, cu)
        assert out.shape == q.shape
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(ref)
    grads = torch.autograd.grad((packed_causal_attention(q, k, v, bounds) * weights).sum(),
                                (q, k, v))
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5)


def test_batched_attention_is_causal_per_row():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 7, 4, 8), torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)
    out = packed_causal_attention(q, k, v, None)
    for b in range(2):
        torch.testing.assert_close(out[b], naive_attention(q[b], k[b], v[b], [0, 7]),
                                   atol=1e-5, rtol=1e-5)


def test_attention_rejects_wrong_cu_seqlens():
    q = torch.randn(6, 2, 4)
    with pytest.raises(ValueError, match="6 tokens"):
        packed_causal_attention(q, q, q, [0, 3, 5])
    with pytest.raises(ValueError, match="non-decreasing"):
        Segments.build([0, 4, 2, 6], q.device)


# --------------------------------------------------------------------------------------------
# models against the reference


@pytest.mark.parametrize("model_type", ALL)
def test_packed_logits_match_reference(model_type):
    cfg = tiny_cfg(model_type)
    model = make_model(cfg)
    sd = model.state_dict()
    torch.manual_seed(2)
    ids = torch.randint(0, 50, (1, 13))
    # uneven position steps: a wrong use of indexes changes relative distances and shows up
    pos = torch.tensor([0, 1, 2, 3, 4, 0, 2, 3, 7, 8, 9, 10, 11])
    cu = torch.tensor([0, 5, 13], dtype=torch.int32)
    with torch.no_grad():
        out = model(ids, cu_seqlens=cu, indexes=pos[None])
        ref = torch.cat([ref_logits(sd, cfg, ids[0, a:b], pos[a:b]) for a, b in ((0, 5), (5, 13))])
        torch.testing.assert_close(out[0], ref, atol=1e-4, rtol=1e-4)
        # two segments == each segment alone (default positions = inside-segment positions)
        alone = torch.cat([model(ids[:, :5])[0], model(ids[:, 5:])[0]])
        torch.testing.assert_close(model(ids, cu_seqlens=[0, 5, 13])[0], alone,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ALL)
def test_batched_logits_match_reference(model_type):
    cfg = tiny_cfg(model_type)
    model = make_model(cfg, seed=1)
    sd = model.state_dict()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(ids)
        assert out.shape == (2, 6, 50)
        for b in range(2):
            ref = ref_logits(sd, cfg, ids[b], torch.arange(6))
            torch.testing.assert_close(out[b], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", [V2, V3])
def test_adapt_hf_false_is_interleaved_rope(model_type):
    cfg = tiny_cfg(model_type, adapt_hf=False)
    model = make_model(cfg, seed=2)
    sd = model.state_dict()
    ids = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(4))
    pos = torch.arange(9)
    with torch.no_grad():
        out = model(ids)[0]
        torch.testing.assert_close(out, ref_logits(sd, cfg, ids[0], pos, interleaved=True),
                                   atol=1e-4, rtol=1e-4)
        half_split = ref_logits(sd, cfg, ids[0], pos, interleaved=False)
        assert (out - half_split).abs().max() > 1e-2


def test_dynamic_ntk_rope():
    plain = RotaryEmbedding(8, base=100.0, max_position_embeddings=16)
    ntk = RotaryEmbedding(8, base=100.0, max_position_embeddings=16, dynamic_ntk=True)
    args = (torch.float32, torch.device("cpu"))
    for a, b in zip(plain(None, 16, *args), ntk(None, 16, *args)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    cos, sin = ntk(None, 40, *args)
    scaled_base = 100.0 * (40 / 16) ** (8 / 6)  # HF dynamic NTK, factor 1
    angle = torch.arange(40.0)[:, None] * scaled_base ** (-torch.arange(0, 8, 2) / 8)[None]
    torch.testing.assert_close(cos, angle.cos(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sin, angle.sin(), atol=1e-5, rtol=1e-5)
    assert (cos - plain(None, 40, *args)[0]).abs().max() > 1e-2
    # model level: identical below max_position_embeddings, different above
    cfg = tiny_cfg(V2, max_position_embeddings=8)
    base_model = make_model(cfg)
    ntk_model = make_model(tiny_cfg(V2, max_position_embeddings=8, use_dynamic_ntk_rope=True))
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(base_model(ids[:, :8]), ntk_model(ids[:, :8]))
        assert (base_model(ids) - ntk_model(ids)).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# shapes and names


def test_ffn_width_of_7b_models():
    assert ffn_hidden(4096, 8 / 3, 256) == 11008
    assert ffn_hidden(4096, 3.5, 256) == 14336
    assert ffn_hidden(6144, 8 / 3, 256) == 16384


def expected_names(model_type, layers):
    if model_type == V1:
        per = ["mixer.Wqkv.weight", "mixer.Wqkv.bias", "mixer.out_proj.weight",
               "mixer.out_proj.bias", "norm1.weight", "norm2.weight", "mlp.w1.weight",
               "mlp.w2.weight", "mlp.w3.weight"]
        return ({"embedding.weight", "norm.weight", "head.weight"}
                | {f"blocks.{i}.{n}" for i in range(layers) for n in per})
    attention = ["attention.wqkv.weight"] if model_type == V2 else [
        f"attention.w{n}.weight" for n in "qkv"]
    per = [*attention, "attention.wo.weight", "attention_norm.weight",
           "ffn_norm.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
           "feed_forward.w3.weight"]
    return ({"tok_embeddings.weight", "norm.weight", "output.weight"}
            | {f"layers.{i}.{n}" for i in range(layers) for n in per})


@pytest.mark.parametrize("model_type", ALL)
def test_parameter_names(model_type):
    model = build_model(tiny_cfg(model_type, num_layers=3))
    assert set(model.state_dict()) == expected_names(model_type, 3)
    assert set(dict(model.named_parameters())) == expected_names(model_type, 3)


def test_7b_shapes_on_meta():
    h, L = 4096, 32
    v1 = build_model(tiny_cfg(V1, num_layers=L, hidden_size=h, num_attention_heads=32,
                              vocab_size=103168, mlp_ratio=8 / 3, multiple_of=256), device="meta")
    assert v1.blocks[0].mlp.w1.weight.shape == (11008, h)
    per_layer = 3 * h * h + 3 * h + h * h + h + 2 * h + 3 * h * 11008
    assert count_parameters(v1) == 2 * 103168 * h + L * per_layer + h
    v2 = build_model(tiny_cfg(V2, num_layers=L, hidden_size=h, num_attention_heads=32,
                              num_kv_attention_heads=8, vocab_size=92544, mlp_ratio=3.5,
                              multiple_of=256), device="meta")
    assert v2.layers[0].attention.wqkv.weight.shape == ((32 + 2 * 8) * 128, h)
    per_layer = 6144 * h + h * h + 2 * h + 3 * h * 14336
    assert count_parameters(v2) == 2 * 92544 * h + L * per_layer + h


# --------------------------------------------------------------------------------------------
# initialisation


@pytest.mark.parametrize("model_type", ALL)
def test_init_depends_only_on_seed_and_name(model_type):
    rng = torch.get_rng_state()
    torch.manual_seed(123)
    a = build_model(tiny_cfg(model_type, num_layers=2), seed=7).state_dict()
    torch.manual_seed(456)  # global RNG must not matter
    b = build_model(tiny_cfg(model_type, num_layers=3), seed=7).state_dict()
    for name, value in a.items():  # a deeper model shares the first layers' values
        assert torch.equal(value, b[name]), name
    c = build_model(tiny_cfg(model_type, num_layers=2), seed=8).state_dict()
    emb = NAMES[model_type]["emb"]
    assert not torch.equal(a[emb], c[emb])
    up = NAMES[model_type]["blk"] + "0." + NAMES[model_type]["mlp"]
    assert not torch.equal(a[up + "w1.weight"], a[up + "w3.weight"])
    # wrapper prefixes do not change the value
    cfg = tiny_cfg(model_type)
    wrapped = "_orig_mod." + up.replace(".0.", ".0._checkpoint_wrapped_module.") + "w1.weight"
    torch.testing.assert_close(init_parameter(cfg, wrapped, (80, 32), 7), a[up + "w1.weight"])
    torch.set_rng_state(rng)


def test_init_internlm_stds():
    cfg = tiny_cfg(V1)
    std = lambda name: init_parameter(cfg, name, (512, 512), 1).std().item()  # noqa: E731
    assert std("embedding.weight") == pytest.approx(0.0052, rel=0.02)
    assert std("head.weight") == pytest.approx(0.0052, rel=0.02)
    assert std("blocks.0.mixer.Wqkv.weight") == pytest.approx(0.006, rel=0.02)
    assert std("blocks.5.mlp.w3.weight") == pytest.approx(0.006, rel=0.02)
    assert std("blocks.3.mixer.out_proj.weight") == pytest.approx(0.006 / math.sqrt(8), rel=0.02)
    assert std("blocks.0.mlp.w2.weight") == pytest.approx(0.006 / math.sqrt(2), rel=0.02)
    unscaled = tiny_cfg(V1, use_scaled_init=False)
    assert init_parameter(unscaled, "blocks.3.mlp.w2.weight", (512, 512), 1).std().item() == \
        pytest.approx(0.006, rel=0.02)
    assert torch.equal(init_parameter(cfg, "blocks.1.mixer.Wqkv.bias", (9,), 1), torch.zeros(9))
    assert torch.equal(init_parameter(cfg, "blocks.1.norm2.weight", (9,), 1), torch.ones(9))
    with pytest.raises(KeyError, match="no initialisation rule"):
        init_parameter(cfg, "blocks.0.mixer.mystery.weight", (2, 2), 1)


def test_init_internlm2_normal_and_uniform():
    cfg = tiny_cfg(V2, attn_other_init_std=0.04, ffn_uplayer_init_std=0.03)
    x = init_parameter(cfg, "layers.1.attention.wo.weight", (512, 512), 3)
    assert x.std().item() == pytest.approx(0.04 / 2, rel=0.02)
    x = init_parameter(cfg, "layers.1.feed_forward.w1.weight", (512, 512), 3)
    assert x.std().item() == pytest.approx(0.03, rel=0.02)
    uni = tiny_cfg(V2, init_type="uniform", out_head_init_std=0.01)
    x = init_parameter(uni, "output.weight", (512, 512), 3)
    a = math.sqrt(3 * 0.01)  # InternEvo's a = sqrt(3 * std)
    assert x.abs().max().item() <= a and x.abs().max().item() > 0.99 * a
    assert x.std().item() == pytest.approx(a / math.sqrt(3), rel=0.02)


def test_init_llama_stds():
    cfg = tiny_cfg(V3, attn_wqkv_init_std=0.05, attn_other_init_std=0.04)
    std = lambda name: init_parameter(cfg, name, (512, 512), 2).std().item()  # noqa: E731
    for proj in ("wq", "wk", "wv"):
        assert std(f"layers.0.attention.{proj}.weight") == pytest.approx(0.05, rel=0.02)
    assert std("layers.3.attention.wo.weight") == pytest.approx(0.04 / math.sqrt(8), rel=0.02)
    assert std("tok_embeddings.weight") == pytest.approx(0.02, rel=0.02)


def test_init_copies_fp32_values_into_bf16():
    fp32 = build_model(tiny_cfg(V2), seed=3)
    bf16 = build_model(tiny_cfg(V2, dtype="torch.bfloat16"), seed=3)
    for name, value in fp32.state_dict().items():
        assert torch.equal(bf16.state_dict()[name], value.to(torch.bfloat16)), name


def test_init_dtensor_shard_is_slice_of_full():
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist = torch.distributed
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    try:
        mesh = dist.device_mesh.init_device_mesh("cpu", (2,))
        cfg = tiny_cfg(V1)
        model = torch.nn.Module()
        model.embedding = torch.nn.Embedding(50, 32)
        model.embedding.weight = torch.nn.Parameter(
            distribute_tensor(torch.zeros(50, 32), mesh, [Shard(0)], src_data_rank=None))
        init_weights(model, cfg, seed=5)
        full = init_parameter(cfg, "embedding.weight", (50, 32), 5)
        assert torch.equal(model.embedding.weight.to_local(), full[25:])
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# activation checkpointing, dtypes


@pytest.mark.parametrize("model_type", ALL)
def test_activation_checkpointing_same_loss_and_grads(model_type):
    cfg = tiny_cfg(model_type, drop_rate=0.1, attn_drop_rate=0.1, num_layers=3)
    plain = make_model(cfg)
    ckpt = copy.deepcopy(plain)
    assert apply_activation_checkpointing(ckpt, 0.5) == 1
    assert apply_activation_checkpointing(ckpt, True) == 3
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    calls = []
    for block in ckpt.transformer_blocks():
        block.register_forward_hook(lambda *_: calls.append(1))
        inner = block.mixer if model_type == V1 else block.attention
        inner.register_forward_hook(lambda *_: calls.append(2))
    ids = torch.randint(0, 50, (1, 10), generator=torch.Generator().manual_seed(6))
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(11)
        logits = model(ids, cu_seqlens=[0, 4, 10])
        loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert calls.count(1) == 3 and calls.count(2) == 6  # each attention recomputed once
    torch.testing.assert_close(results[0][0], results[1][0], atol=0, rtol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-6, rtol=1e-5)


def test_bf16_forward_and_fp32_norms():
    cfg = tiny_cfg(V2, dtype="torch.bfloat16")
    model = build_model(cfg, seed=1)
    ids = torch.randint(0, 50, (1, 10), generator=torch.Generator().manual_seed(7))
    logits = model(ids, cu_seqlens=[0, 6, 10])
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    ref = build_model(tiny_cfg(V2), seed=1)(ids, cu_seqlens=[0, 6, 10])
    torch.testing.assert_close(logits.float(), ref, atol=2e-2, rtol=5e-2)
    cfg.use_fp32_norm = True
    model = build_model(cfg, seed=1)
    assert model.norm.weight.dtype == torch.float32
    assert model.layers[0].attention.wqkv.weight.dtype == torch.bfloat16
    out = model(ids, cu_seqlens=[0, 6, 10])
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model.norm.weight.grad.dtype == torch.float32


def test_pipeline_stages_without_embedding_or_head():
    model = make_model(tiny_cfg(V2))
    ids = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(8))
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    first.norm, first.output = None, None
    last.tok_embeddings, last.layers = None, torch.nn.ModuleList()
    with torch.no_grad():
        hidden = first(ids, cu_seqlens=[0, 3, 8])
        assert hidden.shape == (1, 8, 32)
        torch.testing.assert_close(last(hidden, cu_seqlens=[0, 3, 8]),
                                   model(ids, cu_seqlens=[0, 3, 8]))


def test_model_dtype_and_errors():
    assert model_dtype(tiny_cfg(V1, dtype="torch.tf32")) == torch.float32
    assert model_dtype(tiny_cfg(V1, dtype="torch.bfloat16")) == torch.bfloat16
    model = build_model(tiny_cfg(V1))
    with pytest.raises(ValueError, match="batch size 1"):
        model(torch.zeros(2, 4, dtype=torch.long), cu_seqlens=[0, 4])
    with pytest.raises(ValueError, match="4 tokens"):
        model(torch.zeros(1, 4, dtype=torch.long), cu_seqlens=[0, 3])
