"""Training methods as strategies plugged into the one training loop.

A method turns (model, optimizer, loader) into what the loop iterates and steps, and
reports its privacy state after each epoch. ``non_dp`` leaves them alone; the private
methods go through Opacus's ``PrivacyEngine.make_private`` — whose Poisson-sampling
data loader the loop must iterate — with :class:`StudyDPOptimizer` as the optimizer.
With ``privacy_unit=subject`` the loader samples whole subjects instead (its q and steps
are what the accountant is told) and the optimizer clips each subject's summed gradient.
"""

from __future__ import annotations

import secrets
import warnings

import torch
from opacus import PrivacyEngine

from .config import RunConfig
from .data.units import unit_loader
from .errors import ConfigError
from .device import model_device
from .privacy import one_run_audit
from .privacy.accounting import calibrate_noise
from .privacy.canaries import GradientCanaries
from .privacy.conv_grad_sample import use_native_conv_grad_sample
from .privacy.ghost import BookKeepingDPOptimizer, BookKeepingModule
from .privacy.optimizer import StudyDPOptimizer
from .privacy.sparsification import Sparsifier


# Opacus warns on every run that secure RNG is off (we seed the noise for reproducible
# studies) and on every backward that the input needs no gradient (it never does here).
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def random_seed(cfg: RunConfig, stream: int) -> int:
    """Seed of one random stream (0 Poisson sampling, 1 noise, 2 masks, 3 augmentation,
    4 audit canaries, 5 audit canary images): ``cfg.seed + stream``, or a fresh draw
    from the operating system's entropy (``randomness = "os_entropy"``), so that nobody
    holding ``config.json`` can regenerate the noise."""
    return cfg.seed + stream if cfg.randomness == "seeded" else secrets.randbits(63)


