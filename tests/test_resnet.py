"""ResNet-18/34 for 32x32 images (kuangliu/pytorch-cifar form) and the ghost batch norm.

Parameter counts and structure come from `jax.eval_shape` (no compilation); the forward
passes use variables filled from NumPy, because compiling Flax's initialisers for a
ResNet-18 takes half a minute on a loaded 2-core CPU.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres import gradcam, models
from jaxres.errors import JaxresError


def variable_shapes(model, image_shape=(32, 32, 3)):
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), train=False))
    return {name: variables[name] for name in ("params", "batch_stats") if name in variables}


def numpy_variables(model, seed=0):
    """Variables of `model`'s structure: kernels ~ U(+-1/sqrt(fan_in)), scales and variances 1, the rest 0."""
    rng = np.random.default_rng(seed)

    def fill(path, shape):
        name = path[-1].key
        if name == "kernel":
            bound = 1 / math.sqrt(math.prod(shape.shape[:-1]))
            return jnp.asarray(rng.uniform(-bound, bound, shape.shape), jnp.float32)
        return jnp.full(shape.shape, 1.0 if name in ("scale", "var") else 0.0, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, variable_shapes(model))


@pytest.fixture(scope="module")
def small_resnet18():
    model = models.create_model("resnet18", width=0.0625)
    return model, numpy_variables(model)


@pytest.fixture(scope="module")
def images():
    return jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))


@pytest.mark.parametrize(
    "name, params, batch_stats", [("resnet18", 11_173_962, 2 * 4_800), ("resnet34", 21_282_122, 2 * 8_512)]
)
def test_parameter_counts_match_the_pytorch_cifar_models(name, params, batch_stats):
    shapes = variable_shapes(models.create_model(name))
    assert models.count_params(shapes["params"]) == params
    assert models.count_params(shapes["batch_stats"]) == batch_stats  # running mean and var per BN channel


def test_resnet18_structure_and_width_scaling():
    params = variable_shapes(models.create_model("resnet18", width=0.5))["params"]
    assert set(params) == {"prep", "layer1", "layer2", "layer3", "layer4", "classifier"}
    assert params["prep"]["conv_block"]["conv"]["kernel"].shape == (3, 3, 3, 32)  # 3x3 stem, no max-pool
    assert set(params["layer1"]) == {"block1", "block2"}
    assert "shortcut_conv" not in params["layer1"]["block1"]  # same shape: identity shortcut
    assert params["layer2"]["block1"]["shortcut_conv"]["kernel"].shape == (1, 1, 32, 64)
    assert "shortcut_conv" not in params["layer2"]["block2"]
    assert params["layer4"]["block1"]["conv1"]["kernel"].shape == (3, 3, 128, 256)
    assert "bias" not in params["layer4"]["block1"]["conv1"]
    assert params["classifier"]["kernel"].shape == (256, 10)
    resnet34 = variable_shapes(models.create_model("resnet34", width=0.5))["params"]
    assert [len(resnet34[f"layer{i}"]) for i in range(1, 5)] == [3, 4, 6, 3]


def test_forward_shapes_stages_and_perturbations(small_resnet18, images):
    model, variables = small_resnet18
    assert models.stage_names(model) == ("prep", "layer1", "layer2", "layer3", "layer4")
    logits, state = jax.jit(
        lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates", "perturbations"])
    )(variables, images)
    chex.assert_shape(logits, (2, 10))
    chex.assert_type(logits, jnp.float32)
    shapes = {name: state["intermediates"][name]["__call__"][0].shape for name in model.STAGES}
    assert shapes == {
        "prep": (2, 32, 32, 4),
        "layer1": (2, 32, 32, 4),
        "layer2": (2, 16, 16, 8),
        "layer3": (2, 8, 8, 16),
        "layer4": (2, 4, 4, 32),
    }
    assert {name: state["perturbations"][name]["output"].shape for name in model.STAGES} == shapes
    # the head: global average pool, then the dense layer, no logit scale
    features = np.asarray(state["intermediates"]["layer4"]["__call__"][0])
    dense = variables["params"]["classifier"]
    expected = features.mean(axis=(1, 2)) @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_training_mode_updates_every_batch_norm(small_resnet18, images):
    model, variables = small_resnet18
    _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, images)
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"], variables["batch_stats"])
    assert all(jax.tree_util.tree_leaves(changed))


@pytest.mark.parametrize("norm", ["group", "layer", "ghost_batch"])
def test_other_norms(norm, images):
    model = models.create_model("resnet18", width=0.0625, norm=norm, num_classes=7)
    shapes = variable_shapes(model)
    assert ("batch_stats" in shapes) == (norm == "ghost_batch")
    variables = numpy_variables(model)
    logits = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0])(variables, images)
    chex.assert_shape(logits, (2, 7))
    assert np.all(np.isfinite(logits))


