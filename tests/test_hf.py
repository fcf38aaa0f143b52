"""Hugging Face export / import: logits equal transformers', round trips are the identity, and a
broken folder is one clear error that leaves the target untouched."""

import json
from pathlib import Path

import pytest
import torch

from internevo import cli
from internevo.checkpoint import format as ckpt_format
from internevo.config import config_from_dict, load_config
from internevo.convert import hf, hf_config, hf_folder, safetensors_io
from internevo.convert.hf_config import HFConversionError
from internevo.models.build import build_model
from internevo.models.loss import lm_loss
from internevo.models.registry import get_spec

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
TOK2 = ROOT / "assets" / "tokenizer_internlm2.model"

V2_GQA = ("INTERNLM2_PUBLIC", dict(num_kv_attention_heads=2, adapt_hf=True))
V2_GQA_INTERLEAVED = ("INTERNLM2_PUBLIC", dict(num_kv_attention_heads=2, adapt_hf=False))
V2_MQA_NTK = ("INTERNLM2_PUBLIC", dict(num_kv_attention_heads=1, use_dynamic_ntk_rope=True,
                                       max_position_embeddings=8, rope_base=1e6))
V1 = ("INTERNLM", {})
LLAMA = ("LLAMA2", dict(num_kv_attention_heads=2))  # adapt_hf left out: LLAMA2's default, False
VARIANTS = {"v2-gqa": V2_GQA, "v2-gqa-interleaved": V2_GQA_INTERLEAVED, "v2-mqa-ntk": V2_MQA_NTK,
            "v1": V1, "llama": LLAMA}


def tiny_cfg(model_type, **model):
    """hidden 64, 4 heads, 2 layers, vocab 128, fp32."""
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, mlp_ratio=1.5,
                multiple_of=32, dtype="torch.float32", layer_norm_epsilon=1e-6,
                use_flash_attn=False, max_position_embeddings=64)
    return config_from_dict({"model_type": model_type, "model": {**base, **model}})


def cfg_of(variant, **more):
    """``tiny_cfg`` of one of the variants above."""
    model_type, extra = variant
    return tiny_cfg(model_type, **{**extra, **more})


def random_model(cfg, seed=0):
    """Our model with weights large enough that every mistake shows in the logits."""
    model = build_model(cfg, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


IDS = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------- export


@pytest.mark.parametrize("variant", VARIANTS)
def test_llama_export_logits_equal_transformers(tmp_path, variant):
    model_type, extra = VARIANTS[variant]
    cfg = tiny_cfg(model_type, **extra)
    model = random_model(cfg)
    hf_folder.export_hf(model.state_dict(), cfg, tmp_path / "out", None, "llama", torch.float32)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ours = logits(model, IDS)
    diff = (ours - logits(theirs.eval(), IDS)).abs().max().item()
    assert diff <= 1e-4, diff
    assert ours.abs().max() > 0.5  # not a vacuous comparison
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["attention_bias"] is (model_type == "INTERNLM")
    assert config["num_key_value_heads"] == cfg.num_kv_heads
    if model_type == "INTERNLM":
        assert theirs.model.layers[0].self_attn.o_proj.bias is not None
    if variant == "v2-mqa-ntk":  # 24 positions > max_position_embeddings: the scaled base is used
        assert theirs.config.rope_parameters["rope_type"] == "dynamic"
        assert theirs.config.rope_parameters["rope_theta"] == 1e6


def test_interleaved_order_matters():
    """Control for the test above: ignoring adapt_hf=False changes the logits."""
    cfg = cfg_of(V2_GQA_INTERLEAVED)
    model = random_model(cfg)
    wrong = build_model(cfg_of(V2_GQA)).eval()
    wrong.load_state_dict(model.state_dict())
    assert (logits(model, IDS) - logits(wrong, IDS)).abs().max() > 1e-2


def _published_internlm2_to_llama(sd, config):
    """Independent reading of the published layout: wqkv is '(h gs d)' with gs = groups + 2."""
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d, gs = config["hidden_size"] // heads, heads // kv + 2
    out = {"model.embed_tokens.weight": sd["model.tok_embeddings.weight"],
           "model.norm.weight": sd["model.norm.weight"], "lm_head.weight": sd["output.weight"]}
    names = {"attention.wo": "self_attn.o_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm", "feed_forward.w1": "mlp.gate_proj",
             "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj"}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for a, b in names.items():
            out[p + b + ".weight"] = sd[p + a + ".weight"]
        w = sd[p + "attention.wqkv.weight"].view(kv, gs, d, -1)
        out[p + "self_attn.q_proj.weight"] = w[:, :-2].reshape(heads * d, -1)
        out[p + "self_attn.k_proj.weight"] = w[:, -2].reshape(kv * d, -1)
        out[p + "self_attn.v_proj.weight"] = w[:, -1].reshape(kv * d, -1)
    return out


def test_internlm2_export_is_the_published_layout(tmp_path):
    cfg = cfg_of(V2_GQA_INTERLEAVED)
    model = random_model(cfg)
    hf_folder.export_hf(model.state_dict(), cfg, tmp_path / "out", None, "internlm2", torch.float32)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["InternLM2ForCausalLM"]
    assert config["model_type"] == "internlm2"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_internlm2.InternLM2ForCausalLM"
    assert config["bias"] is False and config["rope_scaling"] is None
    sd = safetensors_io.read_safetensors(tmp_path / "out")
    assert "model.layers.1.attention.wqkv.weight" in sd and "output.weight" in sd
    llama_config = transformers.LlamaConfig(**{k: v for k, v in config.items() if k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "rms_norm_eps",
        "num_attention_heads", "num_key_value_heads", "rope_theta", "max_position_embeddings")})
    theirs = transformers.LlamaForCausalLM(llama_config).eval()
    theirs.load_state_dict(_published_internlm2_to_llama(sd, config))
    diff = (logits(model, IDS) - logits(theirs, IDS)).abs().max().item()
    assert diff <= 1e-4, diff


