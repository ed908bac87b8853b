"""PyTorch state_dict <-> Flax variables (jaxres.convert), against the PyTorch twin model."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxres.convert import flax_to_torch, torch_to_flax
from jaxres.errors import JaxresError
from jaxres.models import CustomResNet
from tests.helpers import random_variables

WIDTH = 0.125


@pytest.mark.parametrize("norm", ["batch", "group", "layer"])
def test_round_trip_flax_torch_flax_without_torch(norm):
    model = CustomResNet(width=WIDTH, norm=norm)
    variables = random_variables(model, seed=1)
    state_dict = flax_to_torch(variables, model)
    assert all(isinstance(value, np.ndarray) for value in state_dict.values())
    back = torch_to_flax(state_dict, model)
    assert set(back) == set(variables)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, variables)


def test_names_and_layouts():
    model = CustomResNet(width=WIDTH)
    variables = random_variables(model, seed=0)
    state_dict = flax_to_torch(variables, model)
    kernel = np.asarray(variables["params"]["layer1"]["res1"]["conv"]["kernel"])  # HWIO
    np.testing.assert_array_equal(state_dict["layer1.res1.conv.weight"], kernel.transpose(3, 2, 0, 1))
    dense = np.asarray(variables["params"]["classifier"]["kernel"])  # (in, out)
    np.testing.assert_array_equal(state_dict["classifier.weight"], dense.T)
    np.testing.assert_array_equal(state_dict["prep.conv_block.norm.running_var"], variables["batch_stats"]["prep"]["conv_block"]["norm"]["var"])
    assert state_dict["layer3.res2.norm.num_batches_tracked"] == 0
    assert state_dict["layer3.res2.norm.num_batches_tracked"].dtype == np.int64
    group = CustomResNet(width=WIDTH, norm="group")
    group_dict = flax_to_torch(random_variables(group, seed=0), group)
    assert "prep.conv_block.norm.weight" in group_dict and "prep.conv_block.norm.bias" in group_dict
    assert not any("running" in name or "tracked" in name for name in group_dict)


def test_errors_name_the_key():
    model = CustomResNet(width=WIDTH)
    state_dict = flax_to_torch(random_variables(model, seed=0), model)

    missing = dict(state_dict)
    del missing["layer2.conv_block.norm.running_mean"]
    with pytest.raises(JaxresError, match=r"missing key\(s\): layer2\.conv_block\.norm\.running_mean"):
        torch_to_flax(missing, model)

    extra = dict(state_dict, **{"head.weight": np.zeros(3)})
    with pytest.raises(JaxresError, match=r"unexpected key\(s\): head\.weight"):
        torch_to_flax(extra, model)

    wrong = dict(state_dict)
    wrong["classifier.weight"] = wrong["classifier.weight"].T
    with pytest.raises(JaxresError, match=r"classifier\.weight.*shape"):
        torch_to_flax(wrong, model)

    # num_batches_tracked of a BatchNorm is optional on import.
    lean = {name: value for name, value in state_dict.items() if not name.endswith("num_batches_tracked")}
    torch_to_flax(lean, model)

    # Flax side: a variable that is missing or has the wrong shape.
    variables = random_variables(model, seed=0)
    params = dict(variables["params"])
    del params["classifier"]
    with pytest.raises(JaxresError, match=r"missing variable\(s\): params/classifier/bias"):
        flax_to_torch({**variables, "params": params}, model)
    with pytest.raises(JaxresError, match=r"params/classifier/(kernel|bias) has shape"):
        other = random_variables(CustomResNet(width=WIDTH, num_classes=3), seed=0)
        flax_to_torch({**variables, "params": {**variables["params"], "classifier": other["params"]["classifier"]}}, model)


@pytest.mark.parametrize("norm", ["batch", "group", "layer"])
def test_torch_to_flax_logits_match(norm):
    torch = pytest.importorskip("torch")
    from benchmarks.torch_reference import CustomResNet as TorchResNet

    torch.manual_seed(0)
    torch_model = TorchResNet(width=WIDTH, norm=norm).eval()
    with torch.no_grad():  # random affines and running statistics, so that nothing is trivial
        for name, tensor in torch_model.state_dict().items():
            if name.endswith(("running_var", "norm.weight")):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith(("running_mean", "norm.bias")):
                tensor.normal_(0.0, 0.2)
    model = CustomResNet(width=WIDTH, norm=norm)
    variables = torch_to_flax(torch_model.state_dict(), model)
    if norm == "batch":
        assert set(variables) == {"params", "batch_stats"}
    else:
        assert set(variables) == {"params"}

    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    logits = np.asarray(model.apply(variables, images, train=False))
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)

    # torch -> flax -> torch is the identity (num_batches_tracked comes back as 0).
    back = flax_to_torch(variables, model)
    original = torch_model.state_dict()
    assert set(back) == set(original)
    for name, tensor in original.items():
        if name.endswith("num_batches_tracked"):
            assert back[name] == 0
        else:
            np.testing.assert_array_equal(back[name], tensor.numpy(), err_msg=name)

    # and loads strictly into a fresh twin, giving the same logits.
    fresh = TorchResNet(width=WIDTH, norm=norm).eval()
    fresh.load_state_dict(flax_to_torch(variables, model, tensors=True), strict=True)
    with torch.no_grad():
        again = fresh(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(again, expected, atol=1e-6, rtol=0)
