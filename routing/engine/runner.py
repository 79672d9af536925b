"""`ModelRunner`: turns a `StepPlan` into tensors, runs the fused model over a paged KV cache, returns logits.

It never decides who runs (the scheduler does). It runs the decoder itself, layer by layer, with the
base model's own modules (embedding, norms, rotary embedding, projections — fused LoRA layers
included — and MLP), and does only the attention and the KV cache its own way: every row has its own
position and its own cache length, which Hugging Face's caches and masks do not express for rows that
join a batch mid-flight. Supported: the Llama family's pre-norm decoder layer (Llama, Mistral, Qwen2,
Qwen3, SmolLM, ...).
"""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torch.nn.utils.rnn import pad_sequence

from routing.engine.scheduler import PrefillChunk
from routing.engine.sequence import Sequence
from routing.lora.model import FusedLoraModel

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class Row:
    """One batch row of a forward pass: `tokens` fed at positions `start`, `start + 1`, ..."""

    seq: Sequence
    tokens: list[int]
    start: int


def rows_for(prefills: Seq[PrefillChunk], decodes: Seq[Sequence]) -> tuple[list[Row], list[Row]]:
    """The prefill rows (one per chunk) and the decode rows (each sequence's newest token)."""
    pre = [Row(c.seq, c.seq.prompt[c.start:c.start + c.length], c.start) for c in prefills]
    dec = [Row(s, [s.output[-1]], s.computed) for s in decodes]
    return pre, dec


class ModelRunner:
    """The fused model plus a paged KV cache of `num_blocks` × `block_size` tokens per layer."""

    def __init__(self, fused: FusedLoraModel, num_blocks: int, block_size: int):
        model = fused.model
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"the generation engine runs {', '.join(SUPPORTED_MODEL_TYPES)} decoders; this base "
                             f"model is {config.model_type!r}")
        self.fused = fused
        self.body = model.model                       # embed_tokens, layers, norm, rotary_emb
        self.lm_head = model.lm_head
        attn = self.body.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.kv_heads = config.num_key_value_heads
        self.scaling = attn.scaling
        self.rope = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb
        self.block_size = block_size
        p = next(model.parameters())
        shape = (len(self.body.layers), num_blocks * block_size, self.kv_heads, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=p.dtype, device=p.device)   # (layers, slots, Hkv, hd)
        self.v_cache = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.device = p.device
        self._slot_maps: weakref.WeakKeyDictionary[Sequence, torch.Tensor] = weakref.WeakKeyDictionary()

    @property
    def kv_bytes(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    def _slots(self, seq: Sequence) -> torch.Tensor:
        """Cache slot of each position the sequence can use (its blocks are reserved once, at admission)."""
        slots = self._slot_maps.get(seq)
        if slots is None:
            blocks = torch.tensor(seq.blocks, dtype=torch.long)
            slots = (blocks[:, None] * self.block_size + torch.arange(self.block_size)).flatten()
            self._slot_maps[seq] = slots
        return slots

    @torch.inference_mode()
    def forward(self, rows: list[Row], logits_for: list[bool]) -> torch.Tensor:
        """Run `rows` (right-padded to the longest), writing their keys and values into the cache.

        Returns float32 logits (n, vocab) of the last token of each row with `logits_for` set, in
        row order. Rows attend to their own cached positions 0..start+t only.
        """
        b, t = len(rows), max(len(r.tokens) for r in rows)
        lengths = [r.start + len(r.tokens) for r in rows]          # cache length of each row after this pass
        span = max(lengths)
        ids = torch.zeros((b, t), dtype=torch.long)
        valid = torch.zeros((b, t), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, :len(r.tokens)] = torch.tensor(r.tokens)
            valid[i, :len(r.tokens)] = True
        starts = torch.tensor([r.start for r in rows])
        pos = starts[:, None] + torch.arange(t)                       # (B, T)
        slots = [self._slots(r.seq) for r in rows]
        gather = pad_sequence([s[:n] for s, n in zip(slots, lengths)], batch_first=True)   # (B, S) cache slots
        write = torch.cat([s[r.start:n] for s, r, n in zip(slots, rows, lengths)])       # new tokens' slots
        key_pos = torch.arange(span)
        mask = (key_pos[None, None, :] <= pos[:, :, None]) & (key_pos[None, None, :] < torch.tensor(lengths)[:, None, None])
        mask[~valid] = key_pos[None, :] == 0   # padding queries look at one key: no empty softmax (their output is dropped)
        dev = self.device
        ids, pos, valid, gather, mask = ids.to(dev), pos.to(dev), valid.to(dev), gather.to(dev), mask[:, None].to(dev)
        write = write.to(dev)

        self.fused.set_routing([list(r.seq.routes) for r in rows])
        h = self.body.embed_tokens(ids)                                             # (B, T, D)
        cos, sin = self.body.rotary_emb(h, pos)
        for li, layer in enumerate(self.body.layers):
            h = h + self._attention(li, layer.self_attn, layer.input_layernorm(h), cos, sin, valid, write, gather, mask)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        last = torch.tensor([len(r.tokens) - 1 for r, want in zip(rows, logits_for) if want], dtype=torch.long,
                            device=dev)
        which = torch.tensor([i for i, want in enumerate(logits_for) if want], dtype=torch.long, device=dev)
        hidden = self.body.norm(h[which, last])                                     # (n, D)
        return self.lm_head(hidden).float()                                         # (n, V)

    def _attention(self, li: int, attn, x: torch.Tensor, cos, sin, valid, write, gather, mask) -> torch.Tensor:
        b, t, _ = x.shape
        q = attn.q_proj(x).view(b, t, -1, self.head_dim)                            # (B, T, H, hd)
        k = attn.k_proj(x).view(b, t, -1, self.head_dim)                            # (B, T, Hkv, hd)
        v = attn.v_proj(x).view(b, t, -1, self.head_dim)
        if hasattr(attn, "q_norm"):                                                 # Qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = self.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)            # (B, H|Hkv, T, hd)
        self.k_cache[li].index_copy_(0, write, k.transpose(1, 2)[valid])
        self.v_cache[li].index_copy_(0, write, v[valid])
        keys = self.k_cache[li][gather].transpose(1, 2)                             # (B, Hkv, S, hd)
        values = self.v_cache[li][gather].transpose(1, 2)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling,
                                             enable_gqa=q.shape[1] != keys.shape[1])  # (B, H, T, hd)
        return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
