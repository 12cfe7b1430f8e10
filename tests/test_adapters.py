"""Low-rank adapters: the adapted network starts as the pretrained one, trains only its
adapters (and norm_bias's set), clips them per sample like any layer, and is released
merged into the base architecture."""

import copy
import json

import pytest
import torch
from torch import nn

from dpstudy.config import RunConfig
from dpstudy.errors import ConfigError
from dpstudy.evaluate import evaluate_run
from dpstudy.losses import per_sample_loss
from dpstudy.models import build_model
from dpstudy.models.adapters import DOWN, UP, LowRankConv, add_adapters, merged_state_dict
from dpstudy.models.trainable import set_trainable
from dpstudy.privacy.ghost import BookKeepingDPOptimizer, BookKeepingModule
from dpstudy.store import RunStore, load_weights
from dpstudy.train import train

from _runs import TINY, quiet


def _adapted(name="unet", width=8, depth=2, rank=2, seed=0):
    """(a network, an adapted copy of it)."""
    torch.manual_seed(seed)
    base = build_model(name, base_width=width, depth=depth)
    return base, add_adapters(copy.deepcopy(base), rank)


@pytest.mark.parametrize("name", ["unet", "nested_unet"])
def test_adapters_start_at_the_pretrained_function_and_merge_exactly(name):
    base, adapted = _adapted(name)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(adapted(x), base(x))           # B = 0: nothing changed yet
        for k, p in adapted.named_parameters():
            if f".{UP}." in k:
                p.normal_(std=0.3)
        moved = adapted(x)
    assert not torch.allclose(moved, base(x))
    state = merged_state_dict(adapted)
    assert list(state) == list(base.state_dict())        # the base architecture's keys
    base.load_state_dict(state)
    assert torch.allclose(base(x), moved, atol=1e-5)       # W x + B(A x) = (W + BA) x


def test_every_convolution_but_the_head_is_adapted_with_the_stated_rank():
    _, adapted = _adapted(rank=3)
    wrapped = [(n, m) for n, m in adapted.named_modules() if isinstance(m, LowRankConv)]
    plain = build_model("unet", base_width=8, depth=2)
    convs = [n for n, m in plain.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(n for n, _ in wrapped) == sorted(c for c in convs if c != "head")
    assert isinstance(adapted.head, nn.Conv2d) and not isinstance(adapted.head, LowRankConv)
    for _, m in wrapped:
        down, up = getattr(m, DOWN), getattr(m, UP)
        assert down.out_channels == up.in_channels == 3
        assert (down.kernel_size, down.padding, down.stride) == (
            m.base.kernel_size, m.base.padding, m.base.stride)


def test_only_adapters_and_the_norm_bias_set_train():
    _, adapted = _adapted(rank=2)
    n = set_trainable(adapted, "adapters")
    trained = {k for k, p in adapted.named_parameters() if p.requires_grad}
    assert not any(k.endswith("base.weight") for k in trained)     # pretrained W frozen
    lora = {k for k in trained if f".{DOWN}." in k or f".{UP}." in k}
    assert len(lora) == 2 * sum(isinstance(m, LowRankConv) for m in adapted.modules())
    assert "head.weight" in trained and any(k.endswith(".base.bias") for k in trained)
    expected = sum(p.numel() for k, p in adapted.named_parameters() if k in trained)
    # a rank-r update of a k×k conv from c_in to c_out has r·(k²·c_in + c_out) weights
    lora_size = sum(2 * (m.base.weight[0].numel() + m.base.out_channels)
                    for m in adapted.modules() if isinstance(m, LowRankConv))
    assert n == expected and sum(adapted.get_parameter(k).numel() for k in lora) == lora_size


def test_adapter_gradients_are_clipped_per_sample_like_any_layer():
    """The book-keeping path's clipped, noised update of an adapted network equals the one
    formed from per-sample gradients computed one backward per sample."""
    _, model = _adapted(width=16, rank=2)
    with torch.no_grad():
        for k, p in model.named_parameters():
            if f".{UP}." in k:
                p.normal_(std=0.1)                    # so that A gets a gradient too
    set_trainable(model, "adapters")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 1, 16, 16, generator=g), torch.randint(0, 9, (4, 16, 16), generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    reference = []
    for i in range(len(x)):
        reference.append(torch.autograd.grad(
            per_sample_loss(model(x[i:i + 1]), y[i:i + 1]).sum(), params))
    norms = torch.stack([torch.cat([t.flatten() for t in r]).norm() for r in reference])
    bound = 0.5 * norms.min().item()                  # every sample is clipped
    wrapped = BookKeepingModule(model)
    opt = BookKeepingDPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0,
                                 max_grad_norm=bound, expected_batch_size=4,
                                 generator=torch.Generator().manual_seed(1))
    per_sample_loss(wrapped(x), y).mean().backward()
    opt.pre_step()
    assert torch.allclose(torch.cat(opt.norm_log), norms, rtol=1e-4)
    for j, p in enumerate(params):
        clipped = sum(r[j] * min(1.0, bound / n.item()) for r, n in zip(reference, norms)) / 4
        assert torch.allclose(p.grad, clipped, rtol=1e-4, atol=1e-7)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


@pytest.mark.parametrize("mode", ["ghost_mixed", "native_conv"])
def test_an_adapter_run_releases_a_merged_checkpoint_that_scores_as_trained(tmp_path, mode):
    cfg = RunConfig(**{**TINY, "epochs": 2}, method="auto_clip", noise_multiplier=1.0,
                    trainable="adapters", adapter_rank=2, grad_sample_mode=mode)
    run_dir = train(cfg, tmp_path, progress=False, log=quiet)
    meta = json.loads((run_dir / "config.json").read_text())
    plain = build_model("unet", base_width=8, depth=2)
    assert 0 < meta["n_params"] < sum(p.numel() for p in plain.parameters())
    load_weights(RunStore(tmp_path), cfg.run_id(), plain)    # base keys: loads as is
    scored = evaluate_run(tmp_path, cfg.run_id())             # the merged weights, rebuilt
    final = RunStore(tmp_path).read_history(cfg.run_id()).iloc[-1]
    assert scored["dice_fg_mean"] == pytest.approx(final["val_dice_fg_mean"], abs=1e-6)


def test_adapter_rank_is_hash_neutral_and_needs_adapters():
    assert RunConfig(trainable="adapters").run_id() == RunConfig(
        trainable="adapters", adapter_rank=8).run_id()
    assert RunConfig(trainable="adapters", adapter_rank=4).run_id() != RunConfig(
        trainable="adapters").run_id()
    stored = {k: v for k, v in RunConfig().to_dict().items() if k != "adapter_rank"}
    assert RunConfig.from_stored(stored).run_id() == RunConfig().run_id()   # older runs
    with pytest.raises(ConfigError, match="adapter_rank=4 needs trainable='adapters'"):
        RunConfig(adapter_rank=4)
    with pytest.raises(ConfigError, match="adapter_rank=0 must be an integer ≥ 1"):
        RunConfig(trainable="adapters", adapter_rank=0)
