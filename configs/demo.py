# The bundled demo: a small InternLM2 (GQA, real InternLM2 tokenizer) trained on CPU on
# tiny-shakespeare.  `make demo` tokenizes the corpus into demo_data/ and runs this config.
JOB_NAME = "demo"
model_type = "INTERNLM2_PUBLIC"

SEQ_LEN = 256
HIDDEN_SIZE = 256
VOCAB_SIZE = 92544

data = dict(
    seq_len=SEQ_LEN,
    micro_bsz=2,  # two 256-token windows per packed row
    micro_num=2,  # two rows per optimizer step
    total_steps=60,
    valid_every=30,
    valid_micro_num=2,
    train_folder="demo_data/train",
    valid_folder="demo_data/valid",
    num_worker=0,
    min_length=4,
)

model = dict(
    num_layers=4,
    hidden_size=HIDDEN_SIZE,
    num_attention_heads=8,
    num_kv_attention_heads=4,
    mlp_ratio=3.5,
    multiple_of=128,
    vocab_size=VOCAB_SIZE,
    # fp32: CPUs without AVX-512-BF16 (AVX2 only) run bf16 matmuls ~100x slower than fp32.
    dtype="torch.float32",
    rope_base=1000000,
    no_bias=True,
    checkpoint=False,
    parallel_output=True,
)

adam = dict(lr=2e-3, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.01)
lr_scheduler = dict(warmup_ratio=0.05, eta_min=1e-4)
hybrid_zero_optimizer = dict(clip_grad_norm=1.0)
loss = dict(label_smoothing=0)

ckpt = dict(
    enable_save_ckpt=True,
    save_ckpt_folder="runs/demo/checkpoints",
    checkpoint_every=30,
    auto_resume=False,
)
parallel = dict(zero1=dict(size=-1), tensor=dict(size=1, mode="mtp"), pipeline=1)
