"""Nothing learned from the private training split leaves a DP run outside ε.

Each released quantity is checked by changing one private training B-scan and
asserting that the value does not move (or that the leaking path is refused).
"""

import json

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader, TensorDataset

from dpstudy.averaging import WeightAverage
from dpstudy.config import RunConfig
from dpstudy.data.sample import Sample
from dpstudy.data.transforms import image_stats
from dpstudy.errors import ConfigError, DataError, Diverged
from dpstudy.losses import per_sample_loss
from dpstudy.methods import build_method
from dpstudy.models import build_model
from dpstudy.models.adapters import add_adapters
from dpstudy.models.trainable import set_trainable
from dpstudy.privacy.accounting import group_privacy
from dpstudy.store import DIAGNOSTIC_FIELDS, RunStore
from dpstudy.train import _normalisation, train

from _runs import TINY, quiet


def _scans(n, seed):
    rng = np.random.default_rng(seed)
    return [Sample(f"Subject_01_{i:02d}", rng.integers(0, 200, (40, 36), dtype=np.uint8),
                   rng.integers(0, 9, (40, 36), dtype=np.uint8)) for i in range(n)]


def test_per_image_normalisation_releases_nothing_of_the_training_split():
    train_a = _scans(5, 0)
    train_b = [*train_a[:-1], Sample(train_a[-1].name, np.full((40, 36), 250, np.uint8),
                                     train_a[-1].mask)]        # one B-scan changed
    cfg = RunConfig(method="dp_sgd", noise_multiplier=1.0)
    assert _normalisation(cfg, train_a) == _normalisation(cfg, train_b)
    assert _normalisation(cfg, train_a)[0] is None
    # the legacy mode would have moved with that one scan: the test can tell
    legacy = cfg.replace(method="non_dp", noise_multiplier=None, normalisation="train_split")
    assert _normalisation(legacy, train_a)[1]["mean"] != _normalisation(legacy, train_b)[1]["mean"]


def test_private_runs_refuse_training_split_statistics(tmp_path):
    cfg = RunConfig(**TINY, method="auto_clip", noise_multiplier=1.0, normalisation="train_split")
    with pytest.raises(ConfigError, match="normalisation='train_split' with method auto_clip"):
        train(cfg, tmp_path, progress=False, log=quiet)
    assert RunStore(tmp_path).run_ids() == []                 # refused before writing


def test_image_stats_ignore_saturated_padding():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 200, (50, 40)).astype(np.uint8)
    padded = img.copy()
    padded[:5] = 255                                          # registration padding
    expected = (img[5:].mean(), img[5:].std())
    assert image_stats(padded) == pytest.approx(expected)
    with pytest.raises(DataError, match="scan_7: all pixels have intensity 17"):
        image_stats(np.full((4, 4), 17, np.uint8), "scan_7")


def test_a_private_run_records_what_is_not_covered_by_epsilon(tmp_path):
    cfg = RunConfig(**TINY, method="auto_clip", noise_multiplier=1.0)
    meta = json.loads((train(cfg, tmp_path, progress=False, log=quiet) / "config.json").read_text())
    assert meta["normalisation"]["mode"] == "per_image" and "mean" not in meta["normalisation"]
    assert meta["diagnostics_not_covered_by_epsilon"] == list(DIAGNOSTIC_FIELDS)
    assert meta["randomness"] == "seeded"


@pytest.mark.parametrize("n, batch", [(66, 8), (49, 7), (100, 3)])
def test_sample_rate_and_steps_are_what_the_accountant_is_told(n, batch):
    cfg = RunConfig(method="dp_sgd", target_epsilon=3.0, epochs=2, image_size=(16, 16),
                    base_width=8, depth=2, batch_size=batch)
    data = TensorDataset(torch.randn(n, 1, 16, 16), torch.randint(0, 9, (n, 16, 16)))
    net = build_model("unet", 8, 2)
    dp = build_method(cfg)
    model, opt, loader = dp.attach(net, torch.optim.SGD(net.parameters(), lr=0.1),
                                   DataLoader(data, batch_size=batch))
    assert dp.sample_rate == loader.sample_rate == 1 / -(-n // batch)
    steps = cfg.epochs * len(loader)
    acc = RDPAccountant()
    acc.history = [(opt.noise_multiplier, dp.accountant_sample_rate, steps)]
    assert 2.9 <= acc.get_epsilon(cfg.delta) <= 3.0          # σ calibrated to these numbers
    x, y = next((x, y) for x, y in loader if len(x))         # one step: the same q is logged
    per_sample_loss(model(x), y).mean().backward()
    opt.step()
    assert dp.engine.accountant.history == [(opt.noise_multiplier, dp.accountant_sample_rate, 1)]


@pytest.mark.slow   # four real trainings
def test_os_entropy_noise_cannot_be_regenerated_from_the_config(tmp_path):
    cfg = RunConfig(**TINY, method="dp_sgd", noise_multiplier=1.0, randomness="os_entropy")
    assert cfg.run_id() == cfg.replace(randomness="seeded").run_id()
    weights = []
    for name in ("a", "b"):
        run_dir = train(cfg, tmp_path / name, progress=False, log=quiet)
        weights.append(torch.load(run_dir / "model.pt", weights_only=True))
        assert json.loads((run_dir / "config.json").read_text())["randomness"] == "os_entropy"
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    seeded = cfg.replace(randomness="seeded")                 # the seeded mode reproduces
    again = [torch.load(train(seeded, tmp_path / n, progress=False, log=quiet) / "model.pt",
                        weights_only=True) for n in ("c", "d")]
    assert all(torch.equal(again[0][k], again[1][k]) for k in again[0])


@pytest.mark.parametrize("which", ["norm_bias", "decoder", "adapters"])
def test_frozen_parameters_get_no_gradient_and_no_noise(which):
    cfg = RunConfig(method="dp_sgd", noise_multiplier=5.0, image_size=(16, 16), base_width=8,
                    depth=2, batch_size=2, trainable=which)
    net = build_model("unet", 8, 2)
    if which == "adapters":
        add_adapters(net, rank=2)
    n = set_trainable(net, which)
    assert 0 < n < sum(p.numel() for p in net.parameters())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    frozen = {k for k, p in net.named_parameters() if not p.requires_grad}
    dp = build_method(cfg)
    data = TensorDataset(torch.randn(4, 1, 16, 16), torch.randint(0, 9, (4, 16, 16)))
    model, opt, loader = dp.attach(
        net, torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1),
        DataLoader(data, batch_size=2))
    x, y = data[:2]
    per_sample_loss(model(x), y).mean().backward()
    opt.step()
    after = net.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in frozen)
    assert all(not torch.equal(after[k], before[k]) for k, p in net.named_parameters()
               if p.requires_grad)                            # noise reached every trained one
    assert dp.engine.accountant.history == [(5.0, 0.5, 1)]   # accounting unchanged


