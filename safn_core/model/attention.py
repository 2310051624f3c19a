"""Multi-head attention and the SAFN attention blocks, built only from Opacus-friendly layers.

Opacus cannot compute per-sample gradients of ``nn.MultiheadAttention`` (its weights are raw
parameters, not layers). Here every trainable parameter lives in an ``nn.Linear`` or an
``nn.LayerNorm``, both of which Opacus' ``GradSampleModule`` supports natively, and every layer
sees a batch-first input (B, tokens, D). The model therefore has the same parameter names and
shapes whether or not it is trained with differential privacy.

Masks follow the model's convention: ``True`` = the token is present and may be attended to
(the opposite of PyTorch's ``key_padding_mask``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class MultiHeadAttention(nn.Module):
    """Scaled dot-product multi-head attention from four ``nn.Linear`` projections.

    ``forward(query (B, Tq, D), key (B, Tk, D), value (B, Tk, D), key_mask (B, Tk) bool or None)``
    returns (B, Tq, D); inputs may carry extra leading dimensions after the batch (ensemble
    members: (B, k, T, D)), which share the batch's key mask. Keys with ``key_mask`` False get exactly zero attention weight. A query
    whose keys are all masked attends to nothing: its attention output is zero before the output
    projection (so the result is the projection's bias), never NaN.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"n_heads ({n_heads}) must divide d_model ({d_model})")
        self.d_model = d_model
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.attn_dropout = nn.Dropout(dropout)

    def _split(self, x: Tensor) -> Tensor:
        *lead, t, _ = x.shape
        return x.reshape(*lead, t, self.n_heads, self.d_head).transpose(-3, -2)  # (.., H, T, dh)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_mask: Tensor | None = None, return_attention: bool = False):
        *lead, tq, _ = query.shape
        q = self._split(self.q_proj(query))
        k = self._split(self.k_proj(key))
        v = self._split(self.v_proj(value))
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.d_head)  # (.., H, Tq, Tk)
        if key_mask is not None:
            # (B, Tk) -> (B, 1.., 1, 1, Tk): the same keys for every ensemble member and head
            key_mask = key_mask.to(torch.bool)
            keep = key_mask.reshape(key_mask.shape[0], *([1] * (scores.dim() - 2)),
                                    key_mask.shape[1])
            # A finite fill (not -inf) keeps softmax NaN-free when every key is masked; the
            # product with `keep` then makes the masked weights exactly zero in every case.
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
            attn = torch.softmax(scores, dim=-1) * keep.to(scores.dtype)
            # zero masked values too, so NaN/inf in a masked token cannot leak (0 · NaN = NaN)
            v = v.masked_fill(~keep.transpose(-2, -1), 0.0)
        else:
            attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(self.attn_dropout(attn), v)  # (.., H, Tq, dh)
        out = out.transpose(-3, -2).reshape(*lead, tq, self.d_model)
        out = self.out_proj(out)
        return (out, attn) if return_attention else out


class FeedForward(nn.Module):
    """Position-wise FFN: Linear → GELU → Dropout → Linear."""

    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class CrossAttentionBlock(nn.Module):
    """``h = LN(q + MHA(q, kv, kv)); out = LN(h + FFN(h))`` (post-norm, LayerNorm only).

    With ``kv is q`` it is a self-attention block. Dropout is applied to each sublayer's output
    before the residual sum.
    """

    def __init__(self, d_model: int, n_heads: int, ffn_hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, ffn_hidden, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, q: Tensor, kv: Tensor, kv_mask: Tensor | None = None) -> Tensor:
        h = self.norm1(q + self.drop(self.attn(q, kv, kv, key_mask=kv_mask)))
        return self.norm2(h + self.drop(self.ffn(h)))


class FeedForwardBlock(nn.Module):
    """``LN(x + FFN(x))``: the token-wise sublayer alone, for the 'no cross-attention' ablation."""

    def __init__(self, d_model: int, ffn_hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ffn = FeedForward(d_model, ffn_hidden, dropout)
        self.norm = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.drop(self.ffn(x)))
