# Long-sequence example: a small InternLM2 (GQA) trained on 16k-token packed rows with Intern
# sequence parallel (the row is cut into sp=4 sequence shards) and weight parallel (every linear,
# the embedding and the head stored in wp=2 row blocks).  4 processes on CPU (gloo) or GPUs:
#   torchrun --nproc_per_node 4 train.py --config configs/isp_long_seq.py --launcher torch
# World 4: sp=4 -> dp=1; wp=2 -> wdp=2 (ZeRO shards the optimizer states over 2 ranks).
JOB_NAME = "isp_long_seq"
model_type = "INTERNLM2_PUBLIC"

SEQ_LEN = 16384

data = dict(
    seq_len=SEQ_LEN,
    micro_bsz=1,
    micro_num=1,
    total_steps=20,
    train_folder=None,  # dummy data; point at a tokenized folder for real text
    num_worker=0,
)

model = dict(
    num_layers=2,
    hidden_size=256,
    num_attention_heads=8,
    num_kv_attention_heads=4,
    mlp_ratio=3.5,
    multiple_of=128,
    vocab_size=4096,
    dtype="torch.float32",
    rope_base=1000000,
    max_position_embeddings=SEQ_LEN,
    checkpoint=True,  # recompute every block in backward: activations stay at one block's
)

adam = dict(lr=1e-3, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.01)
lr_scheduler = dict(warmup_ratio=0.1, eta_min=1e-4)
hybrid_zero_optimizer = dict(clip_grad_norm=1.0)
ckpt = dict(enable_save_ckpt=False, auto_resume=False)
parallel = dict(
    zero1=dict(size=-1),
    tensor=dict(size=4, mode="isp"),
    pipeline=dict(size=1),
    weight=dict(size=2, overlap=True, memory_pool=True),
)
