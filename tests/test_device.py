"""``--device``: not part of a run's identity, recorded in the run, refused when absent.

Tests marked ``cuda`` run only where torch sees a GPU: there they check that the private
update, a training run and evaluation on the GPU agree with the CPU.
"""

import json

import pytest
import torch

from dpstudy.cli import build_parser
from dpstudy.config import RunConfig
from dpstudy.device import CHANNELS_LAST, describe, place_model, resolve_device
from dpstudy.errors import ConfigError
from dpstudy.evaluate import evaluate_run
from dpstudy.losses import per_sample_loss
from dpstudy.models import build_model
from dpstudy.privacy.ghost import BookKeepingDPOptimizer, BookKeepingModule
from dpstudy.privacy.sparsification import Sparsifier
from dpstudy.store import RunStore, load_checkpoint
from dpstudy.train import train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
TINY = dict(data="synthetic", limit=4, image_size=(32, 32), base_width=8, depth=2, epochs=1,
            batch_size=2)


def test_the_device_never_changes_a_run_id_and_stored_ids_stay_valid():
    # the mode that was the default when the id below was stored
    cfg = RunConfig(method="dp_sgd", noise_multiplier=1.0, grad_sample_mode="native_conv")
    ids = {cfg.replace(device=d).run_id() for d in ("auto", "cpu", "cuda", "mps")}
    # the id this config had before the field existed (dpstudy at 919efb8)
    assert ids == {"unet-dp_sgd-sigma1-2c532411"}
    old = {k: v for k, v in cfg.to_dict().items() if k != "device"}   # an older config.json
    assert RunConfig.from_dict(old).run_id() == cfg.run_id()


def test_an_unknown_device_is_refused_by_name():
    with pytest.raises(ConfigError, match="device='tpu'.*auto, cpu, cuda, mps"):
        RunConfig(device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error_and_auto_falls_back():
    with pytest.raises(ConfigError, match="device=cuda.*no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type in ("cpu", "mps")


def test_cli_flags_reach_the_config_and_the_commands():
    parser = build_parser()
    assert parser.parse_args(["train", "--device", "cpu"]).device == "cpu"
    assert parser.parse_args(["sweep", "--device", "cuda"]).device == "cuda"
    assert parser.parse_args(["evaluate", "r", "--device", "cpu"]).device == "cpu"
    assert parser.parse_args(["audit", "r", "--device", "cpu"]).device == "cpu"
    assert parser.parse_args(["audit", "r"]).device == "auto"


def test_sparsification_masks_are_the_same_on_every_device():
    """Drawn on the CPU, moved once: the same seed gives the same masks anywhere."""
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    masks = []
    for device in devices:
        sp = Sparsifier([torch.Size([5, 7]), torch.Size([3])], 0.5, 1, 1, seed=4, device=device)
        sp.maybe_refresh(0, 0, 1)
        assert all(m.device.type == device for m in sp.masks)
        masks.append([m.cpu() for m in sp.masks])
    assert all(torch.equal(a, b) for other in masks[1:] for a, b in zip(masks[0], other))


def _train_on(device, tmp_path, **fields):
    cfg = RunConfig(model="unet", method="dp_sgd", noise_multiplier=1.0, device=device,
                    grad_sample_mode="ghost_mixed", **TINY, **fields)
    run_dir = train(cfg, tmp_path, progress=False, log=lambda *_: None)
    return cfg, run_dir, json.loads((run_dir / "config.json").read_text())


def test_a_run_records_where_it_ran_and_saves_a_portable_checkpoint(tmp_path):
    cfg, run_dir, meta = _train_on("cpu", tmp_path)
    fmt = "channels_last" if CHANNELS_LAST["cpu"] else "contiguous"
    assert meta["status"] == "completed", meta.get("error")
    assert (meta["device"], meta["memory_format"]) == ("cpu", fmt)
    assert meta["config"]["device"] == "cpu"
    state = load_checkpoint(RunStore(tmp_path), cfg.run_id())
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in state.values())


@cuda
def test_ghost_update_on_the_gpu_equals_the_cpu_update():
    torch.manual_seed(0)
    model = build_model("nested_unet", 16, 2)
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 9, (4, 16, 16))
    grads = {}
    for device in ("cpu", "cuda"):
        d = torch.device(device)
        wrapped = BookKeepingModule(place_model(build_model("nested_unet", 16, 2), d))
        wrapped._module.load_state_dict(model.state_dict())
        opt = BookKeepingDPOptimizer(torch.optim.SGD(wrapped.parameters(), lr=0.1),
                                     noise_multiplier=0.0, max_grad_norm=0.05,
                                     expected_batch_size=4)
        per_sample_loss(wrapped(x.to(d)), y.to(d)).mean().backward()
        opt.pre_step()
        grads[device] = [p.grad.cpu() for p in wrapped.parameters()]
        assert describe(d)["device"].startswith(device)
    for a, b in zip(grads["cpu"], grads["cuda"]):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)


@cuda
@pytest.mark.parametrize("method", ["dp_sgd", "random_sparsification"])
def test_training_and_evaluation_on_the_gpu(tmp_path, method):
    cfg, run_dir, meta = _train_on("cuda", tmp_path, method=method)
    assert meta["status"] == "completed", meta.get("error")
    assert meta["device"].startswith("cuda:")
    on_gpu = evaluate_run(tmp_path, cfg.run_id(), device="cuda")
    on_cpu = evaluate_run(tmp_path, cfg.run_id(), device="cpu")
    assert on_gpu["loss"] == pytest.approx(on_cpu["loss"], rel=1e-3)