def test_trainable_subsets_select_the_documented_parameters():
    net = build_model("unet", 8, 2)
    set_trainable(net, "norm_bias")
    names = {k for k, p in net.named_parameters() if p.requires_grad}
    assert "head.weight" in names and all(
        k.startswith("head.") or k.endswith("bias") or ".1." in k or ".4." in k for k in names)
    assert not any(k.endswith("weight") and "conv" in k for k in names)
    set_trainable(net, "decoder")
    assert {k.split(".")[0] for k, p in net.named_parameters() if p.requires_grad} == {
        "ups", "decoder", "head"}


@pytest.mark.slow   # two real 2-epoch trainings
def test_ema_run_saves_the_averaged_weights(tmp_path):
    base = RunConfig(**{**TINY, "epochs": 2}, method="dp_sgd", noise_multiplier=1.0)
    plain = torch.load(train(base, tmp_path, progress=False, log=quiet) / "model.pt",
                       weights_only=True)
    ema = torch.load(train(base.replace(ema_decay=0.5), tmp_path, progress=False, log=quiet)
                     / "model.pt", weights_only=True)
    # same seed, same noise: the raw iterates are equal, so a difference is the averaging
    assert any(not torch.equal(plain[k], ema[k]) for k in plain)


def test_weight_average_is_the_exponential_average_of_the_iterates():
    net = torch.nn.Linear(3, 2)
    w0, b0 = net.weight.detach().clone(), net.bias.detach().clone()
    average = WeightAverage(net, 0.5)
    for _ in range(3):                                        # iterates w0+1, w0+2, w0+3
        with torch.no_grad():
            net.weight.add_(1.0)
            net.bias.add_(1.0)
        average.update(net)
    # a1 = w0 + 0.5, a2 = 0.5·a1 + 0.5·(w0+2) = w0 + 1.25, a3 = w0 + 2.125
    torch.testing.assert_close(average.model.weight, w0 + 2.125)
    torch.testing.assert_close(average.model.bias, b0 + 2.125)
    assert not average.model.weight.requires_grad               # never trained itself


def test_fluid_weight_scales_the_cross_entropy_of_fluid_pixels_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 9, 6, 5)
    target = torch.randint(0, 9, (2, 6, 5))
    target[0, 0, :] = 8                                       # some fluid in sample 0
    w = torch.ones(9)
    w[8] = 4.0
    ce = -(torch.log_softmax(logits, 1).gather(1, target[:, None])[:, 0] * w[target]).mean((1, 2))
    base = per_sample_loss(logits, target, dice_weight=0.0)
    assert torch.allclose(per_sample_loss(logits, target, 0.0, fluid_weight=4.0), ce)
    assert not torch.allclose(ce, base)


def test_epsilon_is_recorded_with_what_it_implies_for_a_patient(tmp_path):
    cfg = RunConfig(**TINY, method="dp_sgd", noise_multiplier=1.0)
    meta = json.loads((train(cfg, tmp_path, progress=False, log=quiet) / "config.json").read_text())
    k = meta["scans_per_subject"]
    assert k == 1                                 # every phantom scan is its own subject
    assert (meta["subject_epsilon"], meta["subject_delta"]) == group_privacy(
        meta["epsilon"], cfg.delta, k)
    lines = []
    train(cfg.replace(seed=1), tmp_path, progress=False, log=lines.append)
    assert any("(ε, δ) is B-scan-level: it protects one B-scan" in line for line in lines)


def test_a_diverging_run_fails_with_the_reason_after_one_epoch(tmp_path):
    cfg = RunConfig(**{**TINY, "epochs": 3}, optimizer="sgd", lr=1e30)
    with pytest.raises(Diverged, match="training diverged in epoch 1"):
        train(cfg, tmp_path, progress=False, log=quiet)
    meta = RunStore(tmp_path).read_meta(cfg.run_id())
    assert meta["status"] == "failed" and "diverged" in meta["error"]
    assert meta["epochs_done"] == 0
