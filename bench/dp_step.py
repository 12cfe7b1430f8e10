"""Per-step cost of each DP method relative to non-private training, in one process.

Every variant (model × method × grad-sample mode × memory format) trains on the same
fixed batch on the same device, and the variants take turns round by round, so a
change in machine load hits all of them alike and the ratios stay meaningful on a
shared machine. A DP variant's ratio is against the *fastest* non-private variant of
the same model (over memory formats). Each step is split by timers into forward,
backward (per-sample gradients or their ghost-norm inputs are formed here), clip
(per-sample norms, clip factors, clipped sum), noise and update (the optimizer step);
``peak_mb`` is the memory one training step adds (CPU: peak resident set of a forked
process over the state before the step; CUDA: ``torch.cuda.max_memory_allocated``).

    python bench/dp_step.py --quick                 # < 1 min, smoke check
    python bench/dp_step.py --out results/bench     # the measurement (see README.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from dpstudy.privacy import conv_grad_sample

from dpstudy.config import DEVICES, DP_METHODS, GRAD_SAMPLE_MODES, MODELS, RunConfig
from dpstudy.device import describe, resolve_device
from dpstudy.losses import per_sample_loss
from dpstudy.methods import build_method
from dpstudy.models import build_model
from dpstudy.train import _optimizer, package_versions

PHASES = ("forward", "backward", "clip", "noise", "update")
#: Many short rounds rather than a few long ones: load changes then average out over all
#: variants. ``threads`` is what one training run gets (all cores with --jobs 1).
FULL = dict(base_width=16, depth=4, image_size=128, batch_size=8, rounds=10, steps=2, warmup=2,
            threads=os.cpu_count() or 1)
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
QUICK = dict(base_width=8, depth=2, image_size=64, batch_size=4, rounds=3, steps=1, warmup=1,
             threads=1)


@dataclass
class Variant:
    model_name: str
    method: str
    mode: str | None          # grad-sample mode; None for the non-private baseline
    memory_format: str        # a key of FORMATS
    conv_path: str            # per-sample convolution gradients: loop | grouped ("-": none)
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    times: dict[str, list[float]] = field(
        default_factory=lambda: {p: [] for p in (*PHASES, "total")})
    pending: dict[str, float] = field(default_factory=dict)

    def timed(self, phase: str, fn):
        """Wrap an optimizer method so its time is booked to ``phase`` of this step."""
        def wrapper(*args, **kwargs):
            t0 = now()
            out = fn(*args, **kwargs)
            self.pending[phase] = self.pending.get(phase, 0.0) + now() - t0
            return out
        return wrapper


def now() -> float:
    """A clock reading after the device has finished the work queued so far."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def build_variant(model_name, method, mode, memory_format, conv_path, x, y, args) -> Variant:
    cfg = RunConfig(model=model_name, method=method, base_width=args.base_width, depth=args.depth,
                    image_size=(args.image_size, args.image_size), batch_size=args.batch_size,
                    epochs=1, noise_multiplier=None if method == "non_dp" else 1.0,
                    grad_sample_mode=mode or "hooks")
    model = build_model(model_name, cfg.base_width, cfg.depth).to(
        args.device, memory_format=FORMATS[memory_format])
    strategy = build_method(cfg)
    loader = DataLoader(TensorDataset(x, y), batch_size=cfg.batch_size)
    model, optimizer, _ = strategy.attach(model, _optimizer(cfg, model), loader)
    strategy.before_step(0, 0, 1)        # Random Sparsification: draw the (final) mask
    v = Variant(model_name, method, mode, memory_format, conv_path, model, optimizer)
    if strategy.private:
        optimizer.clip_and_accumulate = v.timed("clip", optimizer.clip_and_accumulate)
        optimizer.add_noise = v.timed("noise", optimizer.add_noise)
    return v


@contextmanager
def per_sample_conv(path: str, device_type: str):
    """Form per-sample convolution gradients by ``path`` during the block (``-``: as is)."""
    table = conv_grad_sample.PER_SAMPLE_CONV
    saved = table.get(device_type)
    if path != "-":
        table[device_type] = path
    try:
        yield
    finally:
        table[device_type] = saved


def train_step(v: Variant, x, y, record: bool) -> None:
    with per_sample_conv(v.conv_path, x.device.type):
        _train_step(v, x, y, record)


def _train_step(v: Variant, x, y, record: bool) -> None:
    v.optimizer.zero_grad(set_to_none=True)
    v.pending = {}
    t0 = now()
    losses = per_sample_loss(v.model(x), y)
    t1 = now()
    (losses.sum() / len(losses)).backward()
    t2 = now()
    v.optimizer.step()
    t3 = now()
    if record:
        clip, noise = v.pending.get("clip", 0.0), v.pending.get("noise", 0.0)
        for phase, seconds in zip((*PHASES, "total"),
                                  (t1 - t0, t2 - t1, clip, noise, t3 - t2 - clip - noise, t3 - t0)):
            v.times[phase].append(seconds)


