"""Book-keeping with mixed ghost norms (dpstudy/privacy/ghost.py) against first principles.

A per-sample gradient is the gradient of one sample's loss alone, so every reference
here comes from single-sample backward passes through the plain model; the clipped,
noised update is compared parameter by parameter with :class:`StudyDPOptimizer` fed
those gradients, at the same noise seed.
"""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpstudy.errors import ConfigError
from dpstudy.losses import per_sample_loss
from dpstudy.methods import _StudyPrivacyEngine
from dpstudy.models import build_model
from dpstudy.privacy.conv_grad_sample import (PER_SAMPLE_CONV, conv2d_grad_sample,
                                               per_sample_conv_weight_grad)
from dpstudy.privacy.ghost import (BookKeepingDPOptimizer, BookKeepingModule, GhostConvWeight,
                                   ghost_norm_is_cheaper)
from dpstudy.privacy.optimizer import StudyDPOptimizer
from dpstudy.privacy.sparsification import Sparsifier

CONVS = {
    "3x3, no bias": dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, bias=False),
    "3x3, bias": dict(in_channels=3, out_channels=5, kernel_size=3, padding=1),
    "1x1 head": dict(in_channels=4, out_channels=9, kernel_size=1),
    "stride 2, dilation 2": dict(in_channels=2, out_channels=3, kernel_size=3, stride=2,
                                 dilation=2, padding=2),
    "3x5, stride 2, uneven padding": dict(in_channels=4, out_channels=6, kernel_size=(3, 5),
                                          stride=2, padding=(0, 2), bias=False),
}
#: Convolutions whose forward pads its input first (Opacus's sampler zero-pads these).
PADDED = {
    "reflect": dict(in_channels=2, out_channels=3, kernel_size=3, padding=1,
                    padding_mode="reflect"),
    "circular, 3x5": dict(in_channels=2, out_channels=3, kernel_size=(3, 5), padding=(1, 2),
                          padding_mode="circular"),
    "same, 4x4": dict(in_channels=2, out_channels=3, kernel_size=4, padding="same"),
}


def _single_sample_grads(model, x, y):
    """[B, ...] per parameter: the gradient of each sample's loss, one backward each."""
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        per_sample_loss(model(x[i:i + 1]), y[i:i + 1]).sum().backward()
        rows.append([p.grad.clone() for p in model.parameters()])
    return [torch.stack(r) for r in zip(*rows)]


def _backward_per_sample(layer, x, grad_out, params):
    """Per parameter of ``params``, [B, ...]: sample i's gradient of ⟨layer(x_i), grad_out_i⟩,
    one backward each — the reference every per-sample formula here is checked against."""
    rows = [torch.autograd.grad((layer(x[i:i + 1]) * grad_out[i:i + 1]).sum(), params)
            for i in range(len(x))]
    return [torch.stack(r) for r in zip(*rows)]


def _batch(n=4, size=16, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=g), torch.randint(0, 9, (n, size, size),
                                                                            generator=g)


@pytest.mark.parametrize("scale, magnitude", [(1.0, 1.0), (3.0, 1e-3)],
                         ids=["unit scale", "scale 3, norms below 1"])
@pytest.mark.parametrize("kwargs", CONVS.values(), ids=CONVS.keys())
def test_ghost_norm_and_weighted_sum_equal_materialised_per_sample_gradients(kwargs, scale,
                                                                             magnitude):
    """G_i = scale · (sample i's weight gradient): the batch-mean convention scales by B."""
    torch.manual_seed(0)
    conv = nn.Conv2d(**kwargs)
    x = torch.randn(3, kwargs["in_channels"], 9, 9)
    out = conv(x)
    grad_out = torch.randn_like(out) * magnitude
    per_sample = scale * _backward_per_sample(conv, x, grad_out, [conv.weight])[0]
    ghost = GhostConvWeight(conv, x, grad_out, scale=scale)
    assert torch.allclose(ghost.norms(), per_sample.flatten(1).norm(dim=1), rtol=1e-4)
    c = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)   # factors in another dtype
    assert torch.allclose(ghost.weighted_sum(c), torch.einsum("i,i...", c.float(), per_sample),
                          rtol=1e-4, atol=1e-5 * magnitude)
    assert torch.allclose(ghost.materialise(), per_sample, rtol=1e-4, atol=1e-5 * magnitude)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU"))])
