"""Command line: ``dpstudy train|sweep|evaluate|runs|audit|report|prepare-duke``.

Errors caused by input print one line on stderr and exit with status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import (ACCOUNTANTS, CLIP_FUNCTIONS, CLIPPING_STYLES, DEVICES, GRAD_SAMPLE_MODES,
                     LR_SCHEDULES, METHODS, MODELS, NORMALISATIONS, OPTIMIZERS, PRIVACY_UNITS,
                     RANDOMNESS,
                     TRAINABLE, TTA, RunConfig)
from .errors import Cancelled, ConfigError, DPStudyError
from .store import default_runs_dir

#: CLI option -> RunConfig field, for the options ``train`` and ``sweep`` share.
COMMON = {
    "base_width": ("--base-width", int), "depth": ("--depth", int),
    "max_grad_norm": ("--max-grad-norm", float), "clipping": ("--clipping", CLIPPING_STYLES),
    "clip_fn": ("--clip-fn", CLIP_FUNCTIONS), "gamma": ("--gamma", float),
    "final_rate": ("--final-rate", float), "refresh": ("--refresh", int),
    "delta": ("--delta", float), "accountant": ("--accountant", ACCOUNTANTS),
    "grad_sample_mode": ("--grad-sample-mode", GRAD_SAMPLE_MODES),
    "epochs": ("--epochs", int), "batch_size": ("--batch-size", int),
    "max_physical_batch": ("--max-physical-batch", int), "lr": ("--lr", float),
    "optimizer": ("--optimizer", OPTIMIZERS), "momentum": ("--momentum", float),
    "lr_schedule": ("--lr-schedule", LR_SCHEDULES),
    "weight_decay": ("--weight-decay", float), "dice_weight": ("--dice-weight", float),
    "limit": ("--limit", int), "init_from": ("--init-from", str),
    "aug_multiplicity": ("--aug-multiplicity", int),
    "audit_holdout": ("--audit-holdout", float),
    "audit_canaries": ("--audit-canaries", int),
    "audit_canary_images": ("--audit-canary-images", int),
    "normalisation": ("--normalisation", NORMALISATIONS),
    "randomness": ("--randomness", RANDOMNESS),
    "trainable": ("--trainable", TRAINABLE), "adapter_rank": ("--adapter-rank", int),
    "ema_decay": ("--ema-decay", float),
    "fluid_weight": ("--fluid-weight", float), "tta": ("--tta", TTA),
    "device": ("--device", DEVICES),
    "privacy_unit": ("--privacy-unit", PRIVACY_UNITS),
}
DEVICE_HELP = ("where to compute: auto (CUDA, else MPS, else CPU; default), cpu, cuda or "
               "mps; not part of the run id")
#: The first run an empty store's hints suggest, spelled as in the README: a few minutes
#: on a laptop CPU for a model that segments the phantom (the quick profile's pretraining).
START_HINT = ("dpstudy train --model unet --method non_dp --data synthetic --base-width 8 "
              "--depth 3 --epochs 40")
HELP = {
    "max_grad_norm": "per-sample clipping bound C (dp_sgd; the bound R for auto_clip)",
    "clip_fn": "random_sparsification only: abadi (flat C) or automatic clipping",
    "gamma": "Automatic Clipping γ: 0.01 = AUTO-S, 0 = AUTO-V",
    "final_rate": "Random Sparsification final rate r* (gradual cooling from 0)",
    "refresh": "Random Sparsification masks drawn per epoch",
    "accountant": "rdp (default; PRV breaks down at large ε), prv, or pld (dp-accounting's "
                  "privacy loss distributions: the tightest, same ε for less noise)",
    "privacy_unit": "what ε protects: bscan (default) or subject (Poisson sampling of "
                    "patients, each patient's summed gradient clipped as one unit)",
    "batch_size": "batch size (DP runs: expected, Poisson sampling with q = 1/⌈N/B⌉); "
                  "with --privacy-unit subject it counts subjects, not B-scans",
    "grad_sample_mode": "per-sample gradients: ghost_mixed (default, the fastest measured: "
                        "book-keeping, no batch weight gradient, ghost norms where cheaper; "
                        "see README Speed), native_conv (Opacus hooks with PyTorch's own "
                        "conv backward per sample), hooks or functorch (Opacus's)",
    "device": DEVICE_HELP,
    "max_physical_batch": "split Poisson batches with Opacus's BatchMemoryManager",
    "lr": "learning rate (default per method and optimizer, see README)",
    "momentum": "SGD momentum (--optimizer sgd)",
    "limit": "cap images per split (smoke runs)",
    "init_from": "run id of a completed run to start from (e.g. phantom pretraining)",
    "aug_multiplicity": "K augmented copies per sample, gradients averaged before clipping "
                        "(needs --augment)",
    "audit_holdout": "share of each training subject's B-scans kept out of training as "
                     "membership-audit non-members (e.g. 0.5)",
    "audit_canaries": "m white-box gradient canaries for a one-run audit (an empirical lower "
                      "bound on ε, stored as one_run_audit; e.g. 1000; 0 = none)",
    "audit_canary_images": "m canary B-scans (public phantom scans with a wrong mask), each "
                           "trained on with probability ½, for the input-space one-run audit "
                           "(only the final model seen; stored as one_run_audit_input; e.g. "
                           "100; 0 = none)",
    "normalisation": "per_image (default: each image by its own pixels, costs no privacy) "
                     "or train_split (the split's mean/std; non-private runs only)",
    "randomness": "seeded (default: noise and sampling from --seed, reproducible) or "
                  "os_entropy (from the OS, for a model that is released)",
    "trainable": "parameters trained: all, norm_bias (GroupNorm affine + biases + head, "
                 "DP-BiTFiT), decoder, or adapters (low-rank adapters on every convolution "
                 "but the head, LoRA, plus what norm_bias trains; merged into the weights "
                 "when saved); the rest keep their starting weights",
    "adapter_rank": "rank of the low-rank adapters (--trainable adapters; default 8)",
    "ema_decay": "exponential moving average of the weights, evaluated and saved "
                 "(e.g. 0.99; 0 = off)",
    "fluid_weight": "weight of fluid pixels in the cross-entropy (e.g. 3)",
    "tta": "test-time augmentation of every prediction: none (default) or flip (the logits "
           "of a B-scan averaged with those of its mirror image; post-processing, costs no "
           "privacy)",
}


def _add_common(p: argparse.ArgumentParser) -> None:
    for field, (flag, kind) in COMMON.items():
        if isinstance(kind, tuple):
            p.add_argument(flag, dest=field, choices=kind, default=None, help=HELP.get(field))
        else:
            p.add_argument(flag, dest=field, type=kind, default=None, help=HELP.get(field))
    p.add_argument("--augment", action="store_true", default=None,
                   help="label-preserving augmentation of training images")
    p.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"), default=None)
    p.add_argument("--data", default=None,
                   help="Duke data folder or 'synthetic' (default: $DPSTUDY_DATA, "
                        "data/DukeData, else the synthetic phantom)")
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="run store (default: $DPSTUDY_RUNS or runs/)")


def _base_fields(args) -> dict:
    from .data.source import resolve_data_spec
    fields = {f: getattr(args, f) for f in COMMON if getattr(args, f) is not None}
    if args.augment:
        fields["augment"] = True
    if args.image_size:
        fields["image_size"] = tuple(args.image_size)
    fields["data"] = resolve_data_spec(args.data)
    return fields


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpstudy", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one run into the run store")
    p.add_argument("--model", choices=MODELS, default="unet")
    p.add_argument("--method", choices=METHODS, default="non_dp")
    noise = p.add_mutually_exclusive_group()
    noise.add_argument("--noise-multiplier", type=float, default=None)
    noise.add_argument("--target-epsilon", type=float, default=None,
                       help="calibrate σ so that ε after all epochs is at most this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--force", action="store_true",
                   help="train again a run that already completed, replacing its results")
    _add_common(p)

    p = sub.add_parser("sweep", help="train a grid of runs in parallel (resumable)")
    p.add_argument("--profile", help="study profile: a name in dpstudy/profiles or a TOML file")
    p.add_argument("--models", nargs="+", choices=MODELS)
    p.add_argument("--methods", nargs="+", choices=METHODS)
    p.add_argument("--noise-multipliers", nargs="+", type=float)
    p.add_argument("--target-epsilons", nargs="+", type=float)
    p.add_argument("--max-grad-norms", nargs="+", type=float)
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (joblib)")
    p.add_argument("--scheduler", help="Dask scheduler address tcp://HOST:PORT")
    p.add_argument("--dry-run", action="store_true", help="list the runs, train nothing")
    _add_common(p)

    p = sub.add_parser("evaluate", help="metrics of a trained run on any split")
    p.add_argument("run", help="the run directory `dpstudy train` printed, or a run id of "
                               "the store (with --runs-dir, a path names the store's run "
                               "of that name)")
    p.add_argument("--split", default="val")
    p.add_argument("--data", default=None, help="other data (default: the run's)")
    images = p.add_mutually_exclusive_group()
    images.add_argument("--limit", type=int, default=None,
                        help="score the first N images of the split (default: the run's "
                             "own --limit, so the images it was evaluated on)")
    images.add_argument("--all-images", action="store_true",
                        help="score every image of the split, whatever the run's --limit")
    p.add_argument("--runs-dir", type=Path, default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)

    p = sub.add_parser("runs", help="the run table")
    p.add_argument("--runs-dir", type=Path, default=None)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("audit", help="membership-inference audit of completed runs")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("run", nargs="?", help="run id or run directory inside the store")
    target.add_argument("--all", action="store_true",
                        help="every completed run not audited yet (with --force: all)")
    p.add_argument("--force", action="store_true", help="audit again runs that have an audit")
    p.add_argument("--runs-dir", type=Path, default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)

    p = sub.add_parser("report", help="summary tables and figures of a run store")
    p.add_argument("runs_dir", type=Path, metavar="RUNS_DIR")
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--profile", help="report only this profile's runs (and list those not "
                                     "yet completed); give the --data the sweep was given")
    p.add_argument("--data", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="with --profile: the seeds the sweep was given (its --seeds)")

    p = sub.add_parser("prepare-duke", help="convert Subject_XX.mat files to the .npy layout")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--split", action="append", metavar="NAME=SUBJECTS",
                   help="e.g. train=1-6 (repeatable; default train=1-6 val=7-8 test=9-10)")
    return parser


def _subjects(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def cmd_train(args) -> None:
    from .train import train
    cfg = RunConfig(model=args.model, method=args.method, seed=args.seed,
                    noise_multiplier=args.noise_multiplier, target_epsilon=args.target_epsilon,
                    **_base_fields(args))
    run_dir = train(cfg, args.runs_dir or default_runs_dir(), progress=not args.quiet,
                    log=lambda m: print(m, file=sys.stderr), keep_completed=not args.force)
    print(run_dir)


def cmd_sweep(args) -> None:
    from .sweep import expand_grid, load_profile, run_sweep
    base = _base_fields(args)
    if args.profile:
        configs, _ = load_profile(args.profile, overrides=base, seeds=args.seeds)
    else:
        grid = {"model": args.models or ["unet"], "method": args.methods or ["non_dp"],
                "noise_multiplier": args.noise_multipliers or [],
                "target_epsilon": args.target_epsilons or [],
                "seed": args.seeds or [0]}
        if args.max_grad_norms:
            grid["max_grad_norm"] = args.max_grad_norms
        configs = expand_grid(base, grid)
    runs_dir = args.runs_dir or default_runs_dir()
    if args.dry_run:
        from .estimate import calibrate_store, duration_text, remaining_seconds
        from .store import RunStore
        for c in configs:
            print(c.run_id())
        store = RunStore(runs_dir)
        todo = [c for c in configs if not store.is_completed(c.run_id())]
        est = calibrate_store(store)
        print(f"{len(todo)} of {len(configs)} runs to train" + (
              f": {duration_text(remaining_seconds(est, todo, args.jobs))} with --jobs "
              f"{args.jobs} ({est.basis(todo)})" if todo else ""), file=sys.stderr)
        return
    results = run_sweep(configs, runs_dir, jobs=args.jobs, scheduler=args.scheduler)
    for r in results:
        print(f"{r['status']:22s} {r['run_id']}" + (f"  {r['error']}" if r.get("error") else ""))
    if any(r["status"] == "failed" for r in results):
        raise DPStudyError(f"{sum(r['status'] == 'failed' for r in results)} of "
                           f"{len(results)} runs failed (see above)")


def _run_location(run: str, runs_dir: Path | None) -> tuple[Path, str]:
    """(store, run id) of a RUN argument: without ``--runs-dir`` a run directory (what
    ``dpstudy train`` printed) is found in its own store; otherwise RUN names a run of
    the store by its last path component, so a path never leads outside it."""
    path = Path(run)
    if runs_dir is None and (path / "config.json").is_file():
        return path.resolve().parent, path.resolve().name
    return runs_dir or default_runs_dir(), path.name


def cmd_evaluate(args) -> None:
    from .evaluate import RUN_LIMIT, evaluate_run
    runs_dir, run_id = _run_location(args.run, args.runs_dir)
    limit = None if args.all_images else RUN_LIMIT if args.limit is None else args.limit
    metrics = evaluate_run(runs_dir, run_id, args.data, args.split, limit=limit,
                           device=args.device)
    if args.json:
        print(json.dumps(metrics, indent=2, ensure_ascii=False))
        return
    print(metrics["scored"])
    shown = {k: v for k, v in metrics.items() if k not in ("scored", "data")}
    width = max(map(len, shown))
    for k, v in shown.items():
        print(f"{k:{width}s}  {v:.4f}" if isinstance(v, float) else f"{k:{width}s}  {v}")


def cmd_runs(args) -> None:
    from .store import RunStore
    df = RunStore(args.runs_dir).list_runs()
    if args.json:
        print(df.to_json(orient="records", indent=2, force_ascii=False))
        return
    if df.empty:
        print(f"no runs in {RunStore(args.runs_dir).root} — start one with `{START_HINT}`")
        return
    cols = [c for c in ("run_id", "status", "model", "method", "noise_multiplier",
                        "max_grad_norm", "epsilon", "val_dice_fg_mean", "val_dice_all_mean",
                        "duration_s") if c in df.columns]
    print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def cmd_audit(args) -> None:
    from .audit import audit_run, runs_to_audit
    runs_dir = args.runs_dir or default_runs_dir()
    run_ids = [Path(args.run).name] if args.run else runs_to_audit(runs_dir, args.force)
    failed = 0
    for run_id in run_ids:
        try:
            result = audit_run(runs_dir, run_id, device=args.device)
        except DPStudyError as exc:
            if args.run:
                raise
            failed += 1
            print(f"{run_id}: {exc}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps({"run_id": run_id, **result}, ensure_ascii=False))
        else:
            lo, hi = result["auc_ci"]
            glo, ghi = result["auc_gain_ci"]
            print("  ".join([run_id, f"calibrated AUC {result['auc']:.3f} [{lo:.3f}, {hi:.3f}]",
                             f"gain over the starting weights {result['auc_gain']:+.3f} "
                             f"[{glo:+.3f}, {ghi:+.3f}]: {result['verdict']}",
                             *(f"TPR@FPR≤{f} {v:.3f}" for f, v in result["tpr_at_fpr"].items()),
                             f"({result['n_members']} members, {result['n_nonmembers']} "
                             f"non-members)"]))
    if failed:
        raise DPStudyError(f"{failed} of {len(run_ids)} audits failed (see above)")


def cmd_report(args) -> None:
    from .data.source import resolve_data_spec
    from .report import write_report
    from .sweep import load_profile
    run_ids = None
    if args.profile:
        configs, _ = load_profile(args.profile, {"data": resolve_data_spec(args.data)},
                                  seeds=args.seeds)
        run_ids = [c.run_id() for c in configs]
    elif args.data or args.seeds:
        raise ConfigError("report: --data and --seeds only say which runs a --profile "
                          "means; give --profile too")
    for path in write_report(args.runs_dir, args.out, run_ids):
        print(path)


def cmd_prepare(args) -> None:
    from .data.prepare import prepare_duke
    splits = None
    if args.split:
        splits = {}
        for item in args.split:
            name, _, subjects = item.partition("=")
            try:
                splits[name] = _subjects(subjects)
            except ValueError:
                raise DPStudyError(f"--split {item!r}: expected NAME=SUBJECTS like "
                                   f"train=1-6 or val=7,8") from None
    counts = prepare_duke(args.src, args.dst, splits)
    for split, n in counts.items():
        print(f"{split}: {n} B-scans")
    print(args.dst)


COMMANDS = {"train": cmd_train, "sweep": cmd_sweep, "evaluate": cmd_evaluate,
            "runs": cmd_runs, "audit": cmd_audit, "report": cmd_report,
            "prepare-duke": cmd_prepare}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except DPStudyError as exc:
        if args.debug:
            raise
        print(f"dpstudy: error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line
        return 2
    except (Cancelled, KeyboardInterrupt) as exc:
        print(f"dpstudy: cancelled ({exc or 'SIGINT'}); epochs done so far are saved",
              file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 — one line unless --debug
        if args.debug:
            raise
        print(f"dpstudy: error: {type(exc).__name__}: {' '.join(str(exc).split())} (run with "
              f"--debug for the traceback)", file=sys.stderr)
        return 1
    return 0
