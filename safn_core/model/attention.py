"""Multi-head attention and the SAFN attention blocks, grouped and built only from layers with
exact per-sample gradients.

Opacus cannot compute per-sample gradients of ``nn.MultiheadAttention`` (its weights are raw
parameters, not layers). Here every trainable parameter lives in a `GroupedLinear` or a
`GroupedLayerNorm` (`safn_core.model.grouped`; their per-sample gradients are registered in
`safn_core.privacy.grad_samplers`), and every layer sees a batch-first input. The model therefore
has the same parameter names and shapes whether or not it is trained with differential privacy.

Grouping. SAFN's symmetric cross-attention is two blocks of one shape with their own weights:
imaging queries attending to clinical keys, and clinical queries attending to imaging keys. They
run as G = 2 groups of one block: tokens are laid out ``(B, [k,] T, G, D)`` (T tokens per group,
then the group), and group g's queries attend only to group g's keys. G = 1 is an ordinary
(self- or cross-) attention block.

Masks follow the model's convention: ``True`` = the token is present and may be attended to
(the opposite of PyTorch's ``key_padding_mask``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from safn_core.model.grouped import FastDropout, GroupedLayerNorm, GroupedLinear


class MultiHeadAttention(nn.Module):
    """Scaled dot-product multi-head attention, G groups at once, from grouped projections.

    ``forward(query (B, .., Tq, G, D), kv (B, .., Tk, G, D), key_mask (B, Tk, G) bool or None)``
    returns (B, .., Tq, G, D); ``..`` are optional extra dimensions (ensemble members) that share
    the batch's key mask. Keys with ``key_mask`` False get exactly zero attention weight. A query
    whose keys are all masked attends to nothing: its attention output is zero before the output
    projection (so the result is the projection's bias), never NaN. Keys and values come from one
    projection of ``kv`` (``kv_proj``: the key and value maps side by side). There is no dropout
    on the attention weights: over SAFN's handful of keys per query it would drop whole modalities
    at random, which the block's sublayer dropout and the gate already regularise.
    """

    def __init__(self, d_model: int, n_heads: int, groups: int = 1) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"n_heads ({n_heads}) must divide d_model ({d_model})")
        self.d_model, self.n_heads, self.groups = d_model, n_heads, groups
        self.d_head = d_model // n_heads
        self.q_proj = GroupedLinear(groups, d_model, d_model)
        self.kv_proj = GroupedLinear(groups, d_model, 2 * d_model)
        self.out_proj = GroupedLinear(groups, d_model, d_model)

    def _split(self, x: Tensor) -> Tensor:
        """(.., T, G, D) -> (.., G, H, T, dh)."""
        *lead, t, g, _ = x.shape
        return x.reshape(*lead, t, g, self.n_heads, self.d_head).movedim(-4, -2)

    def forward(self, query: Tensor, kv: Tensor, key_mask: Tensor | None = None,
                return_attention: bool = False):
        *lead, tq, g, _ = query.shape
        q = self._split(self.q_proj(query))
        k, v = (self._split(part) for part in self.kv_proj(kv).chunk(2, dim=-1))
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.d_head)  # (.., G, H, Tq, Tk)
        if key_mask is not None:
            # (B, Tk, G) -> (B, 1.., G, 1, 1, Tk): the same keys for every member and head
            key_mask = key_mask.to(torch.bool).transpose(1, 2)
            keep = key_mask.reshape(key_mask.shape[0], *([1] * (scores.dim() - 5)), g, 1, 1,
                                    key_mask.shape[-1])
            # A finite fill (not -inf) keeps softmax NaN-free when every key is masked; the
            # product with `keep` then makes the masked weights exactly zero in every case.
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
            attn = torch.softmax(scores, dim=-1) * keep.to(scores.dtype)
            # zero masked values too, so NaN/inf in a masked token cannot leak (0 · NaN = NaN)
            v = v.masked_fill(~keep.transpose(-2, -1), 0.0)
        else:
            attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(attn, v)  # (.., G, H, Tq, dh)
        out = out.movedim(-2, -4).reshape(*lead, tq, g, self.d_model)
        out = self.out_proj(out)
        return (out, attn) if return_attention else out


class FeedForward(nn.Module):
    """Position-wise FFN per group: Linear → GELU → Dropout → Linear."""

    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0, groups: int = 1) -> None:
        super().__init__()
        self.fc1 = GroupedLinear(groups, d_model, hidden)
        self.act = nn.GELU()
        self.drop = FastDropout(dropout)
        self.fc2 = GroupedLinear(groups, hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class CrossAttentionBlock(nn.Module):
    """``h = LN(q + MHA(q, kv)); out = LN(h + FFN(h))`` (post-norm, LayerNorm only), per group.

    With ``kv is q`` it is a self-attention block. Dropout is applied to each sublayer's output
    before the residual sum. ``ffn_hidden = 0``: no FFN sublayer, ``out = h`` (the encoders and
    the head are already MLPs; the block then only exchanges information between tokens).
    """

    def __init__(self, d_model: int, n_heads: int, ffn_hidden: int, dropout: float = 0.0,
                 groups: int = 1) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(d_model, n_heads, groups)
        self.norm1 = GroupedLayerNorm(groups, d_model)
        self.drop = FastDropout(dropout)
        if ffn_hidden > 0:
            self.ffn = FeedForward(d_model, ffn_hidden, dropout, groups)
            self.norm2 = GroupedLayerNorm(groups, d_model)

    def forward(self, q: Tensor, kv: Tensor, kv_mask: Tensor | None = None) -> Tensor:
        h = self.norm1(q + self.drop(self.attn(q, kv, key_mask=kv_mask)))
        if not hasattr(self, "ffn"):
            return h
        return self.norm2(h + self.drop(self.ffn(h)))


class FeedForwardBlock(nn.Module):
    """``LN(x + FFN(x))`` per group: the token-wise sublayer alone, for the 'no cross-attention'
    ablation (tokens never exchange information); with ``ffn_hidden = 0`` the identity."""

    def __init__(self, d_model: int, ffn_hidden: int, dropout: float = 0.0,
                 groups: int = 1) -> None:
        super().__init__()
        if ffn_hidden > 0:
            self.ffn = FeedForward(d_model, ffn_hidden, dropout, groups)
            self.norm = GroupedLayerNorm(groups, d_model)
            self.drop = FastDropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if not hasattr(self, "ffn"):
            return x
        return self.norm(x + self.drop(self.ffn(x)))