# ------------------------------------------------------------------------------- import


@pytest.mark.parametrize("bias,model_type", [(False, None), (True, None), (False, "LLAMA2")],
                         ids=["gqa", "attention-bias", "as-llama2"])
def test_import_transformers_llama_loss_equal(tmp_path, bias, model_type):
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4 if bias else 2, attention_bias=bias,
        rms_norm_eps=1e-6, rope_theta=5e5, max_position_embeddings=64, initializer_range=0.1)
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # biases start at 0: make them count
        for name, p in theirs.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "hf")
    sd, overrides = hf_folder.load_hf(tmp_path / "hf", model_type)
    overrides["model"].update(dtype="torch.float32", use_flash_attn=False)
    cfg = config_from_dict(overrides)
    assert cfg.model_type == (model_type or ("INTERNLM" if bias else "INTERNLM2_PUBLIC"))
    assert cfg.model.rope_base == 5e5 and cfg.num_kv_heads == config.num_key_value_heads
    ours = build_model(cfg).eval()
    ours.load_state_dict(sd, strict=True)
    with torch.no_grad():
        expected = theirs(IDS, labels=IDS).loss
        got = lm_loss(ours(IDS)[:, :-1], IDS[:, 1:])
    assert abs(got.item() - expected.item()) <= 1e-5, (got, expected)


