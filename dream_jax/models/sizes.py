"""Model sizes by name, and the resolved architecture every module reads.

B/L/H/G are the paper's sizes (encoder depth = decoder depth, same width);
`tiny` is the CPU default. Everything that depends on the data (token count and
dimension, vocabulary, context lengths) comes from the data config.
"""
import dataclasses
import math
from typing import Optional

# Parts that are the same at every paper size.
_PAPER_COMMON = dict(
    buffer_size=64,
    aligner_depth=6,
    text_width=512, text_depth=12, text_heads=8,
    head_width=1024, head_depth=3,
    contrastive_hidden=1024, embed_dim=256,
    dropout=0.1,
)

SIZES = {
    "tiny": dict(width=128, depth=3, num_heads=4, mlp_dim=512, buffer_size=4, aligner_depth=1,
                 text_width=128, text_depth=2, text_heads=4, head_width=128, head_depth=3,
                 contrastive_hidden=256, embed_dim=128, dropout=0.0),
    "B": dict(_PAPER_COMMON, width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(_PAPER_COMMON, width=1024, depth=16, num_heads=16, mlp_dim=4096),
    "H": dict(_PAPER_COMMON, width=1280, depth=20, num_heads=16, mlp_dim=5120),
    "G": dict(_PAPER_COMMON, width=1664, depth=24, num_heads=16, mlp_dim=8192),
}

# Totals without VAE and T5 from paper-notes §1 (used by the parameter-count test).
PAPER_TOTALS = {"B": 0.33e9, "L": 0.64e9, "H": 1.13e9, "G": 2.43e9}


@dataclasses.dataclass(frozen=True)
class DreamArch:
    """Everything the DREAM modules need to know about their shapes."""

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    buffer_size: int
    aligner_depth: int
    text_width: int
    text_depth: int
    text_heads: int
    head_width: int
    head_depth: int
    contrastive_hidden: int
    embed_dim: int
    dropout: float
    # From the data.
    seq_len: int = 256            # image tokens per image
    token_dim: int = 16           # channels per image token
    vocab_size: int = 49408       # CLIP text tower vocabulary
    context_length: int = 77      # CLIP text tower context
    eot_id: int = 49407
    gen_text: str = "t5"          # 'learned' | 't5'
    gen_vocab_size: int = 0       # for gen_text='learned'
    gen_feature_dim: int = 1024   # T5-Large width, or the learned embedding width
    gen_max_length: int = 128
    remat: bool = False
    scan_layers: bool = False     # nn.scan over blocks (fast compiles at large depth; other param tree)
    # 'normal' (MAR: N(0, 0.02)) or 'sincos' (image position tables start as 2-D sin-cos).
    pos_init: str = "normal"
    dtype: str = "float32"        # compute dtype; params stay float32
    diffusion_batch_mul: int = 4
    diffusion_steps: int = 1000
    noise_schedule: str = "cosine"


def make_arch(size: str, overrides: Optional[dict] = None) -> DreamArch:
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    fields = dict(SIZES[size])
    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(DreamArch)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown model field(s) {unknown} for size {size!r}")
    fields.update(overrides)
    arch = DreamArch(**fields)
    for name in ("width", "depth", "num_heads", "mlp_dim", "seq_len", "token_dim", "embed_dim",
                 "text_width", "text_heads", "head_width", "diffusion_batch_mul"):
        if getattr(arch, name) <= 0:
            raise ValueError(f"model.{name}={getattr(arch, name)} must be positive")
    if arch.width % arch.num_heads:
        raise ValueError(f"model.width={arch.width} is not divisible by num_heads={arch.num_heads}")
    if arch.gen_text not in ("learned", "t5"):
        raise ValueError(f"model.gen_text={arch.gen_text!r} must be 'learned' or 't5'")
    if arch.pos_init not in ("normal", "sincos"):
        raise ValueError(f"model.pos_init={arch.pos_init!r} must be 'normal' or 'sincos'")
    if arch.pos_init == "sincos" and math.isqrt(arch.seq_len) ** 2 != arch.seq_len:
        raise ValueError(f"model.pos_init='sincos' needs a square token grid, got seq_len={arch.seq_len}")
    if arch.pos_init == "sincos" and arch.width % 4:
        raise ValueError(f"model.pos_init='sincos' needs a width divisible by 4, got width={arch.width}")
    if arch.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"model.dtype={arch.dtype!r} must be 'float32' or 'bfloat16'")
    return arch
