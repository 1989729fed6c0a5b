"""Contract tests over the slide-model registry, and saving/loading a trained model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nic.errors import DataError, OptionError
from nic.learn import ModelSpec, SlideModel, TargetScale, create_model, list_models, register_model
from nic.learn.models import CellRatio, MeanPool, NicSlideCNN, nic_cnn_strides

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_lists_the_three_models() -> None:
    assert {"nic-cnn", "meanpool", "abmil"} <= set(list_models())
    with pytest.raises(OptionError, match=r"`model` must be one of abmil, meanpool, nic-cnn \(got 'resnet'\)"):
        create_model("resnet", ModelSpec(4))


def test_registering_a_taken_name_is_refused() -> None:
    with pytest.raises(OptionError, match="'meanpool' is already registered"):
        register_model("meanpool")(lambda spec: torch.nn.Identity())
    register_model("meanpool")(MeanPool)  # the same builder again (a module imported twice) is fine
    assert "meanpool" in list_models()


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize(("h", "w", "n_out"), [(1, 1, 1), (5, 7, 3), (16, 16, 1), (33, 20, 2)])
def test_every_model_forward_backward(name: str, h: int, w: int, n_out: int) -> None:
    torch.manual_seed(0)
    net = create_model(name, ModelSpec(6, n_out, width=16, input_size=max(h, w)))
    x = torch.randn(3, 6, h, w)
    mask = torch.rand(3, h, w) > 0.3
    mask[2] = False  # an all-background crop must not give NaN
    x = x * mask[:, None]
    out = net(x, mask)
    assert out.shape == (3, n_out) and torch.isfinite(out).all()
    out.sum().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    net.eval()
    with torch.no_grad():
        assert torch.isfinite(net(x[:1], mask[:1])).all()  # batch of one in eval mode


@pytest.mark.parametrize("pool", ["max", "mean", "maxmean", "attention"])
def test_nic_cnn_pooling_choices(pool: str) -> None:
    torch.manual_seed(0)
    net = create_model("nic-cnn", ModelSpec(5, 2, width=8, pool=pool, input_size=12))
    mask = torch.rand(4, 12, 12) > 0.4
    out = net(torch.randn(4, 5, 12, 12) * mask[:, None], mask)
    assert out.shape == (4, 2) and torch.isfinite(out).all()
    with pytest.raises(DataError, match="unknown pooling"):
        create_model("nic-cnn", ModelSpec(5, pool="sum"))


@pytest.mark.parametrize(("name", "ratio_heads"), [("meanpool", 0), ("abmil", 0), ("nic-cnn", 0), ("nic-cnn", 3)])
def test_models_ignore_background_cells(name: str, ratio_heads: int) -> None:
    torch.manual_seed(1)
    net = create_model(name, ModelSpec(4, 1, width=8, input_size=6, ratio_heads=ratio_heads)).eval()
    x = torch.randn(2, 4, 6, 6)
    mask = torch.zeros(2, 6, 6, dtype=torch.bool)
    mask[:, 1:4, 2:5] = True
    y = x.clone()
    y[:, :, ~mask[0]] = 99.0
    with torch.no_grad():
        assert torch.allclose(net(x, mask), net(y, mask), atol=1e-6)


def test_cell_ratio_is_the_log_of_gated_mean_evidence() -> None:
    """evidence = softplus(leaky(code 0)), gate = sigmoid(code 1 - 0.5): numpy by hand."""
    r = CellRatio(2, 1, hidden=2)
    with torch.no_grad():
        for mlp, ch, bias in ((r.evidence, 0, 0.0), (r.gate, 1, -0.5)):
            mlp[0].weight.zero_(), mlp[0].bias.zero_(), mlp[2].weight.zero_()
            mlp[0].weight[0, ch] = 1.0
            mlp[2].weight[0, 0] = 1.0
            mlp[2].bias.fill_(bias)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 2, 5, 4)).astype(np.float32)
    mask = rng.random((2, 5, 4)) > 0.4
    out = r(torch.from_numpy(z), torch.from_numpy(mask)).detach().numpy()
    leaky = np.where(z[:, 0] > 0, z[:, 0], 0.2 * z[:, 0])
    e, g = np.log1p(np.exp(leaky)), mask / (1 + np.exp(-(np.maximum(z[:, 1], 0.2 * z[:, 1]) - 0.5)))
    want = np.log((g * e).sum((1, 2)) / (g.sum((1, 2)) + 1) + 0.01)
    np.testing.assert_allclose(out[:, 0], want, rtol=1e-5)


def test_nic_cnn_trains_its_ratio_branch_and_its_conv_path_in_stages() -> None:
    torch.manual_seed(0)
    net = create_model("nic-cnn", ModelSpec(6, 1, width=8, input_size=8, ratio_heads=3))
    assert isinstance(net, NicSlideCNN) and net.stages == ("ratio", "conv")
    with torch.no_grad():
        net.head[-1].weight.normal_()  # the conv path's output non-zero (the branch's is from the start)
    x, mask = torch.randn(4, 6, 8, 8), torch.rand(4, 8, 8) > 0.2
    branch = {n for n, _ in net.named_parameters() if n.startswith(("ratio.0.", "ratio_out.0."))}
    assert len(branch) == 10  # 2 MLPs x 2 convs x (weight, bias) + the output layer
    for stage in net.stages:
        net.set_stage(stage)
        net.zero_grad(set_to_none=True)
        net(x, mask).sum().backward()
        for n, prm in net.named_parameters():
            trains = (n in branch) == (stage == "ratio")
            assert prm.requires_grad == trains and (prm.grad is not None) == trains, (stage, n)
    net.set_stage("all")
    net.eval()
    with torch.no_grad():
        whole = net(x, mask)
        net.set_stage("ratio")
        ratio_only = net(x, mask)
        net.set_stage("all")
        assert torch.allclose(whole - ratio_only, net._conv_path(net.standardise(x, mask), mask), atol=1e-5)
    before = net.ratio[0].evidence[0].weight.clone()
    net.restart_stage("ratio", torch.Generator().manual_seed(5))
    again = create_model("nic-cnn", ModelSpec(6, 1, width=8, input_size=8, ratio_heads=3))
    again.restart_stage("ratio", torch.Generator().manual_seed(5))
    assert not torch.equal(net.ratio[0].evidence[0].weight, before)
    assert torch.equal(net.ratio[0].evidence[0].weight, again.ratio[0].evidence[0].weight)
    assert torch.equal(net.ratio_out[0].weight, again.ratio_out[0].weight) and net.ratio_out[0].weight.abs().min() > 0
    assert not net.ratio_out[0].bias.any()
    with pytest.raises(OptionError, match=r"`stage` 'conv' is not one of this network's stages all"):
        create_model("nic-cnn", ModelSpec(6, 1, width=8, input_size=8)).set_stage("conv")


def test_copies_of_the_ratio_branch_train_one_at_a_time_and_are_averaged() -> None:
    torch.manual_seed(0)
    net = create_model("nic-cnn", ModelSpec(6, 1, width=8, input_size=8, ratio_heads=3, ratio_branches=3))
    assert isinstance(net, NicSlideCNN)
    x, mask = torch.randn(4, 6, 8, 8), torch.rand(4, 8, 8) > 0.2
    z = net.standardise(x, mask)
    with torch.no_grad():
        copies = [out(r(z, mask)) for r, out in zip(net.ratio, net.ratio_out)]
    for k in range(3):
        net.set_stage("ratio", k)
        net.zero_grad(set_to_none=True)
        out = net(x, mask)
        assert torch.allclose(out, copies[k])
        out.sum().backward()
        trained = {n for n, prm in net.named_parameters() if prm.grad is not None}
        assert trained == {n for n, _ in net.named_parameters() if n.startswith((f"ratio.{k}.", f"ratio_out.{k}."))}
    net.set_stage("ratio", None)
    with torch.no_grad():
        assert torch.allclose(net(x, mask), sum(copies) / 3, atol=1e-6)
        net.ratio_weights.copy_(torch.tensor([0.5, 0.0, 0.5]))  # a start that kept nothing has no share
        assert torch.allclose(net(x, mask), (copies[0] + copies[2]) / 2, atol=1e-6)
        net.set_stage("all")
        assert torch.allclose(net(x, mask) - net._conv_path(z, mask), (copies[0] + copies[2]) / 2, atol=1e-5)
    with pytest.raises(OptionError, match=r"`branch` 3 is not a copy of the ratio branch \(0-2\)"):
        net.set_stage("ratio", 3)


def test_weights_saved_before_the_branch_had_copies_still_load() -> None:
    torch.manual_seed(0)
    net = create_model("nic-cnn", ModelSpec(6, 1, width=8, input_size=8, ratio_heads=3))
    # the names a one-branch network had: ratio.evidence.0.weight, ratio_out.weight, no ratio_weights
    old = {
        k.replace("ratio.0.", "ratio.").replace("ratio_out.0.", "ratio_out."): v
        for k, v in net.state_dict().items()
        if k != "ratio_weights"
    }
    assert "ratio.evidence.0.weight" in old and "ratio_out.weight" in old
    torch.manual_seed(1)
    again = create_model("nic-cnn", ModelSpec(6, 1, width=8, input_size=8, ratio_heads=3))
    again.load_state_dict(old)
    net.eval(), again.eval()
    x, mask = torch.randn(2, 6, 8, 8), torch.rand(2, 8, 8) > 0.2
    with torch.no_grad():
        assert torch.equal(net(x, mask), again(x, mask))


def test_nic_cnn_strides_keep_the_reference_at_its_scale() -> None:
    assert nic_cnn_strides(None) == (2, 2, 2, 2, 2, 2, 1, 1)
    assert nic_cnn_strides(400) == (2, 2, 2, 2, 2, 2, 1, 1)
    assert nic_cnn_strides(1000) == (2, 2, 2, 2, 2, 2, 1, 1)
    assert nic_cnn_strides(64) == (2, 2, 2, 1, 1, 1, 1, 1)  # ends at 8 x 8
    assert nic_cnn_strides(16) == (1,) * 8
    assert nic_cnn_strides(4) == (1,) * 8
    net = create_model("nic-cnn", ModelSpec(3, input_size=400))
    assert sum(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in net.modules()) == 8  # 8 depthwise layers
    assert sum(isinstance(m, torch.nn.Dropout2d) for m in net.modules()) == 8
    pointwise = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)]
    assert len(pointwise) == 9 and pointwise[0].in_channels == 3  # the per-cell stem, then 8 layers
    ref = create_model("nic-cnn", ModelSpec(3, input_size=400, stem=False))
    assert sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) for m in ref.modules()) == 8


@pytest.mark.parametrize("name", list_models())
def test_code_standardisation_makes_models_blind_to_code_scale(name: str) -> None:
    """Codes a*x+b with statistics a*mean+b, a*std give the outputs of x with (mean, std)."""
    torch.manual_seed(3)
    net = create_model(name, ModelSpec(4, 1, width=8, input_size=6)).eval()
    x = torch.randn(2, 4, 6, 6)
    mask = torch.rand(2, 6, 6) > 0.3
    mean, std = np.array([0.5, -1.0, 2.0, 0.0]), np.array([1.0, 2.0, 0.5, 3.0])
    a, b = torch.tensor([3.0, 0.1, 10.0, 1.0]), torch.tensor([-4.0, 7.0, 0.0, 100.0])
    with torch.no_grad():
        net.set_code_stats(mean, std)
        ref = net(x * mask[:, None], mask)
        net.set_code_stats(a.numpy() * mean + b.numpy(), a.numpy() * std)
        out = net((a[:, None, None] * x + b[:, None, None]) * mask[:, None], mask)
    assert torch.allclose(out, ref, atol=1e-4)


def test_code_stats_match_numpy(tmp_path: Path) -> None:
    from nic.learn.data import code_stats, open_sources
    from nic.store import open_store
    from nic.synth import make_planted_cohort

    pc = make_planted_cohort(tmp_path, 4, grid=(10, 12), code_size=5, n_pairs=1, seed=0)
    paths = sorted(pc.stores.glob("*.zarr"))
    cells = np.concatenate([s.load(0)[:, s.tissue] for s in map(open_store, paths)], axis=1)
    mean, std = code_stats(open_sources(paths))
    assert np.allclose(mean, cells.mean(1), atol=1e-5) and np.allclose(std, cells.std(1), atol=1e-5)


@pytest.mark.parametrize("ratio_heads", [0, 2])
def test_slide_model_save_load_roundtrip(tmp_path: Path, ratio_heads: int) -> None:
    torch.manual_seed(2)
    spec = ModelSpec(4, 1, width=8, input_size=8, ratio_heads=ratio_heads)
    net = create_model("nic-cnn", spec)
    net.set_code_stats(np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 1.0, 2.0, 4.0]))
    net.train()
    net(torch.randn(4, 4, 8, 8), torch.ones(4, 8, 8, dtype=torch.bool)).sum().backward()  # move BN stats
    net.eval()
    m = SlideModel("nic-cnn", spec, "regression", 8, net, TargetScale("none", 2.0, 3.0))
    m.save(tmp_path / "m")
    assert not list((tmp_path / "m").glob("*.pt")) and (tmp_path / "m" / "model.safetensors").is_file()
    back = SlideModel.load(tmp_path / "m")
    x, mk = torch.randn(2, 4, 8, 8), torch.ones(2, 8, 8, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(back.net(x, mk), net(x, mk))
    assert np.allclose(back.to_prediction(np.array([[1.0]])), [5.0])
    with pytest.raises(DataError, match="not a saved nic slide model"):
        SlideModel.load(tmp_path)
