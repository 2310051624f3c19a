"""`SitePrivacy`: a DP site's DP-SGD rounds for one run (an Opacus ``PrivacyEngine`` that
remembers across rounds, processes and runs), on top of its `SiteBudget` (settings, ledger, ε).

Per run, a client app does::

    sp = SitePrivacy(privacy_cfg, train_arrays, train_cfg, rounds=R, local_epochs=E,
                     run_id=run_id, fingerprint=data_fingerprint(train_ids, features),
                     state_dir=site_state_dir, site=name)
    # per round (a fresh process per message is fine: everything lives in the ledger)
    try:
        sp.check_round(server_round)                     # BudgetExhausted before anything runs
        state, report = sp.train_round(global_state, modalities, model_cfg, class_counts,
                                       server_round=server_round, seed=seed)
    except BudgetExhausted as exc:
        ...  # reply "refused" with str(exc); the federation goes on without this site
    metrics = report.metrics()                           # ε spent so far, δ, σ, steps

Only for ``privacy.mode: dp-sgd`` (a non-DP site trains with `Site.train`). A DP round trains
the same SAFN with the same loader, optimizer and `run_epochs` as a non-DP site, so DP and
non-DP sites share one parameter layout.

What happens in a DP round:

1. The run's **plan** is fetched from the ledger, or made once: σ calibrated so that the ledger's
   earlier spend composed with ``rounds × local_epochs × steps_per_epoch`` steps meets the site's
   ε at δ (`calibration.calibrate_noise`). Every later round and every restarted process of the
   same run reuses that σ.
2. Under the ledger lock, the round's steps are checked against the budget and **reserved**
   (written to disk) *before* training; a round that would not fit raises `BudgetExhausted`.
3. Opacus' ``PrivacyEngine.make_private`` wraps the SAFN model (``GradSampleModule``), the AdamW
   optimizer (``DPOptimizer``: per-sample clipping at ``max_grad_norm``, Gaussian noise σ·C) and the
   loader (``DPDataLoader``: Poisson sampling at rate q); `run_epochs` trains them. An empty
   Poisson batch still takes its noise-only step (as Opacus' accounting assumes), so the steps
   taken always equal the steps reserved.
4. The reservation is **confirmed** with the steps Opacus' own accountant counted; the weights
   leave with their plain names (no ``_module.`` prefix); ε spent so far is reported.

The noise and the Poisson sampling draw from `randomness`: Opacus' secure mode with
``privacy.secure_rng``; else seeded from the round's seed and the ledger entry when ``seeded``
(a simulation's virtual site: reproducible); else from the operating system's entropy (a
deployed site: a coordinator that knows the run's seed cannot regenerate the noise).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import safn_core.privacy.grad_samplers  # noqa: F401  (Opacus learns SAFN's own layers)
from safn_core.config import ModelConfig, PrivacyConfig, TrainConfig
from safn_core.data.cohort import Modality
from safn_core.federation.protocol import WITHHELD, Metric
from safn_core.model.feature_sparsity import lasso_step
from safn_core.privacy.budget import SiteBudget
from safn_core.privacy.calibration import calibrate_noise, sample_rate_for, steps_per_epoch
from safn_core.privacy.errors import BudgetExhausted, PrivacyError
from safn_core.privacy.ledger_file import now
from safn_core.privacy.randomness import NOISE, SAMPLING, torch_generator
from safn_core.training import local
from safn_core.training.local import Arrays, make_loader, make_model, make_optimizer

MODULE_PREFIX = "_module."


# ------------------------------------------------------------------------- parameter names


def strip_module_prefix(state: Mapping[str, object]) -> dict[str, object]:
    """State-dict keys as the federation knows them (Opacus' ``_module.`` removed)."""
    return {k[len(MODULE_PREFIX):] if k.startswith(MODULE_PREFIX) else k: v
            for k, v in state.items()}


def federation_state(model: nn.Module) -> dict[str, np.ndarray]:
    """The weights of ``model`` (plain or Opacus-wrapped) as plain-named numpy arrays."""
    inner = getattr(model, "_module", model)
    return {k: v.detach().cpu().numpy().copy() for k, v in inner.state_dict().items()}


def load_federation_state(model: nn.Module, state: Mapping[str, object]) -> None:
    """Load plain-named (or ``_module.``-named) weights into ``model`` (plain or wrapped)."""
    inner = getattr(model, "_module", model)
    inner.load_state_dict({k: torch.as_tensor(np.asarray(v)) if not torch.is_tensor(v) else v
                           for k, v in strip_module_prefix(state).items()})


# ----------------------------------------------------------------------------- the report


@dataclass
class RoundReport:
    """What a round did to the site's privacy. ``metrics()`` is what may leave the site."""

    dp: bool
    epsilon: float | None  # spent so far at delta, this round included (None: no DP)
    delta: float | None
    epsilon_budget: float | None
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int  # DP-SGD steps of this round
    total_steps: int  # every step the ledger charges
    n_train: int
    train_loss: float  # for the site's own log: NOT released by a DP site (outside ε)

    def metrics(self) -> dict[str, int | float]:
        """Flower-ready metrics, the same keys for DP and non-DP sites.

        ``epsilon`` is -1 for a site without DP (no guarantee, i.e. ε = ∞). The training loss
        is not included: it is an exact statistic of the training split (add it only for non-DP
        sites).
        """
        return {Metric.DP: int(self.dp),
                Metric.EPSILON: float(self.epsilon) if self.epsilon is not None else WITHHELD,
                Metric.DELTA: float(self.delta or 0.0),
                Metric.EPSILON_BUDGET: (float(self.epsilon_budget) if self.epsilon_budget
                                        else WITHHELD),
                Metric.NOISE_MULTIPLIER: float(self.noise_multiplier or 0.0),
                Metric.DP_STEPS: int(self.steps)}

    def to_dict(self) -> dict:
        return asdict(self)


class _NoiseStepOnEmptyBatch:
    """Iterate a DP loader; on an empty Poisson batch take Opacus' noise-only step first.

    `run_epochs` skips empty batches. Under DP-SGD a step must still happen (the sampled-Gaussian
    accounting counts every step and the mechanism releases noise when nothing was sampled), so
    the step is taken here with zero-size per-sample gradients: DPOptimizer clips nothing, adds
    N(0, σ²C²) noise and steps, and its accountant hook counts it.
    """

    def __init__(self, loader, optimizer):
        self.loader = loader
        self.optimizer = optimizer

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if len(batch[-1]) == 0:
                self.optimizer.zero_grad(set_to_none=True)
                for p in self.optimizer.params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                self.optimizer.step()
            yield batch


# ------------------------------------------------------------------------------ the facade


class SitePrivacy(SiteBudget):
    """A DP site's DP-SGD for one run: plan, budget checks, DP rounds (its `SiteBudget`: the
    settings, ledger and ε).

    Parameters (besides `SiteBudget`'s)
    -----------------------------------
    train: the preprocessed TRAINING split (the data DP-SGD protects and samples from).
    train_cfg: batch size, learning rate, weight decay (the same as a non-DP site).
    rounds, local_epochs: what this run plans (the rounds still to come when resuming a run).
    personal_epochs: epochs of personal training the run also plans at this site
        (``personalisation``: Ditto's per round, or fine-tuning's after the federation); they
        are DP-SGD steps on the same training split, so the plan's σ covers them too.
    run_id: identifies the run; its plan (σ) is stored in the ledger under this id.
    seeded: draw the noise and the Poisson batches from ``train_round``'s ``seed`` and the
        ledger entry (a simulation's virtual site: reproducible) instead of the operating
        system's entropy; ignored with ``privacy.secure_rng`` (Opacus' secure mode).
    """

    def __init__(self, cfg: PrivacyConfig, train: Arrays, train_cfg: TrainConfig, *,
                 rounds: int, local_epochs: int, run_id: str | int,
                 personal_epochs: int = 0, fingerprint: str | None = None,
                 ledger_path: str | Path | None = None,
                 state_dir: str | Path | None = None, site: str = "",
                 lock_timeout: float = 60.0, seeded: bool = False):
        super().__init__(cfg, len(train), fingerprint=fingerprint, ledger_path=ledger_path,
                         state_dir=state_dir, site=site, lock_timeout=lock_timeout)
        self.train = train
        self.train_cfg = train_cfg
        self.rounds = int(rounds)
        self.local_epochs = int(local_epochs)
        self.personal_epochs = int(personal_epochs)
        self.run_id = str(run_id)
        self.seeded = bool(seeded)
        self.sample_rate = sample_rate_for(self.n_train, train_cfg.batch_size)
        self.steps_per_epoch = steps_per_epoch(self.n_train, self.sample_rate)
        self._plan: dict | None = None

    # -- status ---------------------------------------------------------------------------------

    def metrics_now(self) -> dict[str, int | float]:
        """The `RoundReport.metrics` keys for a round that trained nothing (e.g. a refusal):
        ε spent so far, no steps."""
        plan = self.ledger.plan(self.run_id)
        return RoundReport(True, self.epsilon(), self.delta, self.epsilon_budget,
                           plan["noise_multiplier"] if plan else None, self.sample_rate, 0,
                           self.ledger.charged_steps(), self.n_train, float("nan")).metrics()

    def steps_per_round(self, epochs: int | None = None) -> int:
        return (epochs or self.local_epochs) * self.steps_per_epoch

    # -- the run's plan ---------------------------------------------------------------------------

    def plan(self) -> dict:
        """This run's calibrated plan (σ for all its rounds), made once and kept in the ledger."""
        if self._plan is not None:
            return self._plan
        with self.ledger.transaction():
            plan = self.ledger.plan(self.run_id)
            if plan is None:
                total = (self.rounds * self.steps_per_round()
                         + self.personal_epochs * self.steps_per_epoch)
                history = self.ledger.history()
                try:
                    sigma = calibrate_noise(target_epsilon=self.epsilon_budget, delta=self.delta,
                                            sample_rate=self.sample_rate, steps=total,
                                            accountant=self.cfg.accountant, prior=history)
                except BudgetExhausted as exc:
                    raise BudgetExhausted(
                        f"{self._who}privacy budget exhausted, the site does not train in run "
                        f"{self.run_id}: {exc}. Its ledger {self.ledger.path} keeps every earlier "
                        f"release; only the site may raise privacy.epsilon, if its governance "
                        f"allows", spent=exc.spent, budget=exc.budget) from None
                if sigma > self.cfg.max_noise_multiplier:
                    spent = self.accountant.epsilon(history)
                    raise BudgetExhausted(
                        f"{self._who}privacy budget nearly exhausted, the site does not train "
                        f"in run {self.run_id}: ε spent so far {spent:.4g} of "
                        f"{self.epsilon_budget:g}; the {total} DP-SGD steps of this run would "
                        f"need noise σ = {sigma:.3g}, above privacy.max_noise_multiplier = "
                        f"{self.cfg.max_noise_multiplier:g}, so its updates would be mostly "
                        f"noise. Plan fewer rounds or local epochs, or (if the site's "
                        f"governance allows) raise privacy.epsilon. Ledger: {self.ledger.path}",
                        spent=spent, budget=self.epsilon_budget)
                plan = {"run_id": self.run_id, "created": now(), "noise_multiplier": sigma,
                        "sample_rate": self.sample_rate, "steps_per_epoch": self.steps_per_epoch,
                        "local_epochs": self.local_epochs, "rounds": self.rounds,
                        "personal_epochs": self.personal_epochs,
                        "planned_steps": total, "n_train": self.n_train,
                        "batch_size": self.train_cfg.batch_size,
                        "max_grad_norm": self.cfg.max_grad_norm,
                        "epsilon_budget": self.epsilon_budget, "delta": self.delta,
                        "accountant": self.cfg.accountant,
                        "epsilon_before": self.accountant.epsilon(history),
                        "epsilon_planned": self.accountant.epsilon(
                            history + [(sigma, self.sample_rate, total)])}
                self.ledger.set_plan(self.run_id, plan)
        for key, mine in (("sample_rate", self.sample_rate),
                          ("steps_per_epoch", self.steps_per_epoch),
                          ("max_grad_norm", self.cfg.max_grad_norm)):
            if plan[key] != mine:
                raise PrivacyError(
                    f"{self._who}run {self.run_id} was planned with {key} = {plan[key]} but now "
                    f"has {mine} (training split or batch size changed mid-run); start a new run")
        self._plan = plan
        return plan

    @property
    def noise_multiplier(self) -> float:
        return float(self.plan()["noise_multiplier"])

    # -- before a round --------------------------------------------------------------------------

    def check_round(self, server_round: int | None = None,
                    epochs: int | None = None) -> float:
        """Raise `BudgetExhausted` if this round would not fit; else return ε after it.

        Nothing is spent. (`train_round` checks again under the ledger lock before reserving.)
        """
        sigma = self.noise_multiplier
        history = self.ledger.history()
        return self._fit_or_raise(history, sigma, self.steps_per_round(epochs), server_round)

    def would_fit(self, epochs: int | None = None) -> bool:
        """Whether the next round fits the budget; spends nothing."""
        try:
            self.check_round(None, epochs)
        except BudgetExhausted:
            return False
        return True

    def _fit_or_raise(self, history, sigma: float, steps: int, server_round) -> float:
        after = self.accountant.epsilon_after(history, [(sigma, self.sample_rate, steps)])
        if after > self.epsilon_budget:
            spent = self.accountant.epsilon(history)
            rnd = f"round {server_round}" if server_round is not None else "the next round"
            raise BudgetExhausted(
                f"{self._who}privacy budget exhausted: ε spent so far {spent:.4g} of "
                f"{self.epsilon_budget:g} (δ = {self.delta:.3g}, {self.cfg.accountant} "
                f"accountant); {rnd} would take {steps} more DP-SGD steps (σ = {sigma:.4g}, "
                f"q = {self.sample_rate:.4g}) and bring ε to {after:.4g}. The site stops "
                f"training; the other sites go on. Ledger: {self.ledger.path}",
                spent=spent, budget=self.epsilon_budget, needed=after)
        return after

    # -- a round ----------------------------------------------------------------------------------

    def train_round(self, state: Mapping[str, object], modalities: Sequence[Modality],
                    model_cfg: ModelConfig, class_counts, *, server_round: int | None,
                    seed: int, proximal_mu: float = 0.0,
                    epochs: int | None = None, kind: str = "train",
                    anchor: Mapping[str, object] | None = None, target=None
                    ) -> tuple[dict[str, np.ndarray], RoundReport]:
        """One DP-SGD round of local training from the global weights ``state``.

        Returns the new weights (plain parameter names, the layout of a non-DP site) and the
        round's `RoundReport`. A round that does not fit raises `BudgetExhausted` before
        anything is trained or spent. ``kind`` names the ledger entry (``"train"``: the
        federation's model; ``"personal"``: the site's own, `safn_core.federation.personal_training`).
        ``anchor``: the weights the proximal term pulls towards (default ``state``; Ditto
        starts from the personal model and pulls it towards the global one). ``target``: the
        site's `safn_core.targets.Target` (K outputs; None: the binary pd_vs_hc model).
        """
        from opacus import PrivacyEngine

        epochs = int(epochs or self.local_epochs)
        torch.manual_seed(seed)
        model = make_model(tuple(modalities), model_cfg, seed, target=target)
        load_federation_state(model, state)
        optimizer = make_optimizer(model, self.train_cfg)
        plan = self.plan()
        sigma, q = float(plan["noise_multiplier"]), self.sample_rate
        steps = self.steps_per_round(epochs)
        with self.ledger.transaction():  # check and reserve atomically, BEFORE training
            self._fit_or_raise(self.ledger.history(), sigma, steps, server_round)
            seq = self.ledger.reserve(kind=kind, run_id=self.run_id, round=server_round,
                                      noise_multiplier=sigma, sample_rate=q, steps=steps)
        # From here a failure leaves the reservation charged in full.
        global_params = {id(p): p.detach().clone() for p in model.parameters()}
        if anchor is not None:
            global_params = {id(p): a for p, a in
                             zip(model.parameters(), local.parameters_like(model, anchor))}
        secure = bool(self.cfg.secure_rng)
        material = (seed, seq) if self.seeded and not secure else None
        # the Poisson sampler draws from the loader's generator (secure mode: Opacus' own)
        loader = make_loader(self.train, self.train_cfg.batch_size,
                             torch_generator(material, SAMPLING).initial_seed())
        with warnings.catch_warnings():
            # Opacus warns when its secure mode is off; docs/privacy.md says why it is here
            warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
            engine = PrivacyEngine(accountant=self.cfg.accountant, secure_mode=secure)
            dp_model, dp_opt, dp_loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
                max_grad_norm=self.cfg.max_grad_norm, poisson_sampling=True,
                **({} if secure else {"noise_generator": torch_generator(material, NOISE)}))
        if abs(dp_loader.sample_rate - q) > 1e-15 or len(dp_loader) != self.steps_per_epoch:
            raise PrivacyError(f"{self._who}Opacus samples at q = {dp_loader.sample_rate} with "
                               f"{len(dp_loader)} steps per epoch, the plan at q = {q} with "
                               f"{self.steps_per_epoch}; refusing to train off-plan")
        if proximal_mu > 0:
            # FedProx under DP: μ(w − w_global) is data-independent, so it is added to the
            # privatised gradient after clipping and noise (it never enters per-sample clipping)
            account = dp_opt.step_hook

            def hook(opt, _account=account):
                _account(opt)
                for p in opt.params:
                    p.grad.add_(p.detach() - global_params[id(p)], alpha=proximal_mu)

            dp_opt.attach_step_hook(hook)
        with warnings.catch_warnings():
            # Opacus' hooks on the first layers, whose inputs need no gradient: harmless
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
            # the group-lasso step on the released weights: post-processing, no privacy cost
            loss = local.run_epochs(dp_model, _NoiseStepOnEmptyBatch(dp_loader, dp_opt), dp_opt,
                                    epochs, model_cfg, class_counts,
                                    after_step=lasso_step(dp_model, dp_opt,
                                                          model_cfg.feature_lasso))
        taken = [(float(s), float(r), int(n)) for s, r, n in engine.accountant.history]
        if any(s != sigma or r != q for s, r, _ in taken):
            raise PrivacyError(f"{self._who}Opacus accounted releases {taken} that differ from "
                               f"the plan (σ = {sigma}, q = {q})")
        steps_taken = sum(n for _, _, n in taken)
        self.ledger.confirm(seq, steps_taken)
        new_state = federation_state(dp_model)
        return new_state, RoundReport(
            True, self.epsilon(), self.delta, self.epsilon_budget, sigma, q, steps_taken,
            self.ledger.charged_steps(), self.n_train, float(loss))
