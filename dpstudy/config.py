"""Run configuration: every hyperparameter of one training run, validated up front.

A run's identity is the hash of its full configuration, so two runs with the same
settings (seed included) land in the same run directory and a sweep can skip them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass

from .errors import ConfigError

MODELS = ("unet", "nested_unet")
METHODS = ("non_dp", "dp_sgd", "auto_clip", "random_sparsification")
DP_METHODS = METHODS[1:]
CLIPPING_STYLES = ("flat", "per_layer")
CLIP_FUNCTIONS = ("abadi", "automatic")
OPTIMIZERS = ("adam", "sgd")
ACCOUNTANTS = ("rdp", "prv", "pld")
GRAD_SAMPLE_MODES = ("hooks", "functorch", "native_conv", "ghost_mixed")
DEVICES = ("auto", "cpu", "cuda", "mps")
LR_SCHEDULES = ("constant", "cosine")
#: ``per_image``: each image standardised by its own pixels (nothing learned from the
#: training split, so nothing escapes ε); ``train_split``: the split's mean/std, which
#: a private run may not use (they are released without noise).
NORMALISATIONS = ("per_image", "train_split")
#: ``seeded``: noise and Poisson sampling drawn from the run's seed (reproducible research);
#: ``os_entropy``: from the operating system, so no one holding config.json can regenerate
#: the noise — what a model that is released needs.
RANDOMNESS = ("seeded", "os_entropy")
#: Which parameters a run trains (the rest stay at their starting weights, get no gradient
#: and no noise): all; GroupNorm affine + biases + head (DP-BiTFiT, Bu et al. 2022); the
#: decoder (up-sampling path and head); low-rank adapters on every convolution but the head
#: (LoRA, rank ``adapter_rank``) with what norm_bias trains.
TRAINABLE = ("all", "norm_bias", "decoder", "adapters")
#: Test-time augmentation of every prediction a run makes (validation, saved masks, rescoring).
TTA = ("none", "flip")
#: what one (ε, δ) protects: one B-scan, or all B-scans of one subject (patient)
PRIVACY_UNITS = ("bscan", "subject")

#: Default learning rates by (method, optimizer). With SGD, Automatic Clipping's summed
#: update has per-sample norm ≈1 where flat clipping's is ≤C, and it is not divided
#: by anything threshold-like, so its learning rate lives on a different scale
#: (Bu et al.: AC at lr η ≈ flat clipping at lr η/C). Adam is invariant to that scale,
#: which is why all DP methods share one Adam default. Non-private Adam at 5e-3: on the
#: phantom (U-Net, width 8, 128², 15 epochs) it reached foreground Dice 0.30 where 1e-3
#: reached 0.16 — with 9 steps per epoch, a small learning rate barely moves.
DEFAULT_LR = {
    ("non_dp", "adam"): 5e-3,
    ("dp_sgd", "adam"): 2e-3,
    ("auto_clip", "adam"): 2e-3,
    ("random_sparsification", "adam"): 2e-3,
    ("non_dp", "sgd"): 0.05,
    ("dp_sgd", "sgd"): 0.5,
    ("auto_clip", "sgd"): 0.5,
    ("random_sparsification", "sgd"): 0.5,
}


#: Fields added after runs were first stored, with the value that reproduces the
#: behaviour before them: left out of the hash at that value, so stored run ids stay
#: valid, and given to a stored config that lacks the field (:meth:`RunConfig.from_stored`).
#: For most it is the default; ``normalisation``'s default changed (training-split
#: statistics escaped ε), so new runs hash it and old ones keep their ids.
HASH_NEUTRAL_DEFAULTS = {"audit_holdout": 0.0, "normalisation": "train_split",
                         "ema_decay": 0.0, "trainable": "all", "fluid_weight": 1.0,
                         "privacy_unit": "bscan", "device": "auto", "audit_canaries": 0,
                         "audit_canary_images": 0, "tta": "none", "adapter_rank": 8}
#: Fields that never enter the hash: how the randomness was drawn does not make another
#: experiment, and an os_entropy run cannot be reproduced from its config anyway; the
#: device is where a run computes, not what (config.json records the one it ran on).
HASH_EXCLUDED = ("randomness", "device")


@dataclass(frozen=True)
class RunConfig:
    """All settings of one run. ``None`` in ``lr`` means the method's default."""

    model: str = "unet"
    method: str = "non_dp"
    base_width: int = 16
    depth: int = 4
    # privacy
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    clipping: str = "flat"
    clip_fn: str = "abadi"          # only random_sparsification chooses; others fix it
    gamma: float = 0.01             # Automatic Clipping stability constant (0 = AUTO-V)
    final_rate: float = 0.9         # Random Sparsification r*
    refresh: int = 1                # Random Sparsification masks per epoch
    delta: float = 1e-5
    accountant: str = "rdp"
    privacy_unit: str = "bscan"     # "subject": Poisson-sample patients, clip each one's sum
    grad_sample_mode: str = "ghost_mixed"   # fastest on CPU (bench/dp_step.py, README Speed)
    # optimisation
    epochs: int = 10
    batch_size: int = 8
    max_physical_batch: int | None = None
    lr: float | None = None
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    ema_decay: float = 0.0          # EMA of the weights (De et al. 2022); 0 = off
    tta: str = "none"               # "flip": logits averaged with the mirrored B-scan's
    trainable: str = "all"
    adapter_rank: int = 8           # rank of the low-rank adapters (trainable="adapters")
    dice_weight: float = 1.0
    fluid_weight: float = 1.0       # weight of the fluid class in the cross-entropy
    augment: bool = False
    aug_multiplicity: int = 1       # K augmented copies per sample, averaged before clipping
    # data
    image_size: tuple[int, int] = (128, 128)
    data: str = "synthetic"
    normalisation: str = "per_image"
    limit: int | None = None
    audit_holdout: float = 0.0      # share of each training subject's scans kept out (MIA)
    init_from: str | None = None    # run id of a completed run whose weights start training
    audit_canaries: int = 0         # m white-box gradient canaries (one-run audit); 0 = none
    audit_canary_images: int = 0    # m canary B-scans (input-space one-run audit); 0 = none
    seed: int = 0
    randomness: str = "seeded"
    device: str = "auto"            # auto | cpu | cuda | mps; not part of the run id

    def __post_init__(self):
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        validate(self)

    @property
    def private(self) -> bool:
        return self.method != "non_dp"

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[(self.method, self.optimizer)]

    @property
    def effective_clip_fn(self) -> str:
        """Clip function actually applied: fixed by the method except for sparsification."""
        return {"dp_sgd": "abadi", "auto_clip": "automatic"}.get(self.method, self.clip_fn)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_stored(cls, d: dict, where: str = "config") -> "RunConfig":
        """A config read back from the store: fields it predates take the value that
        reproduces how it was trained."""
        return cls.from_dict({**HASH_NEUTRAL_DEFAULTS, **d}, where=where)

    def config_hash(self) -> str:
        fields = {k: v for k, v in self.to_dict().items() if k not in HASH_EXCLUDED and (
            k not in HASH_NEUTRAL_DEFAULTS or v != HASH_NEUTRAL_DEFAULTS[k])}
        blob = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:8]

    def run_id(self) -> str:
        """Readable and unique: model, method, noise setting and the config hash."""
        if not self.private:
            noise = "nonpriv"
        elif self.target_epsilon is not None:
            noise = f"eps{self.target_epsilon:g}"
        else:
            noise = f"sigma{self.noise_multiplier:g}"
        return f"{self.model}-{self.method}-{noise}-{self.config_hash()}"

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)


