"""The canonical workloads, built from each model's configuration: the parameter shapes a trainer
clips, in the order ``model.named_parameters()`` yields them (Hugging Face naming).

Nothing is read from disk: ``python -m benchmarks`` works from a bare clone. ``--workloads-dir``
adds the user's own ``{"doc": ..., "tensors": [[name, shape], ...]}`` files to these.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPT2Config:
    """GPT-2 (``transformers.GPT2Config`` field names): the LM head is tied to ``wte``, so it adds
    no parameter of its own."""

    n_layer: int
    n_embd: int
    vocab_size: int
    n_positions: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        d = self.n_embd
        out = [("transformer.wte.weight", (self.vocab_size, d)), ("transformer.wpe.weight", (self.n_positions, d))]
        for i in range(self.n_layer):
            h = f"transformer.h.{i}"
            # Conv1D layers store their weight as (in, out)
            for name, shape in (
                ("ln_1.weight", (d,)), ("ln_1.bias", (d,)),
                ("attn.c_attn.weight", (d, 3 * d)), ("attn.c_attn.bias", (3 * d,)),
                ("attn.c_proj.weight", (d, d)), ("attn.c_proj.bias", (d,)),
                ("ln_2.weight", (d,)), ("ln_2.bias", (d,)),
                ("mlp.c_fc.weight", (d, 4 * d)), ("mlp.c_fc.bias", (4 * d,)),
                ("mlp.c_proj.weight", (4 * d, d)), ("mlp.c_proj.bias", (d,)),
            ):  # fmt: skip
                out.append((f"{h}.{name}", shape))
        return out + [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]


@dataclass(frozen=True)
class LlamaConfig:
    """Llama (``transformers.LlamaConfig`` field names): bias-free projections, RMSNorm weights,
    an untied LM head."""

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        d, ff = self.hidden_size, self.intermediate_size
        kv = d // self.num_attention_heads * self.num_key_value_heads  # grouped-query attention shrinks k and v
        out = [("model.embed_tokens.weight", (self.vocab_size, d))]
        for i in range(self.num_hidden_layers):
            layer = f"model.layers.{i}"
            for name, shape in (
                ("self_attn.q_proj.weight", (d, d)), ("self_attn.k_proj.weight", (kv, d)),
                ("self_attn.v_proj.weight", (kv, d)), ("self_attn.o_proj.weight", (d, d)),
                ("mlp.gate_proj.weight", (ff, d)), ("mlp.up_proj.weight", (ff, d)), ("mlp.down_proj.weight", (d, ff)),
                ("input_layernorm.weight", (d,)), ("post_attention_layernorm.weight", (d,)),
            ):  # fmt: skip
                out.append((f"{layer}.{name}", shape))
        return out + [("model.norm.weight", (d,)), ("lm_head.weight", (self.vocab_size, d))]


@dataclass(frozen=True)
class ManySmallConfig:
    """``count`` 1-D tensors cycling through ``sizes``: launch- and host-overhead bound."""

    count: int
    sizes: tuple[int, ...]

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(f"p{i}", (self.sizes[i % len(self.sizes)],)) for i in range(self.count)]


@dataclass(frozen=True)
class ModelWorkload:
    name: str
    doc: str
    config: GPT2Config | LlamaConfig | ManySmallConfig


CANONICAL = (
    ModelWorkload(
        "gpt2_124m",
        "GPT-2 small (124M) parameter shapes, HF naming; dtype bf16 unless a benchmark says otherwise",
        GPT2Config(n_layer=12, n_embd=768, vocab_size=50257, n_positions=1024),
    ),
    ModelWorkload(
        "llama2_7b",
        "Llama-2-7B parameter shapes (hidden 4096, intermediate 11008, 32 layers, vocab 32000, untied lm_head)",
        LlamaConfig(32, 4096, 11008, 32000, num_attention_heads=32, num_key_value_heads=32),
    ),
    ModelWorkload(
        "llama_1b_like",
        "Llama-shaped 16 layers, hidden 2048, intermediate 5632, vocab 32000 (CPU-sized large workload)",
        LlamaConfig(16, 2048, 5632, 32000, num_attention_heads=16, num_key_value_heads=16),
    ),
    ModelWorkload(
        "many_small_2048",
        "2048 small tensors of mixed odd sizes: launch- and host-overhead bound",
        ManySmallConfig(2048, (256, 1024, 4096, 16384, 65536, 777, 3, 12345)),
    ),
)
