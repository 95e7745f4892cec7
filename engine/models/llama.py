"""Our own forward pass for the Llama family (Llama, SmolLM, Mistral, Qwen2) over a paged KV cache.

The model sees one engine step as a flat batch of T tokens from many sequences (see
`kernels.metadata.AttentionMetadata`); there is no batch dimension and no padding. Attention
reads and writes the paged KV cache through an attention backend from `kernels`.

Weights are fused at load time: q/k/v into one `qkv_proj`, gate/up into one `gate_up_proj`, so a
layer runs four matmuls. Numerics follow transformers: RMSNorm and RoPE angles in float32, the
rest in the weight dtype. Mistral's sliding window is not applied (full causal attention).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.models.linear import PackedWeight, linear, pack_weight
from kernels import AttentionBackend, cpu_attention, cpu_ops, get_attention_backend
from kernels.layer_ops import LayerOps, get_layer_ops
from kernels.metadata import AttentionMetadata

# HF tensor names that carry no weights we need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(slots=True)
class _LayerStack:
    """What `cpu_ops.layer_stack` needs besides the step: the flat weight lists."""

    weights: list[torch.Tensor]
    qkv_biases: list[torch.Tensor]


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies [head_dim // 2] in float32, with the config's scaling applied.

    Supports the default rotation, "linear" (position interpolation) and "llama3" scaling.
    """
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling, config.max_position_embeddings)
    raise NotImplementedError(f"RoPE scaling {kind!r} is not supported")


