"""The SAFN model (safn.py), its attention blocks, gating fusion and losses. No Flower here."""

from safn_core.config import ModelConfig
from safn_core.model.attention import CrossAttentionBlock, FeedForwardBlock, MultiHeadAttention
from safn_core.model.gating import (GatingFusion, entmax15, gate_entropy, masked_softmax,
                                    sparsemax)
from safn_core.model.losses import (cb_focal_loss, class_balanced_weights, classification_loss,
                                    focal_loss, sparsity_penalty, total_loss)
from safn_core.model.ordinal import OrdinalLink, head_for
from safn_core.model.safn import SAFN, ModalitySpec

__all__ = [
    "SAFN", "ModalitySpec", "ModelConfig",
    "MultiHeadAttention", "CrossAttentionBlock", "FeedForwardBlock",
    "GatingFusion", "sparsemax", "entmax15", "masked_softmax", "gate_entropy",
    "class_balanced_weights", "focal_loss", "cb_focal_loss", "classification_loss",
    "sparsity_penalty", "total_loss", "OrdinalLink", "head_for",
]