@pytest.mark.parametrize("method", ["loop", "grouped"])
@pytest.mark.parametrize("kwargs", [*CONVS.values(), *PADDED.values(), dict(
    in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2)],
    ids=[*CONVS, *PADDED, "groups 2"])
def test_per_sample_conv_weight_grad_methods_equal_single_sample_backward(kwargs, method,
                                                                          device):
    torch.manual_seed(1)
    conv = nn.Conv2d(**kwargs).to(device)
    x = torch.randn(3, kwargs["in_channels"], 8, 8, device=device)
    grad_out = torch.randn_like(conv(x))
    expected = _backward_per_sample(conv, x, grad_out, [conv.weight])[0]
    ours = per_sample_conv_weight_grad(conv, x, grad_out, method)
    assert torch.allclose(ours, expected, atol=1e-5)


def test_the_per_sample_method_is_chosen_by_device_type_with_the_loop_as_fallback(
        monkeypatch):
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(2, 2, 5, 5)
    grad_out = torch.randn_like(conv(x))
    monkeypatch.setitem(PER_SAMPLE_CONV, "cpu", "unknown")
    with pytest.raises(ValueError, match="unknown per-sample convolution method 'unknown'"):
        per_sample_conv_weight_grad(conv, x, grad_out)
    monkeypatch.delitem(PER_SAMPLE_CONV, "cpu")           # a device type without an entry
    torch.testing.assert_close(per_sample_conv_weight_grad(conv, x, grad_out),
                               per_sample_conv_weight_grad(conv, x, grad_out, "loop"))


@pytest.mark.parametrize("kwargs", [PADDED["reflect"], CONVS["3x3, no bias"]],
                         ids=["reflect, bias", "zeros, no bias"])
def test_grad_sampler_casts_activations_and_gives_zeros_for_an_empty_batch(kwargs):
    """Opacus's signature: activations as recorded (here float32 under float64 output
    gradients, as with autocast), output gradients; one entry per trained parameter."""
    torch.manual_seed(3)
    conv = nn.Conv2d(**kwargs).double()
    x = torch.randn(3, kwargs["in_channels"], 6, 6, dtype=torch.float64)
    grad_out = torch.randn_like(conv(x))
    expected = _backward_per_sample(conv, x, grad_out, list(conv.parameters()))
    ours = conv2d_grad_sample(conv, [x.float()], grad_out)
    assert list(ours) == list(conv.parameters())
    for got, e in zip(ours.values(), expected):
        torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-5)
    empty = conv2d_grad_sample(conv, [x[:0].float()], grad_out[:0])   # Opacus's: a zero row
    assert list(empty) == list(conv.parameters())
    assert all(g.shape[1:] == p.shape and not g.any() for p, g in empty.items())


def test_cost_rule_puts_ghost_norms_on_deep_layers_only():
    # U-Net at 128², width 16: top level (T = 128², d = 144, p = 16) and level 3
    # (T = 16², d = 1152, p = 128) materialised, deepest level (T = 8², d = 1152, p = 256)
    # by its ghost norm: T²(d+p) is a third of T·d·p there
    assert not ghost_norm_is_cheaper(128 * 128, 16 * 9, 16)
    assert not ghost_norm_is_cheaper(16 * 16, 128 * 9, 128)
    assert ghost_norm_is_cheaper(8 * 8, 128 * 9, 256)
    # the boundary: d = p = 64 costs T·d·p = 2T²(d+p) at T = 16 positions
    assert not ghost_norm_is_cheaper(16, 64, 64)
    assert ghost_norm_is_cheaper(15, 64, 64)