class NonPrivate:
    """Ordinary training: the reference point of every comparison."""

    private = False

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.noise_multiplier = None
        self.sample_rate = None
        self.n_units = None     # privacy units in the training set (B-scans or subjects)
        self.canaries = None    # white-box audit canaries (``audit_canaries``)

    def attach(self, model, optimizer, loader):
        if self.cfg.audit_canaries:   # unclipped and un-noised, as one more sample's gradient
            canaries = self._canaries(optimizer, self.cfg.batch_size / len(loader.dataset))
            params = self._audited(optimizer)

            def insert(*_):
                values = canaries.values(canaries.draw()) / self.cfg.batch_size
                canaries.add_to([p.grad for p in params], values)
                canaries.observe([p.grad for p in params])

            optimizer.register_step_pre_hook(insert)
        return model, optimizer, loader

    @staticmethod
    def _audited(optimizer) -> list:
        return [p for group in optimizer.param_groups for p in group["params"]
                if p.requires_grad]

    def _canaries(self, optimizer, sample_rate: float) -> GradientCanaries:
        self.canaries = GradientCanaries([p.shape for p in self._audited(optimizer)],
                                         self.cfg.audit_canaries, self.cfg.max_grad_norm,
                                         sample_rate, random_seed(self.cfg, 4))
        return self.canaries

    def canary_audit(self) -> dict | None:
        """The white-box one-run audit of this run (None without canaries): the ε lower
        bound its canaries' scores support, at the run's δ."""
        if self.canaries is None:
            return None
        return {"variant": "white-box", "steps": self.canaries.steps,
                **one_run_audit.audit(self.canaries.scores.numpy(),
                                      self.canaries.included.numpy(), self.cfg.delta)}

    def before_step(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        """Called before the first physical batch of every logical step."""

    def epoch_stats(self) -> dict:
        return {"epsilon": float("nan"), "steps": None, "grad_norm_median": float("nan"),
                "clipped_fraction": float("nan"), "sparsity": float("nan")}


class _StudyPrivacyEngine(PrivacyEngine):
    """PrivacyEngine whose optimizer is always :class:`StudyDPOptimizer` (with
    ``bookkeeping``: the model is a :class:`BookKeepingModule` and the optimizer its
    :class:`BookKeepingDPOptimizer`, see :mod:`dpstudy.privacy.ghost`)."""

    def __init__(self, optimizer_kwargs: dict, accountant: str, bookkeeping: bool = False):
        super().__init__(accountant=accountant)
        self._optimizer_kwargs = optimizer_kwargs
        self._bookkeeping = bookkeeping

    def _prepare_model(self, module, **kwargs):
        if not self._bookkeeping:
            return super()._prepare_model(module, **kwargs)
        self.validate(module=module, optimizer=None, data_loader=None)
        return BookKeepingModule(module, kwargs.get("loss_reduction", "mean"))

    def _prepare_optimizer(self, *, optimizer, noise_multiplier, max_grad_norm,
                           expected_batch_size, loss_reduction="mean", noise_generator=None,
                           **_ignored):
        cls = BookKeepingDPOptimizer if self._bookkeeping else StudyDPOptimizer
        return cls(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                   expected_batch_size=expected_batch_size, loss_reduction=loss_reduction,
                   generator=noise_generator, **self._optimizer_kwargs)


class Private(NonPrivate):
    """DP training on Opacus; subclasses choose the clip function and sparsification."""

    private = True
    clip_fn = "abadi"

    def _optimizer_kwargs(self, model) -> dict:
        return {"clip_fn": self.clip_fn, "gamma": self.cfg.gamma,
                "per_layer": self.cfg.clipping == "per_layer",
                "aug_multiplicity": self.cfg.aug_multiplicity,
                "unit_sizes": self._unit_sizes}

    def attach(self, model, optimizer, loader):
        """Make the model private, then set σ from what the accountant will be told.

        Opacus's Poisson loader samples at q = 1/len(loader) but runs int(1/q) steps an
        epoch and tells the accountant 1/(that); σ is calibrated to exactly those
        numbers, read back from the returned loader, not from our own arithmetic.
        """
        cfg = self.cfg
        by_subject = cfg.privacy_unit == "subject"
        self._unit_sizes = None
        if by_subject:  # Poisson sampling of subjects replaces Opacus's of B-scans
            loader = unit_loader(loader.dataset, cfg.batch_size, loader.generator)
            sampler = loader.batch_sampler
            self._unit_sizes = lambda: sampler.sizes
            self.n_units = len(sampler.groups)
            if cfg.delta >= 1.0 / self.n_units:
                raise ConfigError(f"delta={cfg.delta:g} must be < 1/N = {1.0 / self.n_units:.3g}"
                                  f" (N = {self.n_units} training subjects)")
        else:
            self.n_units = len(loader.dataset)
        ours = cfg.grad_sample_mode in ("native_conv", "ghost_mixed")  # not Opacus's modes
        self.engine = _StudyPrivacyEngine(self._optimizer_kwargs(model), cfg.accountant,
                                          bookkeeping=cfg.grad_sample_mode == "ghost_mixed")
        model, optimizer, loader = self.engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=cfg.noise_multiplier or 1.0, max_grad_norm=cfg.max_grad_norm,
            poisson_sampling=not by_subject,
            grad_sample_mode="hooks" if ours else cfg.grad_sample_mode,
            noise_generator=torch.Generator(model_device(model)).manual_seed(random_seed(cfg, 1)))
        self.sample_rate = float(getattr(loader, "sample_rate", None)
                                 or loader.batch_sampler.sample_rate)
        self.accountant_sample_rate = 1.0 / len(loader)
        if cfg.target_epsilon is not None:
            optimizer.noise_multiplier = calibrate_noise(
                cfg.target_epsilon, self.accountant_sample_rate, cfg.epochs * len(loader),
                cfg.delta, cfg.accountant)
        self.noise_multiplier = optimizer.noise_multiplier
        # the update is divided by the expected number of units, as Opacus computes it for
        # samples (the same value in B-scan mode)
        optimizer.expected_batch_size = int(self.n_units * self.sample_rate)
        if cfg.grad_sample_mode == "native_conv":   # Opacus's hooks, dpstudy's conv sampler
            use_native_conv_grad_sample(model)
        if cfg.audit_canaries:   # sampled like a unit, at the rate the accountant is told
            optimizer.canaries = self._canaries(optimizer.original_optimizer,
                                                self.accountant_sample_rate)
        self.optimizer = optimizer
        return model, optimizer, loader

    def epoch_stats(self) -> dict:
        return {"epsilon": float(self.engine.get_epsilon(self.cfg.delta)),
                "steps": sum(steps for _, _, steps in self.engine.accountant.history),
                **self.optimizer.pop_grad_stats(), "sparsity": float("nan")}


class DPSGD(Private):
    """Abadi et al.: clip each per-sample gradient to norm C."""


class AutoClip(Private):
    """Bu et al.: normalise each per-sample gradient, g/(‖g‖+γ); no threshold to tune."""

    clip_fn = "automatic"


class RandomSparsification(Private):
    """Zhu & Blaschko: mask each per-sample gradient before clipping; noise on kept coords."""

    @property
    def clip_fn(self):
        return self.cfg.clip_fn

    def _optimizer_kwargs(self, model) -> dict:
        shapes = [p.shape for p in model.parameters() if p.requires_grad]
        self.sparsifier = Sparsifier(shapes, self.cfg.final_rate, self.cfg.refresh,
                                     self.cfg.epochs, seed=random_seed(self.cfg, 2),
                                     device=model_device(model))
        return {**super()._optimizer_kwargs(model), "sparsifier": self.sparsifier}

    def before_step(self, epoch, step, steps_per_epoch):
        self.sparsifier.maybe_refresh(epoch, step, steps_per_epoch)

    def epoch_stats(self) -> dict:
        return {**super().epoch_stats(), "sparsity": self.sparsifier.rate}


METHOD_CLASSES = {"non_dp": NonPrivate, "dp_sgd": DPSGD, "auto_clip": AutoClip,
                  "random_sparsification": RandomSparsification}


def build_method(cfg: RunConfig) -> NonPrivate:
    return METHOD_CLASSES[cfg.method](cfg)
