"""The training loop's step code seen from the DP optimizer: what it is handed, when.

:func:`dpstudy.train._train_epoch` runs a tiny U-Net made private by the same
``build_method(cfg).attach`` path as training. A recorder wraps the real optimizer's
``clip_and_accumulate`` and ``step`` (both still run) and notes, for every physical
batch, the per-sample gradients, the weights they were taken at and the masks in force.
Each expectation is recomputed independently: one backward pass per sample, the same
run without ``max_physical_batch``, numpy statistics.
"""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dpstudy.config import RunConfig
from dpstudy.losses import per_sample_loss
from dpstudy.methods import build_method
from dpstudy.models import build_model
from dpstudy.privacy.accounting import epsilon
from dpstudy.train import _optimizer, _train_epoch

N, SIZE = 12, 8


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Recorder:
    """Per physical batch: the logical step it belongs to, its inputs, the weights,
    the per-sample gradients and the sparsification masks the optimizer saw."""

    def __init__(self, model, opt, method):
        self.batches, self.steps, self._inputs = [], 0, []
        clip, step = opt.clip_and_accumulate, opt.step
        model.register_forward_pre_hook(lambda m, args: self._inputs.append(args[0].detach()))

        def clip_and_accumulate():
            grads = [p.grad_sample.detach().clone() for p in opt.params]
            masks = getattr(getattr(method, "sparsifier", None), "masks", None)
            self.batches.append({
                "step": self.steps, "size": len(grads[0]),
                "x": self._inputs.pop() if len(grads[0]) else None,
                "weights": [p.detach().clone() for p in opt.params], "grads": grads,
                "masks": None if masks is None else [m.clone() for m in masks]})
            clip()

        def counted_step(*args, **kwargs):
            out = step(*args, **kwargs)
            self.steps += not opt._is_last_step_skipped
            return out

        opt.clip_and_accumulate, opt.step = clip_and_accumulate, counted_step


def _private_run(**fields):
    """A private tiny U-Net on random 8×8 scans; its config, method, model, optimizer,
    Poisson loader and recorder. The same fields give the same weights, batches, noise."""
    cfg = RunConfig(**{"method": "dp_sgd", "noise_multiplier": 1.0, "image_size": (SIZE, SIZE),
                       "base_width": 4, "depth": 1, "epochs": 1, "batch_size": 4,
                       "optimizer": "sgd", **fields})
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(N, 1, SIZE, SIZE), torch.randint(0, 9, (N, SIZE, SIZE)))
    loader = DataLoader(data, batch_size=cfg.batch_size,
                        generator=torch.Generator().manual_seed(cfg.seed))
    net = build_model("unet", cfg.base_width, cfg.depth)
    method = build_method(cfg)
    model, opt, loader = method.attach(net, _optimizer(cfg, net), loader)
    return cfg, method, model, opt, loader, Recorder(model, opt, method)


def _labels_of(x: torch.Tensor, data: TensorDataset) -> torch.Tensor:
    """The label of each recorded input, found by its scan (the scans are distinct)."""
    scans, labels = data.tensors
    return labels[[int(torch.nonzero((scans == xi).flatten(1).all(1))[0]) for xi in x]]


@pytest.mark.parametrize("mode", ["hooks", "functorch", "native_conv"])
@pytest.mark.parametrize("physical", [None, 3])
def test_the_optimizer_sees_each_samples_own_loss_gradient(mode, physical):
    """The per-sample gradient the optimizer clips is the gradient of that sample's loss
    alone (not B times it, as a summed batch loss would give), physical batches or not;
    the recorded statistics are those of exactly these gradients."""
    cfg, method, model, opt, loader, rec = _private_run(
        grad_sample_mode=mode, max_physical_batch=physical, max_grad_norm=0.85,
        batch_size=6, epochs=2)
    for epoch in range(cfg.epochs):
        _train_epoch(model, opt, loader, method, lambda: None, epoch, cfg, False, None)
        stats = method.epoch_stats()
    assert max(b["size"] for b in rec.batches) >= 2      # a batch loss can scale gradients
    ref = build_model("unet", cfg.base_width, cfg.depth)
    norms = []
    for batch in (b for b in rec.batches if b["size"]):
        with torch.no_grad():
            for p, w in zip(ref.parameters(), batch["weights"]):
                p.copy_(w)
        y = _labels_of(batch["x"], loader.dataset)
        for j in range(batch["size"]):
            loss = per_sample_loss(ref(batch["x"][j:j + 1]), y[j:j + 1], cfg.dice_weight,
                                   cfg.fluid_weight)[0]
            alone = torch.autograd.grad(loss, list(ref.parameters()))
            for g, seen in zip(alone, batch["grads"]):
                torch.testing.assert_close(seen[j], g, rtol=1e-4, atol=1e-6)
            norms.append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in alone))))
    # the last epoch's statistics, recomputed from the gradients of that epoch
    last = sum(b["size"] for b in rec.batches if b["step"] >= len(loader))
    norms = np.array(norms[-last:])
    assert 0 < (norms > cfg.max_grad_norm).mean() < 1        # some clipped, some not
    assert stats["grad_norm_median"] == pytest.approx(np.median(norms), rel=1e-4)
    assert stats["clipped_fraction"] == pytest.approx((norms > cfg.max_grad_norm).mean())
    assert stats["steps"] == cfg.epochs * len(loader) == rec.steps
    assert stats["epsilon"] == pytest.approx(epsilon(1 / len(loader), 1.0, rec.steps, cfg.delta))


