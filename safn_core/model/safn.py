"""SAFN: modality encoders → symmetric imaging/clinical cross-attention → sparse gating → head.

Reference design: docs/model.md. For modalities m = 1..M (any number, each on the
"imaging" or the "clinical" side)::

    h_m = Enc_m(x_m)                      Enc = [In] → Linear → LayerNorm → GELU → Dropout → Linear(D)
    I = [h_m : imaging],  C = [h_m : clinical]
    I' = Block(q=I, kv=C);  C' = Block(q=C, kv=I)        two blocks of the same shape
    Z = [I'; C']  (kept in modality order)
    α = gate(Z) (B, M), f = Σ_m α_m z_m, logits = Head(f) (B, K)
    [+ Σ_m α_m L_m(x_m)]                  cfg.linear_path: a gated linear path
    [+ W x + b]                           cfg.wide: the ungated wide path (logistic regression)
    [logits = log P(y = k | η)]           ordinal head: the paths above give one score η

K classes (``n_classes``; 2 = HC/PD) and the head (``cfg.head``, resolved by
`safn_core.model.ordinal.head_for` from the target's order): with the softmax head every path
ends in K logits; with the ordinal head (K > 2 ordered classes) every path — the deep head's
output layer (each ensemble member's), the gated linear path, the wide path — ends in one score
η, and `safn_core.model.ordinal.OrdinalLink` turns η and K − 1 ordered thresholds into the log
class probabilities, returned as the logits. Either way softmax(logits) is the class
probabilities, so every loss, mixture and calibration downstream is the same code.

With ``cfg.ensemble_size`` k > 1 (TabM-mini, `safn_core.model.embeddings.EnsembleAdapter`) the
whole network runs k members at once: each modality's features enter as ``x_m ⊙ r_{m,i}``
(B, k, n_m), every later layer is shared and carries the member dimension (tokens (B, k, M, D),
α (B, k, M), logits (B, k, C)), and the model's output is the members' mixture
``log mean_i softmax(logits_i)`` with α averaged over members. Training takes the members'
logits (``members=True``) so that each member fits on its own loss.

Missing modalities are *masked*, never dropped: an absent modality's input is replaced by zeros
(so NaNs or any values there cannot leak), its token is excluded from every attention key set and
it gets gate weight α = 0 exactly. Its token still exists as a query (so every layer sees the same
shapes and every parameter gets a per-sample gradient under Opacus), but nothing downstream reads
it. A sample whose whole other side is absent attends to nothing in the cross-attention (the
attention output is zero, the residual passes the token through).

With ``cfg.linear_path`` every modality also has a linear map ``L_m`` of its (scaled) features
straight to the logits, weighted by the same gate α: the "wide" half of a wide-and-deep model,
which gives SAFN the linear model's inductive bias where the signal is mostly linear and small
(the deep path then learns what the linear path misses). α still says how much each modality
counts, now for both paths.

With ``cfg.wide`` ("trained" or "frozen") one more linear layer, ``wide``, maps all features
concatenated (the preprocessed z-scores; an absent modality's features are zeros, its training
mean) straight to the logits (η for the ordinal head), ungated, and is *added* to the deep
logits (to every member's, with ensemble members). The deep path's output layer then starts at
zero, so the untrained model is exactly the wide path; `set_wide` puts a logistic regression
there (binary: row 0 = 0, row 1 = the coefficients, bias [0, intercept], after which
P(positive) = σ(intercept + coef·x); multinomial and ordinal regressions:
`safn_core.model.wide`) before any training: SAFN starts where logistic regression ends (`safn_core.training.local.fit_by_rounds`
fits it). "frozen" keeps the wide path's weights fixed (``requires_grad`` False: the parameter
names and shapes stay those of "trained", and Opacus skips it), "trained" trains it with the
rest. The gate weights α describe the deep path; `wide_shares` says how much each modality
contributes to the wide logit on given data.

``In`` is the identity by default; ``cfg.feature_dropout`` adds feature dropout and
``cfg.numeric_embedding = "periodic"`` a periodic embedding of every feature
(`safn_core.model.embeddings`).

Layers of the same shape run grouped (`safn_core.model.grouped`): the encoders' tails (from
the LayerNorm on) are one group per modality, and the two cross-attention blocks are one block
of two groups (``block``; `_token_routes` lays the tokens out for it). Each group keeps its own
weights, so the function is the one above; a training step just runs a few batched operations
instead of many tiny ones.

Fallbacks and ablations:
  * if one side has no modality at all (e.g. a purely clinical table), there is nothing to cross
    with: a single self-attention block over all tokens (``block`` with one group) replaces the
    two cross-attention blocks;
  * ``cfg.cross_attention = False`` ("no cross-attention" ablation) replaces every attention block
    by its token-wise sublayer ``LN(x + FFN(x))``, so tokens never exchange information before the
    gate.

Differential privacy: only ``nn.Linear`` and SAFN's own grouped / embedding layers hold
parameters (no BatchNorm, no ``nn.MultiheadAttention``; the own layers' per-sample gradients are
registered in `safn_core.privacy.grad_samplers`) and every layer sees a batch-first input, so
Opacus' GradSampleModule computes exact per-sample gradients and the parameter names/shapes are
the same with or without DP.
The forward may take several tensors (or a dict); Opacus only needs each *layer's* input to be
batch-first. Under Opacus the model is wrapped (``GradSampleModule``): attributes such as
``last_weights`` and ``modality_weights`` live on ``wrapped._module``; ``return_weights=True``
works through the wrapper.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from safn_core.config import ModelConfig
from safn_core.model.attention import CrossAttentionBlock, FeedForwardBlock
from safn_core.model.embeddings import (EnsembleAdapter, FeatureDropout, FeatureNoise,
                                        PeriodicEmbedding)
from safn_core.model.gating import GatingFusion
from safn_core.model.grouped import FastDropout, GroupedLayerNorm, GroupedLinear
from safn_core.model.ordinal import OrdinalLink, head_for
from safn_core.model import wide as wide_path

SIDES = ("imaging", "clinical")


@dataclass(frozen=True)
class ModalitySpec:
    """What the model needs to know about one modality."""

    name: str
    n_features: int
    side: str


def _spec(m) -> ModalitySpec:
    """A `safn_core.data.cohort.Modality`, a `ModalitySpec` or a (name, n_features, side) tuple."""
    if isinstance(m, ModalitySpec):
        spec = m
    elif hasattr(m, "features") and hasattr(m, "name"):
        spec = ModalitySpec(str(m.name), len(m.features), str(getattr(m, "side", "clinical")))
    else:
        try:
            name, n_features, side = m
        except (TypeError, ValueError):
            raise ValueError(f"modality {m!r}: expected a Modality or a (name, n_features, side) "
                             f"tuple") from None
        spec = ModalitySpec(str(name), int(n_features), str(side))
    if spec.side not in SIDES:
        raise ValueError(f"modality '{spec.name}': side must be 'imaging' or 'clinical', "
                         f"got {spec.side!r}")
    if spec.n_features < 1:
        raise ValueError(f"modality '{spec.name}' has {spec.n_features} features; it needs >= 1")
    return spec


def _encoder_input(n_features: int, cfg: ModelConfig) -> nn.Sequential:
    """A modality's own input layers, up to its first Linear (the widths differ by modality)."""
    layers: list[nn.Module] = []
    if cfg.feature_dropout > 0:
        layers.append(FeatureDropout(cfg.feature_dropout))
    if cfg.feature_noise > 0:
        layers.append(FeatureNoise(cfg.feature_noise))
    width = n_features
    if cfg.numeric_embedding == "periodic":
        embed = PeriodicEmbedding(n_features, cfg.n_frequencies, cfg.embedding_dim,
                                  cfg.frequency_sigma)
        layers.append(embed)
        width = embed.out_features
    return nn.Sequential(*layers, nn.Linear(width, cfg.encoder_hidden))