def _rss_kb(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in kB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_mb(v: Variant, x, y) -> float:
    """Memory one (warm) training step of ``v`` adds at its peak, in MB.

    CUDA: from the caching allocator's statistics. CPU: growth of the peak resident set
    (reset through /proc/self/clear_refs) — meaningful only in a process whose malloc
    returns freed blocks to the system (:data:`MALLOC_ENV`, see :func:`cpu_peaks`).
    """
    train_step(v, x, y, record=False)
    v.optimizer.zero_grad(set_to_none=True)      # the last step's per-sample gradients go
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        train_step(v, x, y, record=False)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kb("VmRSS")
    train_step(v, x, y, record=False)
    return (_rss_kb("VmHWM") - before) / 1024


#: glibc: every block ≥ 64 kB its own mapping, returned when freed, so the resident set
#: follows what is allocated. Slower, so only the memory pass runs under it.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def cpu_peaks(argv: list[str]) -> list[float]:
    """:func:`peak_memory_mb` of every variant, measured in a child process under
    :data:`MALLOC_ENV` (before the timing, so the two never compete)."""
    out = subprocess.run([sys.executable, __file__, *argv, "--memory-only"], check=True,
                         env={**os.environ, **MALLOC_ENV}, capture_output=True, text=True)
    return json.loads(out.stdout.splitlines()[-1])


def with_ratios(df: pd.DataFrame) -> pd.DataFrame:
    """``ratio``: step time over the fastest non-private step of the same model (any
    memory format), the baseline a DP method has to match."""
    fastest = df[df["method"] == "non_dp"].groupby("model")["total_ms"].min()
    return df.assign(ratio=df["total_ms"] / df["model"].map(fastest))


def run(args, argv: list[str]) -> pd.DataFrame:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    n, size = args.batch_size, args.image_size
    x_all, y_all = torch.randn(4 * n, 1, size, size), torch.randint(0, 9, (4 * n, size, size))
    variants = []
    for model_name in args.models:
        for fmt in args.formats:
            variants.append(build_variant(model_name, "non_dp", None, fmt, "-", x_all, y_all,
                                          args))
            variants += [build_variant(model_name, m, mode, fmt, path, x_all, y_all, args)
                         for mode in args.modes for path in args.conv_paths
                         for m in DP_METHODS]
    batch = {fmt: (x_all[:n].to(args.device).contiguous(memory_format=FORMATS[fmt]),
                   y_all[:n].to(args.device)) for fmt in args.formats}
    if args.memory_only or args.device.type == "cuda":
        peaks = [peak_memory_mb(v, *batch[v.memory_format]) for v in variants]
        if args.memory_only:
            print(json.dumps(peaks))
            return pd.DataFrame()
    else:
        peaks = cpu_peaks(argv)
    for r in range(args.rounds + 1):            # round 0 only warms up
        for v in variants:
            for _ in range(args.warmup if r == 0 else args.steps):
                train_step(v, *batch[v.memory_format], record=r > 0)
    rows = [{"model": v.model_name, "memory_format": v.memory_format,
             "method": v.method, "grad_sample_mode": v.mode or "-", "conv_path": v.conv_path,
             **{f"{p}_ms": 1e3 * statistics.median(v.times[p]) for p in (*PHASES, "total")},
             "peak_mb": peak}
            for v, peak in zip(variants, peaks)]
    return with_ratios(pd.DataFrame(rows))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (< 1 min)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--modes", nargs="+", choices=GRAD_SAMPLE_MODES,
                   default=["native_conv", "ghost_mixed"],
                   help="grad-sample modes (default: dpstudy's two; Opacus's hooks and "
                        "functorch were slower in every measurement, README Speed)")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS),
                   help="memory formats to time (default both)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--conv-paths", nargs="+", choices=("loop", "grouped"), default=None,
                   help="how per-sample convolution gradients are formed (default: the "
                        "device's, dpstudy.privacy.conv_grad_sample.PER_SAMPLE_CONV)")
    p.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    for name, value in FULL.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"default {value} ({QUICK[name]} with --quick)")
    p.add_argument("--out", type=Path, default=None, help="folder for dp_step.json and dp_step.csv")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.device = resolve_device(args.device)
    args.conv_paths = args.conv_paths or [conv_grad_sample.PER_SAMPLE_CONV[args.device.type]]
    t0 = time.perf_counter()
    df = run(args, [a for a in argv if a != "--memory-only"])
    if args.memory_only:
        return
    print(df.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"\n{time.perf_counter() - t0:.0f} s on {describe(args.device)['device']}; ratio = "
          f"step time / the fastest non-private step time of the same model, in this run")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        settings = {k: (str(v) if isinstance(v, (Path, torch.device)) else v)
                    for k, v in vars(args).items()}
        meta = {"settings": settings, "machine": platform.platform(),
                "processor": platform.processor(), "device": describe(args.device)["device"],
                "versions": package_versions()}
        (args.out / "dp_step.json").write_text(json.dumps(
            {**meta, "results": df.to_dict(orient="records")}, indent=2) + "\n")
        df.to_csv(args.out / "dp_step.csv", index=False)
        print(args.out / "dp_step.json", args.out / "dp_step.csv", sep="\n")


if __name__ == "__main__":
    main()