def _choice(value, options, name):
    if value not in options:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {', '.join(options)}")


def _positive(value, name, allow_none=False):
    if value is None and allow_none:
        return
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0
            or value == float("inf")):
        raise ConfigError(f"{name}={value!r} must be a finite number > 0")


def validate(cfg: RunConfig) -> None:
    """Checks that need no data; data-dependent checks (δ < 1/N, batch ≤ N) run in training."""
    _choice(cfg.model, MODELS, "model")
    _choice(cfg.method, METHODS, "method")
    _choice(cfg.clipping, CLIPPING_STYLES, "clipping")
    _choice(cfg.clip_fn, CLIP_FUNCTIONS, "clip_fn")
    _choice(cfg.optimizer, OPTIMIZERS, "optimizer")
    _choice(cfg.accountant, ACCOUNTANTS, "accountant")
    _choice(cfg.privacy_unit, PRIVACY_UNITS, "privacy_unit")
    _choice(cfg.grad_sample_mode, GRAD_SAMPLE_MODES, "grad_sample_mode")
    _choice(cfg.lr_schedule, LR_SCHEDULES, "lr_schedule")
    _choice(cfg.normalisation, NORMALISATIONS, "normalisation")
    _choice(cfg.randomness, RANDOMNESS, "randomness")
    _choice(cfg.trainable, TRAINABLE, "trainable")
    _choice(cfg.tta, TTA, "tta")
    _choice(cfg.device, DEVICES, "device")
    for name in ("base_width", "depth", "epochs", "batch_size", "refresh", "aug_multiplicity",
                 "adapter_rank"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name}={v!r} must be an integer ≥ 1")
    if not isinstance(cfg.audit_canaries, int) or cfg.audit_canaries < 0:
        raise ConfigError(f"audit_canaries={cfg.audit_canaries!r} must be an integer ≥ 0 "
                          f"(0: no one-run audit)")
    if (not isinstance(cfg.audit_canary_images, int) or isinstance(cfg.audit_canary_images, bool)
            or cfg.audit_canary_images < 0):
        raise ConfigError(f"audit_canary_images={cfg.audit_canary_images!r} must be an integer "
                          f"≥ 0: the number of canary B-scans of the input-space one-run "
                          f"audit (0: none)")
    for name in ("max_physical_batch", "limit"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ConfigError(f"{name}={v!r} must be an integer ≥ 1 or unset")
    _positive(cfg.max_grad_norm, "max_grad_norm")
    _positive(cfg.lr, "lr", allow_none=True)
    if not 0.0 < cfg.delta < 1.0:
        raise ConfigError(f"delta={cfg.delta!r} must lie in (0, 1)")
    if not (isinstance(cfg.audit_holdout, (int, float)) and 0.0 <= cfg.audit_holdout < 1.0):
        raise ConfigError(f"audit_holdout={cfg.audit_holdout!r} must lie in [0, 1)")
    if not 0.0 <= cfg.final_rate < 1.0:
        raise ConfigError(f"final_rate={cfg.final_rate!r} must lie in [0, 1)")
    if not cfg.gamma >= 0:
        raise ConfigError(f"gamma={cfg.gamma!r} must be ≥ 0 (0.01 is AUTO-S, 0 is AUTO-V)")
    if cfg.aug_multiplicity > 1 and not cfg.augment:
        raise ConfigError(f"aug_multiplicity={cfg.aug_multiplicity} needs augment=True "
                          f"(--augment): the copies would be identical")
    if cfg.adapter_rank != HASH_NEUTRAL_DEFAULTS["adapter_rank"] and cfg.trainable != "adapters":
        raise ConfigError(f"adapter_rank={cfg.adapter_rank} needs trainable='adapters' "
                          f"(--trainable adapters): without adapters it changes nothing")
    if not (cfg.weight_decay >= 0 and cfg.dice_weight >= 0):
        raise ConfigError("weight_decay and dice_weight must be ≥ 0")
    _positive(cfg.fluid_weight, "fluid_weight")
    if not (isinstance(cfg.ema_decay, (int, float)) and 0.0 <= cfg.ema_decay < 1.0):
        raise ConfigError(f"ema_decay={cfg.ema_decay!r} must lie in [0, 1) (0 = no weight "
                          f"averaging; e.g. 0.99)")
    if len(cfg.image_size) != 2 or min(cfg.image_size) < 1:
        raise ConfigError(f"image_size={cfg.image_size!r} must be two positive integers H W")
    divisor = 2 ** cfg.depth
    for v in cfg.image_size:
        if v % divisor:
            lo, hi = (v // divisor) * divisor, (v // divisor + 1) * divisor
            valid = f"{lo} or {hi}" if lo else f"{hi}"
            raise ConfigError(
                f"image_size {cfg.image_size[0]}x{cfg.image_size[1]}: {v} is not divisible by "
                f"{divisor} (2**depth, depth={cfg.depth}); use e.g. {valid}")
    if cfg.init_from is not None and (  # the rule of store.validate_run_id
            not isinstance(cfg.init_from, str) or ".." in cfg.init_from
            or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}", cfg.init_from)):
        raise ConfigError(f"init_from={cfg.init_from!r} must be a run id from the store")
    if cfg.privacy_unit == "subject" and not cfg.private:
        raise ConfigError("privacy_unit=subject needs a DP method; non_dp protects no unit")
    if cfg.privacy_unit == "subject" and cfg.max_physical_batch is not None:
        raise ConfigError(f"max_physical_batch={cfg.max_physical_batch} cannot be used with "
                          f"privacy_unit=subject: a subject's B-scans are summed before "
                          f"clipping, so its batch cannot be split")
    if cfg.private:
        if (cfg.noise_multiplier is None) == (cfg.target_epsilon is None):
            raise ConfigError(
                f"method {cfg.method} needs exactly one of noise_multiplier "
                f"(--noise-multiplier) or target_epsilon (--target-epsilon)")
        _positive(cfg.noise_multiplier, "noise_multiplier", allow_none=True)
        _positive(cfg.target_epsilon, "target_epsilon", allow_none=True)
    elif cfg.noise_multiplier is not None or cfg.target_epsilon is not None:
        raise ConfigError("method non_dp takes no noise_multiplier or target_epsilon")