@pytest.mark.parametrize("fmt", hf_config.FORMATS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_round_trip_is_identity(fmt, variant):
    model_type, extra = VARIANTS[variant]
    spec = get_spec(model_type)
    if fmt not in spec.hf.formats:
        with pytest.raises(HFConversionError, match="internlm2"):
            hf.to_hf_state_dict({}, tiny_cfg(model_type, **extra), fmt)
        return
    cfg = tiny_cfg(model_type, **extra)
    sd = random_model(cfg).state_dict()
    config = hf_config.hf_config_dict(cfg, fmt, dtype=torch.float32)
    back, overrides = hf.from_hf_state_dict(hf.to_hf_state_dict(sd, cfg, fmt), config, fmt,
                                            model_type=model_type)
    assert overrides["model_type"] == model_type
    if not cfg.model.adapt_hf:
        back = spec.hf.from_hf_order(back, cfg)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    for key in ("num_layers", "hidden_size", "vocab_size", "rope_base", "use_dynamic_ntk_rope"):
        assert overrides["model"][key] == getattr(cfg.model, key)


def test_rope_settings_of_published_configs(caplog):
    base = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, vocab_size=128,
                intermediate_size=96, max_position_embeddings=32768)
    internlm2 = {**base, "rope_theta": 1e6, "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    model = hf_config.model_overrides_from_hf(internlm2, "internlm2")["model"]
    assert (model["rope_base"], model["use_dynamic_ntk_rope"]) == (1e6, True)
    assert "factor 2.0 is read as 1.0" in caplog.text  # same model up to 32768 positions
    internlm_v1 = {**base, "bias": True, "rotary": {"base": 10000, "type": "origin"}}
    overrides = hf_config.model_overrides_from_hf(internlm_v1, "llama")
    assert overrides["model_type"] == "INTERNLM" and not overrides["model"]["use_dynamic_ntk_rope"]
    linear = {**base, "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}}
    with pytest.raises(HFConversionError, match="'linear' is not supported"):
        hf_config.model_overrides_from_hf(linear, "llama")


# ------------------------------------------------------------------------------- command line


def write_checkpoint(tmp_path, body):
    """An internevo checkpoint of a fresh model whose config file is ``body``."""
    (tmp_path / "run.py").write_text(body)
    cfg = load_config(tmp_path / "run.py")
    sd = random_model(cfg).state_dict()
    ckpt_format.save_model_state(tmp_path / "ckpt", sd, cfg)
    return sd


def test_cli_round_trip_with_tokenizer(tmp_path):
    sd = write_checkpoint(tmp_path, (
        "model_type = 'INTERNLM2_PUBLIC'\n"
        "model = dict(num_layers=1, hidden_size=16, num_attention_heads=2, "
        "num_kv_attention_heads=1, vocab_size=92544, adapt_hf=False, dtype='torch.float32')\n"))
    out, back = tmp_path / "hf", tmp_path / "back"
    assert cli.convert_main(["to-hf", "--src", str(tmp_path / "ckpt"), "--tgt", str(out),
                            "--tokenizer", str(TOK2), "--max_shard", "2MB",
                            "--dtype", "float32"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["torch_dtype"]) == \
        (1, 2, "float32")
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.model").is_file()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(TOK2))
    text = "Hello world, 你好\n  two spaces"
    assert tokenizer(text)["input_ids"] == [1] + sp.encode(text)
    assert cli.convert_main(["from-hf", "--src", str(out), "--tgt", str(back), "--adapt_hf",
                            "false"]) == 0
    loaded, cfg = hf_folder.load_model_state_for_export(back)
    assert cfg.model_type == "INTERNLM2_PUBLIC" and cfg.model.adapt_hf is False
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    defaults = cli.build_convert_parser().parse_args(["to-hf", "--src", "a", "--tgt", "b",
                                                      "--tokenizer", "c"])
    assert (defaults.dtype, defaults.format, defaults.max_shard) == (torch.bfloat16, "llama",
                                                                     10**10)


# ------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def good_export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good") / "hf"
    cfg = cfg_of(V2_GQA)
    hf_folder.export_hf(random_model(cfg).state_dict(), cfg, folder, None, "llama", torch.float32,
                 max_shard_bytes=60_000)
    return folder


def broken_copy(good, tmp_path):
    import shutil

    shutil.copytree(good, tmp_path / "broken")
    return tmp_path / "broken"


def test_missing_tensor_is_named(good_export, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = broken_copy(good_export, tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = "model.layers.1.self_attn.k_proj.weight"
    shard = folder / index["weight_map"][key]
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard)
    with pytest.raises(HFConversionError, match=f"{shard.name}.*{key}"):
        hf_folder.load_hf(folder)
    del index["weight_map"][key]  # consistent index: the model itself lacks the tensor
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(HFConversionError, match=f"tensor '{key}' is missing"):
        hf_folder.load_hf(folder)


def test_missing_shard_and_pickle_only(good_export, tmp_path):
    folder = broken_copy(good_export, tmp_path)
    shard = sorted(folder.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(HFConversionError, match=f"{shard.name}: missing"):
        hf_folder.load_hf(folder)
    for f in folder.glob("model*"):
        f.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(HFConversionError, match="pickle"):
        hf_folder.load_hf(folder)


def test_mismatched_config_is_named_and_target_untouched(good_export, tmp_path):
    folder = broken_copy(good_export, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 4}))
    with pytest.raises(HFConversionError, match="k_proj.weight' has shape"):
        hf_folder.load_hf(folder)
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "keep.txt").write_text("good")
    for extra in ([], ["--overwrite"]):
        args = ["from-hf", "--src", str(folder), "--tgt", str(target), *extra]
        assert cli.convert_main(args) == 2
        assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert cli.convert_main(["from-hf", "--src", str(good_export), "--tgt", str(target)]) == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_training_load_checks_the_run_config(good_export):
    cfg = cfg_of(V2_GQA_INTERLEAVED)
    sd = hf_folder.load_hf_for_training(good_export, cfg)
    model = build_model(cfg).eval()
    model.load_state_dict(sd)
    reference = build_model(cfg_of(V2_GQA)).eval()
    reference.load_state_dict(hf_folder.load_hf(good_export)[0])
    assert (logits(model, IDS) - logits(reference, IDS)).abs().max() <= 1e-5
    with pytest.raises(HFConversionError, match="vocab_size=128 but the run's model.vocab_size"):
        hf_folder.load_hf_for_training(good_export, cfg_of(V2_GQA, vocab_size=256))