def test_physical_batches_add_up_to_the_logical_step_of_the_unsplit_batch():
    """--max-physical-batch only changes memory: one logical step (one scheduler step,
    one accountant step, one noise draw, one set of masks) per Poisson batch, and the
    same weights at the end as without splitting."""
    fields = dict(method="random_sparsification", final_rate=0.5, refresh=2, epochs=2,
                  batch_size=6, lr_schedule="cosine", lr=0.2)
    runs = {}
    for physical in (None, 2):
        cfg, method, model, opt, loader, rec = _private_run(max_physical_batch=physical, **fields)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt.original_optimizer, T_max=cfg.epochs * len(loader))
        results = [_train_epoch(model, opt, loader, method, scheduler.step, epoch, cfg, False,
                                None)
                   for epoch in range(cfg.epochs)]
        runs[physical] = dict(results=results, rec=rec, lr=opt.param_groups[0]["lr"],
                              weights=[p.detach().clone() for p in model.parameters()],
                              history=method.engine.accountant.history, logical=len(loader))
    whole, split = runs[None], runs[2]
    logical = whole["logical"]
    assert logical == N // 6 and split["logical"] == logical
    for run in (whole, split):
        assert [steps for _, steps in run["results"]] == [logical] * 2    # per epoch
        assert run["rec"].steps == 2 * logical
        assert run["history"] == [(1.0, 6 / N, 2 * logical)]
    sizes = [b["size"] for b in split["rec"].batches]
    assert max(sizes) <= 2 and len(sizes) > len(whole["rec"].batches)   # really split
    # the masks of every physical batch are those of its logical step in the unsplit run
    masks_by_step = {b["step"]: b["masks"] for b in whole["rec"].batches}
    assert len(masks_by_step) == 2 * logical
    assert not all(torch.equal(a, b) for a, b in zip(masks_by_step[0], masks_by_step[1]))
    for b in split["rec"].batches:
        assert all(torch.equal(m, w) for m, w in zip(b["masks"], masks_by_step[b["step"]]))
    assert split["lr"] == pytest.approx(whole["lr"], rel=1e-12)
    assert [loss for loss, _ in split["results"]] == pytest.approx(
        [loss for loss, _ in whole["results"]], rel=1e-5)
    for a, b in zip(split["weights"], whole["weights"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_augmented_gives_k_adjacent_copies_of_every_sample_from_its_own_generator():
    """Sample i's K copies sit at i·K … i·K+K-1 (the optimizer averages adjacent copies),
    each one draw of ``augment`` from the run's augmentation generator in order (not the
    global RNG); one-sample and empty batches included."""
    from dpstudy.data.transforms import augment
    from dpstudy.train import _augmented
    torch.manual_seed(0)
    for n in (3, 1):
        x, y = torch.randn(n, 1, SIZE, SIZE), torch.randint(0, 9, (n, SIZE, SIZE))
        global_rng = torch.get_rng_state()
        ax, ay = _augmented(x, y, 3, torch.Generator().manual_seed(5))
        assert torch.equal(torch.get_rng_state(), global_rng)
        assert ax.shape == (3 * n, 1, SIZE, SIZE) and ay.shape == (3 * n, SIZE, SIZE)
        gen = torch.Generator().manual_seed(5)
        for i in range(n):
            for j in range(3):
                ex, ey = augment(x[i], y[i], gen)
                assert torch.equal(ax[3 * i + j], ex) and torch.equal(ay[3 * i + j], ey)
    ex, ey = torch.zeros(0, 1, SIZE, SIZE), torch.zeros(0, SIZE, SIZE, dtype=torch.long)
    ax, ay = _augmented(ex, ey, 3, torch.Generator().manual_seed(5))
    assert ax.shape == ex.shape and ay.shape == ey.shape


def _steps_seen(method):
    """Record every ``before_step`` call of ``method`` (the real one still runs)."""
    calls, before = [], method.before_step
    method.before_step = lambda *a: (calls.append(a), before(*a))[1]
    return calls


def test_non_private_epoch_is_plain_minibatch_sgd_and_returns_the_mean_sample_loss():
    """Without DP: every batch one optimizer step on its mean loss (a last batch of one
    sample included), one logical step per batch, and the returned loss the mean over
    all samples of the run's loss at the weights each batch was seen at — replayed by hand."""
    cfg = RunConfig(method="non_dp", image_size=(SIZE, SIZE), base_width=4, depth=1,
                    epochs=1, batch_size=2, optimizer="sgd", momentum=0.9, lr=0.05,
                    dice_weight=0.5, fluid_weight=3.0)     # the run's loss, not the default
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(5, 1, SIZE, SIZE), torch.randint(0, 9, (5, SIZE, SIZE)))
    loader = DataLoader(data, batch_size=2)          # batches of 2, 2, 1
    net = build_model("unet", cfg.base_width, cfg.depth)
    ref = build_model("unet", cfg.base_width, cfg.depth)
    ref.load_state_dict(net.state_dict())
    method = build_method(cfg)
    model, opt, loader = method.attach(net, _optimizer(cfg, net), loader)
    calls, after = _steps_seen(method), []
    loss, steps = _train_epoch(model, opt, loader, method, lambda: after.append(1), 0, cfg,
                               False, None)
    assert steps == 3 and len(after) == 3 and calls == [(0, s, 3) for s in range(3)]
    ref_opt, losses = _optimizer(cfg, ref), []
    for x, y in loader:
        ref_opt.zero_grad()
        per = per_sample_loss(ref(x), y, cfg.dice_weight, cfg.fluid_weight)
        per.mean().backward()
        ref_opt.step()
        losses += per.tolist()
    assert loss == pytest.approx(np.mean(losses), rel=1e-5)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    one = DataLoader(TensorDataset(*(t[:1] for t in data.tensors)), batch_size=1)
    with torch.no_grad():
        alone = float(per_sample_loss(model(data.tensors[0][:1]), data.tensors[1][:1],
                                      cfg.dice_weight, cfg.fluid_weight)[0])
    assert _train_epoch(model, opt, one, method, lambda: None, 1, cfg, False, None) == (
        pytest.approx(alone, rel=1e-5), 1)


def test_empty_and_single_sample_poisson_batches_each_take_one_private_step():
    """DP batches of 0, 1 and 3 samples: three logical steps (the empty one noise only,
    with no per-sample gradient); the lone sample's gradient is its own loss gradient
    (not divided by more than its batch of one); the mean loss is over the 4 samples."""
    cfg, method, model, opt, _, rec = _private_run(max_grad_norm=100.0)
    scans, labels = torch.randn(4, 1, SIZE, SIZE), torch.randint(0, 9, (4, SIZE, SIZE))
    batches = [(scans[:0], labels[:0]), (scans[:1], labels[:1]), (scans[1:], labels[1:])]
    calls, after = _steps_seen(method), []
    before = [p.detach().clone() for p in opt.params]
    loss, steps = _train_epoch(model, opt, batches, method, lambda: after.append(1), 0, cfg,
                               False, None)
    assert steps == 3 == rec.steps and len(after) == 3 and calls == [(0, s, 3) for s in range(3)]
    assert [b["size"] for b in rec.batches] == [0, 1, 3]
    assert all(g.shape == (0, *p.shape) for g, p in zip(rec.batches[0]["grads"], opt.params))
    assert not all(torch.equal(a, b) for a, b in zip(before, rec.batches[1]["weights"]))
    ref = build_model("unet", cfg.base_width, cfg.depth)
    seen = []
    for batch, (x, y) in zip(rec.batches[1:], batches[1:]):
        with torch.no_grad():
            for p, w in zip(ref.parameters(), batch["weights"]):
                p.copy_(w)
        per = per_sample_loss(ref(x), y, cfg.dice_weight, cfg.fluid_weight)
        seen += per.tolist()
        if len(x) == 1:
            alone = torch.autograd.grad(per[0], list(ref.parameters()))
            for g, got in zip(alone, batch["grads"]):
                torch.testing.assert_close(got[0], g, rtol=1e-4, atol=1e-6)
    assert loss == pytest.approx(np.mean(seen), rel=1e-5)


def test_an_augmented_epoch_draws_its_copies_from_the_runs_augmentation_generator():
    """With augment=True the copies come from the generator ``train`` seeds for them
    (its own stream), never the global RNG: the epoch advances that generator only."""
    cfg = RunConfig(method="non_dp", image_size=(SIZE, SIZE), base_width=4, depth=1,
                    epochs=1, batch_size=2, augment=True, aug_multiplicity=2)
    torch.manual_seed(0)
    batches = [(torch.randn(2, 1, SIZE, SIZE), torch.randint(0, 9, (2, SIZE, SIZE)))
               for _ in range(2)]
    net = build_model("unet", cfg.base_width, cfg.depth)
    method = build_method(cfg)
    model, opt, _ = method.attach(net, _optimizer(cfg, net), batches)
    gen = torch.Generator().manual_seed(3)
    fresh, global_rng = gen.get_state(), torch.get_rng_state()
    _train_epoch(model, opt, batches, method, lambda: None, 0, cfg, False, gen)
    assert torch.equal(torch.get_rng_state(), global_rng)
    assert not torch.equal(gen.get_state(), fresh)