def _encoder_tail(n_modalities: int, cfg: ModelConfig) -> nn.Sequential:
    """The rest of every encoder, one group per modality: LayerNorm → GELU → Dropout → Linear(D)."""
    return nn.Sequential(
        GroupedLayerNorm(n_modalities, cfg.encoder_hidden),
        nn.GELU(),
        FastDropout(cfg.dropout),
        GroupedLinear(n_modalities, cfg.encoder_hidden, cfg.d_model),
    )


def _token_routes(imaging: list[int], clinical: list[int], m_count: int):
    """Index tables that lay the modality tokens out for the grouped attention block.

    Cross-attention (both sides present): G = 2 groups, group 0 = imaging queries with clinical
    keys, group 1 = clinical queries with imaging keys, T = the larger side's token count; the
    smaller side is padded with index ``m_count`` (an all-zero, always-masked token). One side
    empty: G = 1, every token queries every token. Returns ``(query (T, G), key (T, G),
    back (M,))``: ``tokens[..., query, :]`` is the block's query layout, and position
    ``back[m]`` of its flattened (T·G) output is modality m's token.
    """
    def column(idx: list[int], t: int) -> list[int]:
        return idx + [m_count] * (t - len(idx))

    if imaging and clinical:
        t = max(len(imaging), len(clinical))
        query = torch.tensor([column(imaging, t), column(clinical, t)]).T
        key = torch.tensor([column(clinical, t), column(imaging, t)]).T
    else:
        query = key = torch.arange(m_count).unsqueeze(1)
    groups = query.shape[1]
    back = torch.empty(m_count, dtype=torch.long)
    for row in range(query.shape[0]):
        for g in range(groups):
            if int(query[row, g]) < m_count:
                back[int(query[row, g])] = row * groups + g
    return query, key, back