def test_low_precision_computes_in_dtype_with_float32_logits():
    model = models.create_model("resnet34", width=0.0625, dtype=jnp.bfloat16)
    variables = variable_shapes(model)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
    logits, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]),
        variables,
        jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32),
    )
    assert logits.dtype == jnp.float32 and logits.shape == (2, 10)
    assert state["intermediates"]["layer4"]["__call__"][0].dtype == jnp.bfloat16


def test_gradcam_explains_layer4(small_resnet18):
    model, variables = small_resnet18
    pixels = jax.random.randint(jax.random.PRNGKey(2), (2, 32, 32, 3), 0, 256).astype(jnp.uint8)
    cams = gradcam.gradcam(model, variables, pixels, layer="layer4")
    chex.assert_shape(cams, (2, 32, 32))
    coarse = gradcam.gradcam(model, variables, pixels, targets=3, layer="layer4", upsample=False)
    chex.assert_shape(coarse, (2, 4, 4))
    assert np.all((np.asarray(cams) >= 0) & (np.asarray(cams) <= 1))


def test_unknown_model_and_norm_are_named():
    with pytest.raises(JaxresError, match="unknown model 'resnet50'.*resnet18, resnet34"):
        models.create_model("resnet50")
    with pytest.raises(JaxresError, match="unknown norm 'instance'.*ghost_batch"):
        models.create_model("resnet18", norm="instance")


# --------------------------------------------------------------------------- ghost batch norm


def ghost_batch_norm_reference(x, ghost_size, scale, bias, epsilon=1e-5):
    """NumPy: normalise each consecutive group of ghost_size images over (images, H, W)."""
    groups = x.reshape(-1, ghost_size, *x.shape[1:]).astype(np.float64)
    mean = groups.mean(axis=(1, 2, 3), keepdims=True)
    var = groups.var(axis=(1, 2, 3), keepdims=True)
    out = ((groups - mean) / np.sqrt(var + epsilon)).reshape(x.shape) * scale + bias
    return out, mean.reshape(-1, x.shape[-1]).mean(0), var.reshape(-1, x.shape[-1]).mean(0)


def test_ghost_batch_norm_matches_numpy():
    rng = np.random.default_rng(0)
    # each ghost batch gets its own offset, so that ghost and full-batch statistics differ
    x = (rng.normal(size=(12, 3, 3, 5)) * 2 + np.repeat(rng.normal(size=(3, 1, 1, 5)) * 3, 4, axis=0)).astype(np.float32)
    layer = models.GhostBatchNorm(use_running_average=False, ghost_size=4)
    scale = rng.uniform(0.5, 2, 5).astype(np.float32)
    bias = rng.normal(size=5).astype(np.float32)
    running_mean = rng.normal(size=5).astype(np.float32)
    running_var = rng.uniform(0.5, 2, 5).astype(np.float32)
    variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": running_mean, "var": running_var}}
    out, updates = layer.apply(variables, x, mutable=["batch_stats"])
    expected, ghost_mean, ghost_var = ghost_batch_norm_reference(x, 4, scale, bias)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.9 * running_mean + 0.1 * ghost_mean, rtol=1e-5, atol=1e-6)
    # the running variance from each group's unbiased variance: 4 images x 3 x 3 = 36 values
    np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 * running_var + 0.1 * ghost_var * 36 / 35, rtol=1e-5, atol=1e-6)
    # inference: the running averages normalise, exactly as BatchNorm
    inference = models.GhostBatchNorm(use_running_average=True, ghost_size=4).apply(variables, x)
    expected = (x - running_mean) / np.sqrt(running_var + 1e-5) * scale + bias
    np.testing.assert_allclose(inference, expected, rtol=1e-4, atol=1e-5)


def test_ghost_batch_norm_on_one_ghost_batch_is_batch_norm():
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 4, 4, 3)) * 3 + 1
    batch_norm = models.norm_factory("batch", jnp.float32, train=True)()
    ghost = models.norm_factory("ghost_batch", jnp.float32, train=True)()  # 6 <= GHOST_BATCH_SIZE: one group
    variables = batch_norm.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_structure(ghost.init(jax.random.PRNGKey(0), x)) == jax.tree_util.tree_structure(variables)
    expected, expected_updates = batch_norm.apply(variables, x, mutable=["batch_stats"])
    out, updates = ghost.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(updates, expected_updates, rtol=1e-5, atol=1e-6)


def test_ghost_batch_norm_rejects_a_batch_that_does_not_split():
    layer = models.GhostBatchNorm(use_running_average=False, ghost_size=4)
    variables = layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 3)))
    with pytest.raises(JaxresError, match="multiple of 4"):
        layer.apply(variables, jnp.zeros((6, 2, 2, 3)), mutable=["batch_stats"])
