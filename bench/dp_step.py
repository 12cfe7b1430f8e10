"""Per-step cost of each DP method relative to non-private training, in one process.

Every variant (model × method × grad-sample mode × memory format) trains on the same
fixed batch on the same machine, and the variants take turns round by round, so a
change in machine load hits all of them alike and the ratios to the non-private
baseline stay meaningful on a shared CPU. Each step is split by timers into forward,
backward (per-sample gradients are computed here, by hooks or functorch), clip
(per-sample norms, clip factors, masked sum), noise and update (the optimizer step).

    python bench/dp_step.py --quick                 # < 1 min, smoke check
    python bench/dp_step.py --out results/bench     # the measurement (see README.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from dpstudy.config import DP_METHODS, GRAD_SAMPLE_MODES, MODELS, RunConfig
from dpstudy.losses import per_sample_loss
from dpstudy.methods import build_method
from dpstudy.models import build_model
from dpstudy.train import _optimizer, package_versions

PHASES = ("forward", "backward", "clip", "noise", "update")
#: Many short rounds rather than a few long ones: load changes then average out over all
#: variants. ``threads`` is what one training run gets (all cores with --jobs 1).
FULL = dict(base_width=16, depth=4, image_size=128, batch_size=8, rounds=10, steps=2, warmup=2,
            threads=os.cpu_count() or 1)
QUICK = dict(base_width=8, depth=2, image_size=64, batch_size=4, rounds=3, steps=1, warmup=1,
             threads=1)


@dataclass
class Variant:
    model_name: str
    method: str
    mode: str | None          # grad-sample mode; None for the non-private baseline
    channels_last: bool
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    times: dict[str, list[float]] = field(
        default_factory=lambda: {p: [] for p in (*PHASES, "total")})
    pending: dict[str, float] = field(default_factory=dict)

    def timed(self, phase: str, fn):
        """Wrap an optimizer method so its time is booked to ``phase`` of this step."""
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.pending[phase] = self.pending.get(phase, 0.0) + time.perf_counter() - t0
            return out
        return wrapper


def build_variant(model_name, method, mode, channels_last, x, y, args) -> Variant:
    cfg = RunConfig(model=model_name, method=method, base_width=args.base_width, depth=args.depth,
                    image_size=(args.image_size, args.image_size), batch_size=args.batch_size,
                    epochs=1, noise_multiplier=None if method == "non_dp" else 1.0,
                    grad_sample_mode=mode or "hooks")
    model = build_model(model_name, cfg.base_width, cfg.depth)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    strategy = build_method(cfg)
    loader = DataLoader(TensorDataset(x, y), batch_size=cfg.batch_size)
    model, optimizer, _ = strategy.attach(model, _optimizer(cfg, model), loader)
    strategy.before_step(0, 0, 1)        # Random Sparsification: draw the (final) mask
    v = Variant(model_name, method, mode, channels_last, model, optimizer)
    if strategy.private:
        optimizer.clip_and_accumulate = v.timed("clip", optimizer.clip_and_accumulate)
        optimizer.add_noise = v.timed("noise", optimizer.add_noise)
    return v


def train_step(v: Variant, x, y, record: bool) -> None:
    v.optimizer.zero_grad(set_to_none=True)
    v.pending = {}
    t0 = time.perf_counter()
    losses = per_sample_loss(v.model(x), y)
    t1 = time.perf_counter()
    (losses.sum() / len(losses)).backward()
    t2 = time.perf_counter()
    v.optimizer.step()
    t3 = time.perf_counter()
    if record:
        clip, noise = v.pending.get("clip", 0.0), v.pending.get("noise", 0.0)
        for phase, seconds in zip((*PHASES, "total"),
                                  (t1 - t0, t2 - t1, clip, noise, t3 - t2 - clip - noise, t3 - t0)):
            v.times[phase].append(seconds)


def run(args) -> pd.DataFrame:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    n, size = args.batch_size, args.image_size
    x_all, y_all = torch.randn(4 * n, 1, size, size), torch.randint(0, 9, (4 * n, size, size))
    formats = (False, True) if args.channels_last else (False,)
    variants = []
    for model_name in args.models:
        for cl in formats:
            variants.append(build_variant(model_name, "non_dp", None, cl, x_all, y_all, args))
            variants += [build_variant(model_name, m, mode, cl, x_all, y_all, args)
                         for mode in args.modes for m in DP_METHODS]
    batch = {cl: (x_all[:n].contiguous(memory_format=torch.channels_last) if cl else x_all[:n],
                  y_all[:n]) for cl in formats}
    for r in range(args.rounds + 1):            # round 0 only warms up
        for v in variants:
            for _ in range(args.warmup if r == 0 else args.steps):
                train_step(v, *batch[v.channels_last], record=r > 0)
    rows = [{"model": v.model_name,
             "memory_format": "channels_last" if v.channels_last else "contiguous",
             "method": v.method, "grad_sample_mode": v.mode or "-",
             **{f"{p}_ms": 1e3 * statistics.median(v.times[p]) for p in (*PHASES, "total")}}
            for v in variants]
    df = pd.DataFrame(rows)
    base = df[df["method"] == "non_dp"].set_index(["model", "memory_format"])["total_ms"]
    df["ratio"] = df["total_ms"] / [base[(m, f)] for m, f in zip(df["model"], df["memory_format"])]
    return df


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (< 1 min)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--modes", nargs="+", choices=GRAD_SAMPLE_MODES, default=list(GRAD_SAMPLE_MODES))
    p.add_argument("--channels-last", action="store_true", help="also time channels-last models")
    for name, value in FULL.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"default {value} ({QUICK[name]} with --quick)")
    p.add_argument("--out", type=Path, default=None, help="folder for dp_step.json and dp_step.csv")
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    t0 = time.perf_counter()
    df = run(args)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"\n{time.perf_counter() - t0:.0f} s; ratio = step time / non-private step time of the "
          f"same model and memory format, measured in this run")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        meta = {"settings": settings, "machine": platform.platform(),
                "processor": platform.processor(),
                "versions": package_versions()}
        (args.out / "dp_step.json").write_text(json.dumps(
            {**meta, "results": df.to_dict(orient="records")}, indent=2) + "\n")
        df.to_csv(args.out / "dp_step.csv", index=False)
        print(args.out / "dp_step.json", args.out / "dp_step.csv", sep="\n")


if __name__ == "__main__":
    main()