class SAFN(nn.Module):
    """The SAFN classifier.

    Args:
        modalities: in modality order; each a ``Modality`` (cohort), a ``ModalitySpec`` or a
            ``(name, n_features, side)`` tuple with side "imaging" or "clinical".
        cfg: the ``model`` section of the configuration (defaults if None).
        seed: if given, parameters are initialised from this seed without touching the global
            RNG (same seed → identical initial weights).
        n_classes: K, the number of classes (2: HC = 0, PD = 1); the output is K logits.
        ordered: whether the K classes are ordered (the target's ``ordered``): with
            ``cfg.head`` ordinal, K > 2 ordered classes get the ordinal head (``head_kind``).

    Forward: ``model(x, mask=None, return_weights=False)``; see `forward`.
    """

    def __init__(self, modalities: Sequence, cfg: ModelConfig | None = None,
                 seed: int | None = None, n_classes: int = 2, ordered: bool = False) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else ModelConfig()
        specs = tuple(_spec(m) for m in modalities)
        if not specs:
            raise ValueError("SAFN needs at least one modality")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"modality names must be unique, got {names}")
        self.cfg = cfg
        self.specs = specs
        self.modality_names: tuple[str, ...] = tuple(names)
        self.n_features: tuple[int, ...] = tuple(s.n_features for s in specs)
        self.imaging_idx = [i for i, s in enumerate(specs) if s.side == "imaging"]
        self.clinical_idx = [i for i, s in enumerate(specs) if s.side == "clinical"]
        self.last_weights: Tensor | None = None
        self.head_kind = head_for(cfg.head, n_classes, ordered)

        if seed is None:
            self._build(cfg, n_classes)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self._build(cfg, n_classes)

    def _build(self, cfg: ModelConfig, n_classes: int) -> None:
        d, m_count = cfg.d_model, len(self.specs)
        ordinal = self.head_kind == "ordinal"
        outputs = 1 if ordinal else n_classes  # the ordinal head's paths give one score η
        self.encoders = nn.ModuleList(_encoder_input(n, cfg) for n in self.n_features)
        self.encoder_tail = _encoder_tail(m_count, cfg)
        query, key, back = _token_routes(self.imaging_idx, self.clinical_idx, m_count)
        self.register_buffer("_query_route", query, persistent=False)
        self.register_buffer("_key_route", key, persistent=False)
        self.register_buffer("_back_route", back, persistent=False)
        self._padded = bool((query == m_count).any())
        groups = query.shape[1]  # 2: imaging→clinical and clinical→imaging; 1: one side empty
        if cfg.cross_attention:
            self.block = CrossAttentionBlock(d, cfg.n_heads, cfg.ffn_hidden, cfg.dropout, groups)
        else:
            self.block = FeedForwardBlock(d, cfg.ffn_hidden, cfg.dropout, groups)
        self.gate = GatingFusion(d, d, cfg.gate)
        self.ensemble_size = cfg.ensemble_size
        if self.ensemble_size > 1:
            self.adapters = nn.ModuleList(EnsembleAdapter(n, self.ensemble_size)
                                          for n in self.n_features)
        if cfg.linear_path:
            self.linear = nn.ModuleList(nn.Linear(n, outputs) for n in self.n_features)
        hidden = nn.Linear(d, cfg.head_hidden)
        # with ensemble members, each has its own output layer (TabM): (B, k, h) -> (B, k, C)
        out = nn.Linear(cfg.head_hidden, outputs) if self.ensemble_size == 1 \
            else GroupedLinear(self.ensemble_size, cfg.head_hidden, outputs)
        self.head = nn.Sequential(hidden, nn.GELU(), FastDropout(cfg.dropout), out)
        self.n_classes = n_classes
        if cfg.wide != "off":
            # built last, so that every other layer draws the same initial weights as without
            # it; the deep output starts at zero: the untrained model is the wide path alone.
            # The gate's scores start at zero too (α uniform): until the deep output has grown,
            # no task gradient reaches the gate, and at uniform α the entropy penalty's
            # gradient is zero as well, so the penalty alone cannot collapse the gate onto one
            # modality (with Adam, which rescales any gradient, it otherwise does in a few
            # epochs, onto whichever modality its first steps favour)
            with torch.no_grad():
                out.weight.zero_()
                out.bias.zero_()
                self.gate.score.weight.zero_()
            self.wide = nn.Linear(sum(self.n_features), outputs)
            with torch.no_grad():
                self.wide.weight.zero_()
                self.wide.bias.zero_()
            if cfg.wide == "frozen":
                self.wide.requires_grad_(False)
        # the thresholds draw no random numbers: the layers above are those of the softmax head
        self.link = OrdinalLink(n_classes) if ordinal else None

    # ----------------------------------------------------------------------------------------
    # Inputs
    # ----------------------------------------------------------------------------------------

    def _split_inputs(self, x, mask: Tensor | None) -> tuple[list[Tensor], Tensor]:
        ref = next(self.parameters())
        m_count = len(self.specs)
        absent: list[int] = []
        if isinstance(x, Tensor):
            if x.dim() != 2 or x.shape[1] != sum(self.n_features):
                raise ValueError(f"a single input tensor must be (batch, {sum(self.n_features)}) "
                                 f"= the modalities' features concatenated in order "
                                 f"{list(self.modality_names)}; got {tuple(x.shape)}")
            xs = list(torch.split(x, list(self.n_features), dim=1))
        elif isinstance(x, Mapping):
            unknown = set(x) - set(self.modality_names)
            if unknown:
                raise ValueError(f"unknown modalities {sorted(unknown)}; the model has "
                                 f"{list(self.modality_names)}")
            if not any(name in x for name in self.modality_names):
                raise ValueError("the input dict has none of the model's modalities")
            batch = next(x[n] for n in self.modality_names if n in x).shape[0]
            xs = []
            for i, spec in enumerate(self.specs):
                if spec.name in x:
                    xs.append(x[spec.name])
                else:  # a whole modality absent from the batch: masked for every sample
                    absent.append(i)
                    xs.append(torch.zeros(batch, spec.n_features, device=ref.device))
        elif isinstance(x, Sequence):
            if len(x) != m_count:
                raise ValueError(f"expected {m_count} input tensors in the order "
                                 f"{list(self.modality_names)}, got {len(x)}")
            xs = list(x)
        else:
            raise TypeError(f"x must be a tensor, a list of tensors or a dict, got {type(x)}")

        batch = xs[0].shape[0]
        for spec, xm in zip(self.specs, xs):
            if xm.dim() != 2 or xm.shape != (batch, spec.n_features):
                raise ValueError(f"modality '{spec.name}': expected shape ({batch}, "
                                 f"{spec.n_features}), got {tuple(xm.shape)}")
        xs = [xm.to(device=ref.device, dtype=ref.dtype) for xm in xs]

        if mask is None:
            mask = torch.ones(batch, m_count, dtype=torch.bool, device=ref.device)
        else:
            if mask.shape != (batch, m_count):
                raise ValueError(f"mask must be (batch, n_modalities) = ({batch}, {m_count}), "
                                 f"got {tuple(mask.shape)}")
            mask = mask.to(device=ref.device, dtype=torch.bool)
        if absent:
            mask = mask.clone()
            mask[:, absent] = False
        return xs, mask

    # ----------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------

    def forward(self, x, mask: Tensor | None = None, return_weights: bool = False,
                members: bool = False):
        """Logits (B, n_classes), and with ``return_weights`` also α (B, M) (ordinal head: the
        log class probabilities).

        ``x``: a dict {modality name: (B, n_m)} (a modality missing from the dict is masked for
        every sample), a list of (B, n_m) tensors in modality order, or one (B, Σ n_m) tensor of
        the modalities' features concatenated in modality order. ``mask``: (B, M) bool, True =
        the participant has that modality; None = all present. ``α`` is in modality order,
        exactly 0 for masked modalities, Σα = 1 per sample. The latest α is also kept, detached,
        in ``self.last_weights``.

        With ensemble members (``model.ensemble_size`` k > 1) the logits are the log of the
        members' mean probabilities and α their mean; ``members=True`` returns each member's
        logits (B, k, n_classes) and α (B, k, M) instead, for training. With k = 1 it changes
        nothing.
        """
        xs, mask = self._split_inputs(x, mask)
        ensemble = self.ensemble_size > 1
        hidden, flat = [], []
        for m, (enc, xm) in enumerate(zip(self.encoders, xs)):
            xm = torch.where(mask[:, m:m + 1], xm, torch.zeros_like(xm))  # absent → 0, NaN-safe
            flat.append(xm)
            if ensemble:
                xm = self.adapters[m](xm)  # (B, k, n_m)
            xs[m] = xm
            hidden.append(enc(xm))
        t = self.encoder_tail(torch.stack(hidden, dim=-2))  # (B, [k,] M, D)
        z = self._attend(t, mask)
        f, alpha = self.gate(z, mask)
        logits = self.head(f)
        if self.cfg.linear_path:
            wide = torch.stack([lin(xm) for lin, xm in zip(self.linear, xs)], dim=-2)  # (.., M, C)
            logits = logits + (alpha.unsqueeze(-1) * wide).sum(dim=-2)
        if self.cfg.wide != "off":  # ungated, added to every member's logits
            wide = self.wide(torch.cat(flat, dim=1))  # (B, C)
            logits = logits + (wide.unsqueeze(1) if ensemble else wide)
        if self.link is not None:  # η (B, [k,] 1) → log class probabilities (B, [k,] K)
            logits = self.link(logits)
        if ensemble and not members:
            logits = torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=1) \
                - math.log(self.ensemble_size)
            alpha = alpha.mean(dim=1)
        self.last_weights = (alpha.mean(dim=1) if alpha.dim() == 3 else alpha).detach()
        return (logits, alpha) if return_weights else logits

    def _attend(self, t: Tensor, mask: Tensor) -> Tensor:
        """Tokens (.., M, D) through the grouped attention block (`_token_routes`), back in
        modality order."""
        if self._padded:
            t = torch.cat([t, t.new_zeros(*t.shape[:-2], 1, t.shape[-1])], dim=-2)
            mask = torch.cat([mask, mask.new_zeros(mask.shape[0], 1)], dim=1)
        q = self._route(t, self._query_route)  # (.., T, G, D)
        if self.cfg.cross_attention:
            q = self.block(q, self._route(t, self._key_route), mask[:, self._key_route])
        else:
            q = self.block(q)
        return q.flatten(-3, -2).index_select(-2, self._back_route)

    @staticmethod
    def _route(t: Tensor, route: Tensor) -> Tensor:
        """``t[..., route, :]`` for a (T, G) route, by ``index_select`` (whose backward is an
        index_add; advanced indexing's accumulate-put backward is many times slower on CPU)."""
        return t.index_select(-2, route.flatten()).unflatten(-2, route.shape)

    @torch.no_grad()
    def modality_weights(self, x, mask: Tensor | None = None) -> Tensor:
        """Per-sample gate weights α (B, M) in modality order, in eval mode (no dropout)."""
        was_training = self.training
        self.eval()
        try:
            _, alpha = self.forward(x, mask, return_weights=True)
        finally:
            self.train(was_training)
        return alpha

    # ----------------------------------------------------------------------------------------
    # The wide path
    # ----------------------------------------------------------------------------------------

    def _wide_layer(self) -> nn.Linear:
        if self.cfg.wide == "off":
            raise ValueError("this SAFN has no wide path (model.wide is 'off')")
        return self.wide

    def set_wide(self, coef, intercept) -> None:
        """Put a fitted regression in the wide path (`safn_core.model.wide`): binary ``coef``
        (F,) and ``intercept`` a number; multinomial ``coef`` (K, F) / (K − 1, F) and
        ``intercept`` (K,) / (K − 1,) (class 0 the reference); ordinal ``coef`` (F,) and the
        K − 1 cut points θ as ``intercept``. The coefficients are on the features concatenated
        in modality order (as the model receives them).

        While the deep path's output is still zero (a model as built), the model's class
        probabilities are exactly the regression's — with ensemble members too, every member
        starting there. Works whether the wide path is frozen or trained (``requires_grad``
        is left as it is).
        """
        wide_path.set_wide(self, self._wide_layer(), coef, intercept)

    def wide_parts(self, x, mask: Tensor | None = None) -> Tensor:
        """Each modality's part of the wide path's logit of class 1 (logit 1 − logit 0) (B, M)
        for a binary model, of η (B, M) for the ordinal head, of logit c − logit 0 (B, M, K − 1)
        for the multinomial head: ``x_m · w_m`` of the contrast, absent modalities 0 (the row
        sums plus the bias' contrast are the wide contrast)."""
        layer = self._wide_layer()
        xs, mask = self._split_inputs(x, mask)
        return wide_path.wide_parts(self, layer, xs, mask)

    def wide_shares(self, x, mask: Tensor | None = None) -> dict:
        """Each modality's share of the wide logit's variance on the given participants.

        With ``c_m`` = modality m's part of the wide logit (`wide_parts`) and ``s = Σ_m c_m``,
        the share is ``Cov(c_m, s) / Var(s)``: the shares add up to 1 exactly (the variance
        of a sum is the sum of each part's covariance with it) and a modality whose part
        works against the others can get a negative share. All shares are 0 when the wide
        logit does not vary (e.g. a wide path still at zero). The gate weights α describe the
        deep path; these describe the wide one. Binary and ordinal head: {modality: share}
        (ordinal: of η); multinomial head: {modality: [share of logit c − logit 0, c = 1..K−1]}.
        """
        return wide_path.wide_shares(self.wide_parts(x, mask), self.modality_names)

    def extra_repr(self) -> str:
        mods = ", ".join(f"{s.name}:{s.n_features}:{s.side}" for s in self.specs)
        return (f"modalities=[{mods}], gate={self.cfg.gate}, "
                f"cross_attention={self.cfg.cross_attention}, members={self.ensemble_size}, "
                f"wide={self.cfg.wide}, classes={self.n_classes}, head={self.head_kind}")