def _llama3_inv_freq(
    inv_freq: torch.Tensor, scaling: Mapping[str, Any], max_positions: int
) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by factor, short ones kept, smoothed between."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", max_positions)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _param(
    *shape: int, dtype: torch.dtype | None, device: torch.device | str | None
) -> nn.Parameter:
    """An uninitialized, frozen weight; `load_hf_state_dict` fills every one of them."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP, each with a residual connection."""

    def __init__(
        self,
        config: ModelConfig,
        backend: AttentionBackend,
        ops: LayerOps,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        self.ops = ops
        hidden, head_dim = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            head_dim,
        )
        self.q_size = config.num_heads * head_dim
        self.kv_size = config.num_kv_heads * head_dim
        self.inter = config.intermediate_size
        self.eps = config.rms_norm_eps
        self.scale = head_dim**-0.5
        self.backend = backend
        qkv_out = self.q_size + 2 * self.kv_size
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.input_layernorm = _param(hidden, **kw)
        self.qkv_proj = _param(qkv_out, hidden, **kw)  # rows: q | k | v
        self.qkv_bias = _param(qkv_out, **kw) if config.attention_bias else None
        self.o_proj = _param(hidden, self.q_size, **kw)
        self.post_attention_layernorm = _param(hidden, **kw)
        self.gate_up_proj = _param(2 * self.inter, hidden, **kw)  # rows: gate | up
        self.down_proj = _param(hidden, self.inter, **kw)
        self.packed: dict[str, PackedWeight | None] = {}  # see `pack_weights`

    def pack_weights(self) -> None:
        """Pre-pack the matmul weights for oneDNN where that applies (CPU)."""
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            self.packed[name] = pack_weight(getattr(self, name))

    def forward(
        self,
        x: torch.Tensor,
        delta: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual stream x [T, hidden] and the previous layer's output `delta` (None in the first
        layer) -> (x + delta + attention, MLP output): each residual add is fused into the norm
        after it, in place on x. cos/sin [T, head_dim]."""
        h = self.ops.rms_norm(x, self.input_layernorm, self.eps, delta)
        attn = self._attention(h, cos, sin, kv_cache, meta)
        h = self.ops.rms_norm(x, self.post_attention_layernorm, self.eps, attn)
        gate_up = linear(h, self.gate_up_proj, None, self.packed.get("gate_up_proj"))
        act = self.ops.silu_mul(gate_up)  # [T, inter]
        return x, linear(act, self.down_proj, None, self.packed.get("down_proj"))

    def _attention(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = h.shape[0]
        qkv = linear(h, self.qkv_proj, self.qkv_bias, self.packed.get("qkv_proj"))
        # qkv: [T, (H + 2 KVH) * D]
        qk_size = self.q_size + self.kv_size
        qk = qkv[:, :qk_size].view(num_tokens, -1, self.head_dim)  # [T, H + KVH, D]
        self.ops.rope_(qk, cos, sin)  # q and k rotated together, in place
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]  # [T, H, D], [T, KVH, D]
        v = qkv[:, qk_size:].view(num_tokens, self.num_kv_heads, self.head_dim)
        self.backend.write_kv(k, v, kv_cache, meta.slot_mapping)
        out = self.backend.paged_attention(q, kv_cache, meta, self.scale)  # [T, H, D]
        out = out.reshape(num_tokens, self.q_size)
        return linear(out, self.o_proj, None, self.packed.get("o_proj"))


class LlamaForCausalLM(nn.Module):
    """Llama-family decoder over a paged KV cache, loading Hugging Face weights.

    Args:
        config: the architecture.
        attention_backend: an object from `kernels.get_attention_backend`, or its name.
        dtype, device: where the (uninitialized) weights live until `load_hf_state_dict`.
    """

    def __init__(
        self,
        config: ModelConfig,
        attention_backend: AttentionBackend | str = "auto",
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(attention_backend, str):
            attention_backend = get_attention_backend(attention_backend, device or "cpu")
        self.config = config
        self.inv_freq = rope_inv_freq(config)  # float32, deliberately not a buffer (kept fp32)
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.ops = get_layer_ops(device or "cpu", dtype or torch.get_default_dtype())
        self.embed_tokens = _param(config.vocab_size, config.hidden_size, **kw)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, attention_backend, self.ops, dtype, device)
            for _ in range(config.num_layers)
        )
        self.norm = _param(config.hidden_size, **kw)
        self.packed_head: PackedWeight | None = None
        self._stack: _LayerStack | None = None  # see `pack_weights`
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else _param(config.vocab_size, config.hidden_size, **kw)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Run one step's flat batch.

        Args:
            input_ids: [T] int64 token ids, sequence after sequence as in `meta`.
            positions: [T] int64 position of each token in its sequence.
            kv_caches: per layer, [2, num_blocks, block_size, kv_heads, head_dim].
            meta: the step's attention metadata.

        Returns:
            [T, hidden_size] hidden states after the final norm.
        """
        x = F.embedding(input_ids, self.embed_tokens)  # [T, hidden]
        cos, sin = self._rope(positions, x.dtype)
        stack = self._stack
        if stack is not None:
            attention = cpu_attention.stack_attention(meta, kv_caches[0])
            if attention is not None:  # all layers in one C++ call, the same ops as below
                c = self.config
                last = cpu_ops.layer_stack(
                    x, stack.weights, stack.qkv_biases, kv_caches, cos, sin, meta.slot_mapping,
                    attention, (c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size),
                    c.rms_norm_eps, c.head_dim**-0.5,
                )  # fmt: skip
                return self.ops.rms_norm(x, self.norm, c.rms_norm_eps, last)
        delta: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, delta = layer.forward(x, delta, cos, sin, kv_cache, meta)
        return self.ops.rms_norm(x, self.norm, self.config.rms_norm_eps, delta)

    def _rope(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_dim] in `dtype`; angles computed in float32 like transformers."""
        inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[:, None].float() * inv_freq  # [T, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden_size] -> logits [N, vocab_size] in float32."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return linear(hidden, head, None, self.packed_head).float()

    def pack_weights(self) -> None:
        """Pre-pack every matmul weight for oneDNN (CPU; elsewhere a no-op)."""
        for layer in self.layers:
            assert isinstance(layer, LlamaDecoderLayer)
            layer.pack_weights()
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        self.packed_head = pack_weight(head)
        self._stack = self._layer_stack()

    def _layer_stack(self) -> _LayerStack | None:
        """The inputs of `cpu_ops.layer_stack` where it runs exactly what the layers would
        (fused CPU ops, the C++ attention backend, every matmul on bf16 panels); else None."""
        layers = [layer for layer in self.layers if isinstance(layer, LlamaDecoderLayer)]
        if self.ops is not cpu_ops or any(layer.backend is not cpu_attention for layer in layers):
            return None
        weights: list[torch.Tensor] = []
        for layer in layers:
            panels = []
            for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                packed = layer.packed.get(name)
                if packed is None or packed.panels is None:
                    return None
                panels.append(packed.panels)
            qkv, o, gate_up, down = panels
            ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
            weights += [ln1, qkv, o, ln2, gate_up, down]
        biases: list[torch.Tensor] = [ly.qkv_bias for ly in layers if ly.qkv_bias is not None]
        if biases and len(biases) != len(layers):
            return None
        return _LayerStack(weights, biases)

    @torch.no_grad()
    def load_hf_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy Hugging Face weights (`model.layers.{i}.self_attn.q_proj.weight`, ...) into ours.

        q/k/v and gate/up are concatenated into the fused weights; tensors are cast to our dtype.

        Raises:
            ValueError: when a weight we need is missing or the file has weights we cannot use.
        """
        used: set[str] = set()
        for ours, names in self._hf_name_map().items():
            missing = [n for n in names if n not in tensors]
            if missing:
                raise ValueError(f"checkpoint is missing {missing}")
            target, row = self.get_parameter(ours), 0
            for name in names:  # fused weights: copy each part into its rows, no concatenation
                part = tensors[name]
                rows = target[row : row + part.shape[0]]
                if part.shape != rows.shape:
                    raise ValueError(f"{name}: shape {tuple(part.shape)} does not fit {ours}")
                rows.copy_(part)
                row += part.shape[0]
            if row != target.shape[0]:
                raise ValueError(f"{names}: {row} rows for {ours} of {target.shape[0]}")
            used.update(names)
        if self.lm_head is None:
            used.add("lm_head.weight")  # tied: a saved copy of the embeddings is redundant
        extra = [n for n in tensors if n not in used and not n.endswith(_IGNORED_SUFFIXES)]
        if extra:
            raise ValueError(f"checkpoint has weights this model does not use: {sorted(extra)[:8]}")

    def _hf_name_map(self) -> dict[str, tuple[str, ...]]:
        """Our parameter name -> the HF tensor names concatenated (dim 0) to build it."""
        names: dict[str, tuple[str, ...]] = {
            "embed_tokens": ("model.embed_tokens.weight",),
            "norm": ("model.norm.weight",),
        }
        if self.lm_head is not None:
            names["lm_head"] = ("lm_head.weight",)
        for i, layer in enumerate(self.layers):
            hf = f"model.layers.{i}"
            attn = [f"{hf}.self_attn.{p}_proj" for p in "qkv"]
            names[f"layers.{i}.input_layernorm"] = (f"{hf}.input_layernorm.weight",)
            names[f"layers.{i}.qkv_proj"] = tuple(f"{a}.weight" for a in attn)
            if layer.qkv_bias is not None:
                names[f"layers.{i}.qkv_bias"] = tuple(f"{a}.bias" for a in attn)
            names[f"layers.{i}.o_proj"] = (f"{hf}.self_attn.o_proj.weight",)
            names[f"layers.{i}.post_attention_layernorm"] = (
                f"{hf}.post_attention_layernorm.weight",
            )
            names[f"layers.{i}.gate_up_proj"] = (
                f"{hf}.mlp.gate_proj.weight",
                f"{hf}.mlp.up_proj.weight",
            )
            names[f"layers.{i}.down_proj"] = (f"{hf}.mlp.down_proj.weight",)
        return names