def _wrapped_pair(model_name, channels_last=False, **opt_kwargs):
    """(BookKeepingModule + its optimizer, plain model copy + StudyDPOptimizer). Width 16,
    depth 2 at 16²: the 4×4 level goes by ghost norms, the others are materialised."""
    torch.manual_seed(0)
    model = build_model(model_name, base_width=16, depth=2)
    reference = copy.deepcopy(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    wrapped = BookKeepingModule(model)

    def optimizer(cls, params, seed=7):
        return cls(torch.optim.SGD(params, lr=0.1), expected_batch_size=4,
                   generator=torch.Generator().manual_seed(seed), **opt_kwargs)
    return (wrapped, optimizer(BookKeepingDPOptimizer, wrapped.parameters()),
            reference, optimizer(StudyDPOptimizer, reference.parameters()))


CLIPPING = {
    "dp_sgd flat": dict(clip_fn="abadi"),
    "dp_sgd per layer": dict(clip_fn="abadi", per_layer=True),
    "auto_clip": dict(clip_fn="automatic", gamma=0.01),
    "auto_clip per layer": dict(clip_fn="automatic", per_layer=True),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("clipping", CLIPPING.values(), ids=CLIPPING.keys())
@pytest.mark.parametrize("model_name", ["unet", "nested_unet"])
def test_clipped_noised_update_equals_materialised_path_layer_by_layer(model_name, clipping,
                                                                       channels_last):
    x, y = _batch()
    kwargs = dict(noise_multiplier=0.5, max_grad_norm=0.05, **clipping)
    wrapped, opt, reference, ref_opt = _wrapped_pair(model_name, channels_last, **kwargs)
    per_sample_loss(wrapped(x), y).mean().backward()
    # book-keeping: no batch weight gradient is formed, and the deep convolutions are
    # clipped by their ghost norms (the test would not cover them otherwise)
    assert all(p.grad is None for p in wrapped.parameters())
    assert any(getattr(p, "ghost_grad", None) is not None for p in wrapped.parameters())
    assert any(getattr(p, "ghost_grad", None) is None and p.dim() == 4
               for p in wrapped.parameters())
    for p, g in zip(reference.parameters(), _single_sample_grads(reference, x, y)):
        p.grad_sample = g
    opt.pre_step()
    ref_opt.pre_step()
    assert torch.allclose(torch.cat(opt.norm_log), torch.cat(ref_opt.norm_log), rtol=1e-4)
    assert torch.equal(torch.cat(opt.clipped_log), torch.cat(ref_opt.clipped_log))
    names = [n for n, _ in reference.named_parameters()]
    for name, p, q in zip(names, wrapped.parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("model_name", ["unet", "nested_unet"])
def test_random_sparsification_falls_back_to_materialised_gradients(model_name):
    """The mask acts on each per-sample gradient before its norm: no ghost norms."""
    x, y = _batch()
    sparsifiers = [Sparsifier([p.shape for p in build_model(model_name, 16, 2).parameters()],
                              final_rate=0.7, refresh=1, epochs=1, seed=3) for _ in range(2)]
    for s in sparsifiers:
        s.maybe_refresh(0, 0, 1)
    wrapped, opt, reference, ref_opt = _wrapped_pair(model_name, noise_multiplier=0.5,
                                                     max_grad_norm=0.05)
    opt.sparsifier, ref_opt.sparsifier = sparsifiers
    per_sample_loss(wrapped(x), y).mean().backward()
    for p, g in zip(reference.parameters(), _single_sample_grads(reference, x, y)):
        p.grad_sample = g
    opt.pre_step()
    ref_opt.pre_step()
    for p, q, m in zip(wrapped.parameters(), reference.parameters(), sparsifiers[0].masks):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6)
        assert (p.grad[m == 0] == 0).all()


def test_augmentation_multiplicity_falls_back_and_averages_copies_first():
    x, y = _batch(n=2)
    x, y = x.repeat_interleave(2, 0) + 0.1 * torch.randn(4, 1, 16, 16), y.repeat_interleave(2, 0)
    wrapped, opt, reference, ref_opt = _wrapped_pair("unet", noise_multiplier=0.5,
                                                     max_grad_norm=0.05, aug_multiplicity=2)
    per_sample_loss(wrapped(x), y).mean().backward()
    for p, g in zip(reference.parameters(), _single_sample_grads(reference, x, y)):
        p.grad_sample = g
    opt.pre_step()
    ref_opt.pre_step()
    for p, q in zip(wrapped.parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_noise_only_step_of_an_empty_batch_uses_the_given_empty_gradients():
    wrapped, opt, reference, ref_opt = _wrapped_pair("unet", noise_multiplier=1.0,
                                                     max_grad_norm=1.0)
    for o, model in ((opt, wrapped), (ref_opt, reference)):
        for p in model.parameters():
            p.grad_sample = torch.zeros((0, *p.shape))
        o.pre_step()
    for p, q in zip(wrapped.parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad) and p.grad.abs().sum() > 0


def test_second_backward_before_the_step_is_refused():
    x, y = _batch()
    wrapped, opt, _, _ = _wrapped_pair("unet", noise_multiplier=1.0, max_grad_norm=1.0)
    per_sample_loss(wrapped(x), y).mean().backward()
    with pytest.raises(RuntimeError, match=r"^ghost_mixed: a second backward pass before the "
                       r"optimizer used the first one's per-sample gradients \(call "
                       r"optimizer\.step\(\) or zero_grad\(\) between backward passes\)$"):
        per_sample_loss(wrapped(x), y).mean().backward()
    opt.zero_grad()
    per_sample_loss(wrapped(x), y).mean().backward()      # after zero_grad it is fine


def test_evaluation_under_no_grad_is_the_plain_model():
    x, _ = _batch()
    wrapped, *_ , reference, _ = _wrapped_pair("nested_unet", noise_multiplier=1.0,
                                               max_grad_norm=1.0)
    with torch.no_grad():
        assert torch.allclose(wrapped(x), reference(x), atol=1e-5)
        assert all(getattr(p, "grad_sample", None) is None for p in wrapped.parameters())


class _MixedNet(nn.Module):
    """Book-kept layers (Conv2d, GroupNorm) next to layers without a book-keeping rule: a
    reflect-padded convolution, a 1×1 head through nn.Linear on the channels, and a frozen
    Linear (no per-sample gradient at all)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.head = nn.Linear(4, 9)

    def forward(self, x):
        h = self.reflect(torch.relu(self.norm(self.conv(x)))).permute(0, 2, 3, 1)
        return self.head(torch.relu(self.frozen(h))).permute(0, 3, 1, 2)


@pytest.mark.parametrize("clipping", CLIPPING.values(), ids=CLIPPING.keys())
def test_layers_without_a_book_keeping_rule_get_materialised_per_sample_gradients(clipping):
    x, y = _batch()
    torch.manual_seed(0)
    model = _MixedNet()
    reference = copy.deepcopy(model)
    wrapped = BookKeepingModule(model)
    kwargs = dict(noise_multiplier=0.5, max_grad_norm=0.05, expected_batch_size=4, **clipping)
    opt = BookKeepingDPOptimizer(torch.optim.SGD(wrapped.parameters(), lr=0.1),
                                 generator=torch.Generator().manual_seed(7), **kwargs)
    ref_opt = StudyDPOptimizer(torch.optim.SGD(reference.parameters(), lr=0.1),
                               generator=torch.Generator().manual_seed(7), **kwargs)
    per_sample_loss(wrapped(x), y).mean().backward()
    trained = [p for p in wrapped.parameters() if p.requires_grad]
    assert all(p.grad_sample.shape == (4, *p.shape) for p in trained)
    assert model.frozen.weight.grad is None and not hasattr(model.frozen.weight, "grad_sample")
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        reference.zero_grad()
        per_sample_loss(reference(x[i:i + 1]), y[i:i + 1]).sum().backward()
        rows.append([p.grad.clone() for p in ref_params])
    for p, g in zip(ref_params, map(torch.stack, zip(*rows))):
        p.grad_sample = g
    for p, q in zip(trained, ref_params):   # per-sample gradients of each sample's own loss
        if not torch.isnan(p.grad_sample).all():   # (ghost placeholders are NaN)
            assert torch.allclose(p.grad_sample, q.grad_sample, rtol=1e-4, atol=1e-6)
    opt.pre_step()
    ref_opt.pre_step()
    for p, q in zip(trained, ref_params):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_a_layer_without_any_per_sample_rule_is_refused_by_name():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x * self.s

    model = nn.Sequential(nn.Conv2d(1, 4, 3), Scale())
    with pytest.raises(ConfigError, match=r"layer '1' \(Scale\).*grad_sample_mode functorch"):
        BookKeepingModule(model)
    with pytest.raises(ValueError, match="^loss_reduction='none': use mean or sum$"):
        BookKeepingModule(nn.Conv2d(1, 4, 3), loss_reduction="none")


def test_a_summed_loss_declared_to_the_engine_reaches_the_book_keeping_model():
    """``loss_reduction="sum"``: each per-sample gradient is that of the sample's own
    loss, not B times it, and the update is their (clipped) sum, not divided by B. Loss
    Σ outputs: the bias gradient of every sample and channel is the number of output
    positions, 5·5; with no noise and a bound no gradient reaches, the update 3·25."""
    engine = _StudyPrivacyEngine({}, "rdp", bookkeeping=True)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1))
    loader = DataLoader(TensorDataset(torch.zeros(3, 1, 5, 5)), batch_size=3)
    model, opt, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader, noise_multiplier=0.0, max_grad_norm=1e6, loss_reduction="sum",
        poisson_sampling=False)
    assert isinstance(model, BookKeepingModule)
    model(torch.randn(3, 1, 5, 5)).sum().backward()
    bias = model._module[0].bias
    torch.testing.assert_close(bias.grad_sample, torch.full((3, 2), 25.0))
    opt.step()
    torch.testing.assert_close(bias.grad, torch.full((2,), 75.0))


class _RoutedNet(nn.Module):
    """One layer per routing case (outputs 6×10, then 3×5): GroupNorms with non-trivial
    affine parameters (on the one-channel input and output, one with a frozen bias and
    its own eps, one with a frozen weight), a materialised convolution, a grouped and dilated convolution, one with a frozen weight
    and a trained bias, one through the grad sampler (reflect padding), a ghost-norm one
    at 3×5 (T = 15 < 16.9 positions, the cost rule's boundary at d = 72, p = 64) and a
    one-channel head."""

    def __init__(self):
        super().__init__()
        self.norm_in = nn.GroupNorm(1, 1)
        self.first = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8, eps=0.1)
        self.norm_frozen_weight = nn.GroupNorm(4, 8)
        self.norm_out = nn.GroupNorm(1, 1)
        for norm in (self.norm_in, self.norm, self.norm_frozen_weight, self.norm_out):
            nn.init.normal_(norm.weight)
            nn.init.normal_(norm.bias)
        self.norm.bias.requires_grad_(False)
        self.norm_frozen_weight.weight.requires_grad_(False)
        self.grouped = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.frozen_weight = nn.Conv2d(8, 8, 1)
        self.frozen_weight.weight.requires_grad_(False)
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.deep = nn.Conv2d(8, 64, 3, stride=2, padding=1)
        self.head = nn.Conv2d(64, 1, 1)

    def forward(self, x):
        h = self.grouped(torch.relu(self.norm(self.first(self.norm_in(x)))))
        h = self.reflect(self.frozen_weight(self.norm_frozen_weight(h)))
        return self.norm_out(self.head(torch.relu(self.deep(torch.tanh(h)))))


@pytest.mark.parametrize("batch", [3, 1])
def test_each_layer_is_routed_by_its_rule_and_its_gradients_are_per_sample(batch):
    """Ghost norms exactly where the convolution's own T, d, p make them cheaper (groups 1,
    zero padding); evaluation is the plain model and keeps no inputs; the ghost layer's
    placeholder is a NaN view of the parameter's shape and dtype; every per-sample
    gradient — materialised or from the ghost — is that of the sample's own loss; a frozen
    parameter gets none and still passes the gradient on to the layers before it."""
    torch.manual_seed(0)
    model = _RoutedNet().double()
    reference = copy.deepcopy(model)
    wrapped = BookKeepingModule(model)
    x, r = torch.randn(batch, 1, 6, 10, dtype=torch.float64), torch.randn(batch, 1, 3, 5,
                                                                             dtype=torch.float64)
    sampled = next(h.__self__ for h in model.reflect._forward_hooks.values())
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x=x), reference(x))     # keywords reach the model
    assert sampled.inputs == []                          # evaluation keeps no activations
    (wrapped(x) ** 2 * r).flatten(1).sum(1).mean().backward()
    assert not any(hasattr(p, "grad_sample") for p in model.parameters() if not p.requires_grad)
    rows = []
    for i in range(batch):
        reference.zero_grad()
        (reference(x[i:i + 1]) ** 2 * r[i:i + 1]).sum().backward()
        rows.append([p.grad.clone() for p in reference.parameters() if p.requires_grad])
    expected = map(torch.stack, zip(*rows))
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for (name, p), e in zip(trained, expected):
        layer = getattr(model, name.split(".")[0])
        ghost = getattr(p, "ghost_grad", None)
        if name.endswith("weight") and isinstance(layer, nn.Conv2d):
            out = {"deep": 15, "head": 15}.get(name.split(".")[0], 60)
            d, channels_out = p[0].numel(), len(p)
            assert (ghost is not None) == (layer.groups == 1 and layer.padding_mode == "zeros"
                                           and ghost_norm_is_cheaper(out, d, channels_out)), name
        if ghost is not None:
            placeholder = p.grad_sample
            assert placeholder.shape == (batch, *p.shape) and placeholder.dtype == p.dtype
            assert torch.isnan(placeholder).all() and not any(placeholder.stride())  # no memory
            torch.testing.assert_close(ghost.norms(), e.flatten(1).norm(dim=1))
            torch.testing.assert_close(ghost.materialise(), e)
        else:
            torch.testing.assert_close(p.grad_sample, e, msg=name)
    assert sum(getattr(p, "ghost_grad", None) is not None for _, p in trained) == 1


def test_a_model_of_ghost_layers_only_is_clipped_by_ghost_norms():
    """Every trained parameter a ghost (no materialised gradient at all): the update is
    still the clipped, noised sum of the per-sample gradients."""
    torch.manual_seed(0)
    model = nn.Conv2d(64, 64, 3, padding=1, bias=False)        # T = 16 at 4×4: ghost norms
    reference = copy.deepcopy(model)
    wrapped = BookKeepingModule(model)
    x, r = torch.randn(3, 64, 4, 4), torch.randn(3, 64, 4, 4)
    kwargs = dict(noise_multiplier=0.5, max_grad_norm=1.0, expected_batch_size=3)
    opt = BookKeepingDPOptimizer(torch.optim.SGD(wrapped.parameters(), lr=0.1),
                                 generator=torch.Generator().manual_seed(7), **kwargs)
    ref_opt = StudyDPOptimizer(torch.optim.SGD(reference.parameters(), lr=0.1),
                               generator=torch.Generator().manual_seed(7), **kwargs)
    (wrapped(x) * r).flatten(1).sum(1).mean().backward()
    assert model.weight.ghost_grad is not None
    reference.weight.grad_sample = _backward_per_sample(reference, x, r, [reference.weight])[0]
    opt.pre_step()
    ref_opt.pre_step()
    torch.testing.assert_close(torch.cat(opt.norm_log), torch.cat(ref_opt.norm_log))
    torch.testing.assert_close(model.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-6)


def test_physical_batches_accumulate_into_one_step_and_zero_grad_follows_opacus():
    """A skipped step (the first physical batch of a logical one) keeps its clipped sum
    for the next; a second step on the same per-sample gradients is refused; zero_grad()
    zeroes the gradients and zero_grad(set_to_none=True) drops them, as Opacus's does."""
    torch.manual_seed(0)
    model = nn.Conv2d(64, 64, 3, padding=1)          # weight: ghost norm; bias: materialised
    reference = copy.deepcopy(model)
    wrapped = BookKeepingModule(model)
    kwargs = dict(noise_multiplier=0.5, max_grad_norm=1.0, expected_batch_size=4)
    opts = [cls(torch.optim.SGD(m.parameters(), lr=1.0),
                generator=torch.Generator().manual_seed(7), **kwargs)
            for cls, m in ((BookKeepingDPOptimizer, wrapped), (StudyDPOptimizer, reference))]
    for k in range(2):
        x, r = torch.randn(2, 64, 4, 4), torch.randn(2, 64, 4, 4)
        (wrapped(x) * r).flatten(1).sum(1).mean().backward()
        assert model.weight.ghost_grad is not None
        params = list(reference.parameters())
        for p, g in zip(params, _backward_per_sample(reference, x, r, params)):
            p.grad_sample = g
        for opt in opts:
            opt.signal_skip_step(do_skip=k == 0)
            opt.step()
            if k == 0:
                opt.zero_grad(set_to_none=True)
    for p, q in zip(wrapped.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):
        opts[0].step()
    opts[0].zero_grad()
    assert all(p.grad is not None and not p.grad.any() for p in wrapped.parameters())
    opts[0].zero_grad(set_to_none=True)
    assert all(p.grad is None and p.ghost_grad is None for p in wrapped.parameters())
