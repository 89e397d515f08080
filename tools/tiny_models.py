"""Build tiny, random-weight MoE checkpoints in Hugging Face format, entirely offline.

These are the project's test fixtures: each architecture that runs its experts through transformers'
``ExpertsInterface`` can be built at any size, saved as sharded safetensors with per-expert keys (the on-disk
layout users have), a config, a generation config and a byte-level BPE tokenizer trained locally.

    tritonmoe-make-tiny mixtral /tmp/tiny-mixtral --layers 4 --experts 8 --top-k 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

ARCHITECTURES = ("mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v2", "deepseek_v3", "olmoe", "gpt_oss")
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
MARKER = "tritonmoe_tiny.json"  # written last: a folder without it is an unfinished build


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny model; the same names whatever the architecture."""

    arch: str = "mixtral"
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    experts: int = 8
    top_k: int = 2
    expert_ffn: int = 96
    dense_ffn: int = 128
    shared_experts: int = 1
    vocab: int = 512
    max_positions: int = 512
    dtype: str = "float32"
    seed: int = 0
    shard_mb: float = 0.25
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top_k must be in 1..experts ({self.experts}), got {self.top_k}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden must divide by heads, and heads by kv_heads")


def make_config(spec: TinySpec):
    """A transformers config object for ``spec``."""
    import transformers as tf

    head_dim = spec.hidden // spec.heads
    common = dict(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        num_experts_per_tok=spec.top_k,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
        dtype=spec.dtype,
    )
    if spec.arch == "mixtral":
        cfg = tf.MixtralConfig(num_local_experts=spec.experts, intermediate_size=spec.expert_ffn,
                               sliding_window=None, **common)
    elif spec.arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(num_experts=spec.experts, moe_intermediate_size=spec.expert_ffn,
                                intermediate_size=spec.dense_ffn, head_dim=head_dim, norm_topk_prob=True,
                                decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False, **common)
    elif spec.arch == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(num_experts=spec.experts, moe_intermediate_size=spec.expert_ffn,
                                shared_expert_intermediate_size=spec.expert_ffn * spec.shared_experts,
                                intermediate_size=spec.dense_ffn, decoder_sparse_step=1, mlp_only_layers=[],
                                use_sliding_window=False, **common)
    elif spec.arch == "olmoe":
        cfg = tf.OlmoeConfig(num_experts=spec.experts, intermediate_size=spec.expert_ffn, **common)
    elif spec.arch == "gpt_oss":
        # transposed experts with biases and a clamped SwiGLU, a biased router at `.router`, attention sinks; full
        # attention in every layer (its sliding mask is built but unused), YaRN RoPE consistent with the tiny context
        cfg = tf.GptOssConfig(num_local_experts=spec.experts, intermediate_size=spec.expert_ffn, head_dim=head_dim,
                              layer_types=["full_attention"] * spec.layers, sliding_window=spec.max_positions,
                              rope_parameters={"rope_type": "yarn", "factor": 1.0, "beta_fast": 32.0,
                                               "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0,
                                               "original_max_position_embeddings": spec.max_positions},
                              **common)
    else:  # deepseek_v2 / deepseek_v3: multi-head latent attention, shared experts, a leading dense layer
        mla = dict(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                   n_routed_experts=spec.experts, n_shared_experts=spec.shared_experts,
                   moe_intermediate_size=spec.expert_ffn, intermediate_size=spec.dense_ffn,
                   first_k_dense_replace=1 if spec.layers > 1 else 0, n_group=1, topk_group=1,
                   routed_scaling_factor=1.0)
        if spec.arch == "deepseek_v2":
            common["num_key_value_heads"] = spec.heads  # MLA keeps one latent per head
            cfg = tf.DeepseekV2Config(q_lora_rank=None, topk_method="greedy", **mla, **common)
        else:
            common["num_key_value_heads"] = spec.heads
            cfg = tf.DeepseekV3Config(q_lora_rank=48, norm_topk_prob=True, **mla, **common)
    for key, value in spec.extra.items():
        setattr(cfg, key, value)
    return cfg


def _training_text() -> list[str]:
    """Text that exists on every machine: a few modules of Python's own standard library."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = ["textwrap.py", "string.py", "os.py", "json/decoder.py", "json/encoder.py", "argparse.py"]
    return [(stdlib / n).read_text(encoding="utf-8") for n in names if (stdlib / n).exists()]


def make_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on local text; any UTF-8 string round-trips through it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_text(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=10**6)


def build(spec: TinySpec, out: str | os.PathLike, overwrite: bool = False, device: str = "cpu") -> Path:
    """Write the checkpoint for ``spec`` into ``out`` and return its path. Reuses a finished identical build.
    ``device``: where the random weights are initialised ("cuda" makes multi-GB benchmark models in seconds)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out)
    marker = out / MARKER
    wanted = json.dumps(_spec_dict(spec), sort_keys=True)
    if marker.exists() and not overwrite:
        if marker.read_text() == wanted:
            return out
        raise FileExistsError(f"{out} holds a different tiny model; pass overwrite=True (--overwrite) to replace it")
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)

    tokenizer = make_tokenizer(spec.vocab)
    config = make_config(spec)
    config.vocab_size = max(spec.vocab, len(tokenizer))
    torch.manual_seed(spec.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec.dtype))
    _spread_router_weights(model, spec.seed)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3, do_sample=False)
    model.save_pretrained(out, max_shard_size=f"{int(spec.shard_mb * 1024)}KB")
    tokenizer.save_pretrained(out)
    marker.write_text(wanted)
    return out


def _spread_router_weights(model, seed: int) -> None:
    """Random routers at the default init scale route almost uniformly with near-ties; a wider init gives each
    token a clear top-k, which keeps greedy comparisons between numerically different but equivalent paths
    (batched, offloaded) meaningful."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "router.weight")) and param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype))


def _spec_dict(spec: TinySpec) -> dict:
    from dataclasses import asdict

    return asdict(spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tritonmoe-make-tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("arch", choices=ARCHITECTURES)
    p.add_argument("out", help="output folder (created)")
    for name, default in [("layers", 2), ("hidden", 64), ("heads", 4), ("kv-heads", 2), ("experts", 8),
                          ("top-k", 2), ("expert-ffn", 96), ("dense-ffn", 128), ("shared-experts", 1),
                          ("vocab", 512), ("max-positions", 512), ("seed", 0)]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--shard-mb", type=float, default=0.25, help="largest safetensors shard, MiB")
    p.add_argument("--overwrite", action="store_true", help="replace a different model already in OUT")
    a = p.parse_args(argv)
    try:
        spec = TinySpec(arch=a.arch, layers=a.layers, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads,
                        experts=a.experts, top_k=a.top_k, expert_ffn=a.expert_ffn, dense_ffn=a.dense_ffn,
                        shared_experts=a.shared_experts, vocab=a.vocab, max_positions=a.max_positions,
                        dtype=a.dtype, seed=a.seed, shard_mb=a.shard_mb)
        path = build(spec, a.out, overwrite=a.overwrite)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
