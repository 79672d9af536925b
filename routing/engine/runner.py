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
    """One sequence's tokens in a forward pass: `tokens` fed at positions `start`, `start + 1`, ..."""

    seq: Sequence
    tokens: list[int]
    start: int


def rows_for(prefills: Seq[PrefillChunk], decodes: Seq[Sequence]) -> list[Row]:
    """A step's rows: one per prefill chunk, then each decoding sequence's newest token."""
    return ([Row(c.seq, c.seq.prompt[c.start:c.start + c.length], c.start) for c in prefills]
            + [Row(s, [s.output[-1]], s.computed) for s in decodes])


@dataclass(frozen=True)
class _AttentionGroup:
    """Rows whose queries are attended together, laid out (b, t) with t = the group's longest row.

    `tokens` (b, t): each query's index in the packed pass (0 on padding); `valid` (b, t); `dest`: the
    valid queries' indices, in (b, t) order; `gather` (b, S): the cache slots of each row's keys; `mask`
    (b, 1, t, S): causal, within the row's own length. Built once per step, used by every layer. A step
    has one group of prefill chunks and one per span bucket of decoding rows (t = 1).
    """

    tokens: torch.Tensor
    valid: torch.Tensor
    dest: torch.Tensor
    gather: torch.Tensor
    mask: torch.Tensor


def _attention_parts(rows: list[Row]) -> list[list[int]]:
    """Row indices attended together: prefill chunks in one part, decoding rows by the power of two
    of their cache span, so a few long sequences do not make every short one gather and attend over
    their length (a part pads its keys to its longest span)."""
    parts: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        key = -1 if len(r.tokens) > 1 else r.start.bit_length()     # span r.start + 1 in (2^(k-1), 2^k]
        parts.setdefault(key, []).append(i)
    return list(parts.values())


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
        """Run every row's tokens as one packed pass, writing their keys and values into the cache.

        The projections, MLPs and LoRA deltas see the step's N tokens as N rows of one token each,
        every token routed as its sequence (so prefill chunks and decoding rows share one forward
        and one routing state, vLLM's packed layout); only attention regroups them per sequence.
        Returns float32 logits (n, vocab) of the last token of each row with `logits_for` set, in
        row order. Rows attend to their own cached positions 0..start+t only.
        """
        counts = [len(r.tokens) for r in rows]
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + c)
        dev = self.device
        ids = torch.tensor([t for r in rows for t in r.tokens], dtype=torch.long)[:, None]          # (N, 1)
        pos = torch.cat([torch.arange(r.start, r.start + c) for r, c in zip(rows, counts)])[:, None]  # (N, 1)
        slots = [self._slots(r.seq) for r in rows]
        write = torch.cat([s[r.start:r.start + c] for s, r, c in zip(slots, rows, counts)]).to(dev)  # (N,)
        groups = [self._group([rows[i] for i in part], [offsets[i] for i in part], [slots[i] for i in part])
                  for part in _attention_parts(rows)]

        self.fused.set_routing([list(r.seq.routes) for r in rows], repeats=counts)
        h = self.body.embed_tokens(ids.to(dev))                                         # (N, 1, D)
        cos, sin = self.body.rotary_emb(h, pos.to(dev))
        for li, layer in enumerate(self.body.layers):
            h = h + self._attention(li, layer.self_attn, layer.input_layernorm(h), cos, sin, write, groups)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        last = torch.tensor([offsets[i + 1] - 1 for i, want in enumerate(logits_for) if want], dtype=torch.long,
                            device=dev)
        return self.lm_head(self.body.norm(h[last, 0])).float()                        # (n, V)

    def _group(self, rows: list[Row], offsets: list[int], slots: list[torch.Tensor]) -> _AttentionGroup:
        t = max(len(r.tokens) for r in rows)
        lengths = torch.tensor([r.start + len(r.tokens) for r in rows])                 # cache length after the pass
        starts = torch.tensor([r.start for r in rows])
        steps = torch.arange(t)
        valid = steps[None, :] < torch.tensor([len(r.tokens) for r in rows])[:, None]   # (b, t)
        tokens = torch.where(valid, torch.tensor(offsets)[:, None] + steps, 0)
        gather = pad_sequence([s[:n] for s, n in zip(slots, lengths.tolist())], batch_first=True)   # (b, S)
        key_pos = torch.arange(gather.shape[1])
        pos = starts[:, None] + steps                                                   # (b, t)
        mask = (key_pos[None, None, :] <= pos[:, :, None]) & (key_pos[None, None, :] < lengths[:, None, None])
        mask[~valid] = key_pos[None, :] == 0   # padding queries look at one key: no empty softmax (dropped)
        dev = self.device
        return _AttentionGroup(tokens.to(dev), valid.to(dev), tokens[valid].to(dev), gather.to(dev),
                               mask[:, None].to(dev))

    def _attention(self, li: int, attn, x: torch.Tensor, cos, sin, write: torch.Tensor,
                   groups: list[_AttentionGroup]) -> torch.Tensor:
        n = x.shape[0]
        q = attn.q_proj(x).view(n, 1, -1, self.head_dim)                               # (N, 1, H, hd)
        k = attn.k_proj(x).view(n, 1, -1, self.head_dim)                               # (N, 1, Hkv, hd)
        v = attn.v_proj(x).view(n, 1, -1, self.head_dim)
        if hasattr(attn, "q_norm"):                                                     # Qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = self.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)               # (N, H|Hkv, 1, hd)
        q = q[:, :, 0]                                                                  # (N, H, hd)
        self.k_cache[li].index_copy_(0, write, k[:, :, 0])
        self.v_cache[li].index_copy_(0, write, v[:, 0])
        out = torch.empty_like(q)
        for g in groups:
            keys = self.k_cache[li][g.gather].transpose(1, 2)                          # (b, Hkv, S, hd)
            values = self.v_cache[li][g.gather].transpose(1, 2)
            o = F.scaled_dot_product_attention(q[g.tokens].transpose(1, 2), keys, values, attn_mask=g.mask,
                                               scale=self.scaling, enable_gqa=q.shape[1] != keys.shape[1])
            out[g.dest] = o.transpose(1, 2)[g.valid]                                    # (b, H, t, hd) -> (n_g, H, hd)
        return attn.o_proj(out.view(n, 1, -1))
