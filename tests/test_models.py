"""The custom ResNet: structure, parameter count, dtypes, norms, named stages."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres import models
from jaxres.errors import JaxresError


def test_custom_resnet_has_exactly_the_reference_parameter_count():
    model = models.create_model()
    variables = models.init_variables(model, jax.random.PRNGKey(0))
    assert models.count_params(variables["params"]) == 6_573_130
    # running statistics are not parameters, but they exist: 2 x 2240 BN channels
    assert models.count_params(variables["batch_stats"]) == 2 * 2240


def test_width_scales_every_channel_count():
    model = models.create_model(width=0.25)
    variables = models.init_variables(model, jax.random.PRNGKey(0))
    params = variables["params"]
    assert params["prep"]["conv_block"]["conv"]["kernel"].shape == (3, 3, 3, 16)
    assert params["layer1"]["res2"]["conv"]["kernel"].shape == (3, 3, 32, 32)
    assert params["layer3"]["conv_block"]["conv"]["kernel"].shape == (3, 3, 64, 128)
    assert params["classifier"]["kernel"].shape == (128, 10)


@pytest.mark.parametrize("norm", models.NORMS)
def test_forward_shapes_and_float32_logits(norm):
    model = models.create_model(width=0.125, norm=norm, num_classes=7)
    variables = models.init_variables(model, jax.random.PRNGKey(0))
    images = jax.random.normal(jax.random.PRNGKey(1), (3, 32, 32, 3))
    logits = model.apply(variables, images, train=False)
    chex.assert_shape(logits, (3, 7))
    chex.assert_type(logits, jnp.float32)
    if norm in ("batch", "ghost_batch"):
        logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"], variables["batch_stats"])
        assert all(jax.tree_util.tree_leaves(changed))
    else:
        assert "batch_stats" not in variables


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_computes_in_dtype_but_keeps_float32_params(dtype):
    model = models.create_model(width=0.125, dtype=dtype)
    variables = models.init_variables(model, jax.random.PRNGKey(0))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    _, state = model.apply(variables, images, capture_intermediates=True, mutable=["intermediates"])
    assert state["intermediates"]["layer2"]["__call__"][0].dtype == dtype
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    assert logits.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(updates))


def test_stages_are_named_and_reachable_with_capture_intermediates():
    model = models.create_model(width=0.125)
    variables = models.init_variables(model, jax.random.PRNGKey(0))
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    _, state = model.apply(variables, images, capture_intermediates=True, mutable=["intermediates"])
    shapes = {name: state["intermediates"][name]["__call__"][0].shape for name in models.stage_names(model)}
    assert shapes == {"prep": (2, 32, 32, 8), "layer1": (2, 16, 16, 16), "layer2": (2, 8, 8, 32), "layer3": (2, 4, 4, 64)}


def test_layer3_output_includes_the_residual_add():
    """layer3's captured output equals conv_block output + res2 output."""
    model = models.create_model(width=0.125)
    variables = models.init_variables(model, jax.random.PRNGKey(0))
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    _, state = model.apply(variables, images, capture_intermediates=lambda m, _: True, mutable=["intermediates"])
    layer3 = state["intermediates"]["layer3"]
    np.testing.assert_allclose(
        layer3["__call__"][0], layer3["conv_block"]["__call__"][0] + layer3["res2"]["__call__"][0], rtol=1e-6
    )


def test_max_pool_2x2_matches_numpy():
    x = np.random.default_rng(0).normal(size=(2, 6, 8, 3)).astype(np.float32)
    expected = x.reshape(2, 3, 2, 4, 2, 3).max(axis=(2, 4))
    np.testing.assert_array_equal(models.max_pool_2x2(jnp.asarray(x)), expected)


def test_head_is_global_max_pool_dense_and_eighth():
    """logits = 0.125 * (max over h,w of layer3) @ W + 0.125 * b, checked with NumPy."""
    model = models.create_model(width=0.125)
    variables = models.init_variables(model, jax.random.PRNGKey(0))
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    logits, state = model.apply(variables, images, capture_intermediates=True, mutable=["intermediates"])
    features = np.asarray(state["intermediates"]["layer3"]["__call__"][0])
    dense = variables["params"]["classifier"]
    expected = 0.125 * (features.max(axis=(1, 2)) @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"]))
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_unknown_names_raise_clear_errors():
    with pytest.raises(JaxresError, match="unknown norm 'instance'.*batch, group, layer"):
        models.create_model(norm="instance")
    with pytest.raises(JaxresError, match="unknown model 'vgg'"):
        models.create_model("vgg")
    with pytest.raises(JaxresError, match="width must be positive"):
        models.create_model(width=0)


def test_config_names_an_unknown_model_or_norm_before_anything_runs():
    from jaxres.config import TrainConfig

    with pytest.raises(JaxresError, match="unknown model 'vgg'.*custom_resnet, resnet18, resnet34"):
        TrainConfig(model="vgg")
    with pytest.raises(JaxresError, match="unknown norm 'instance'.*ghost_batch"):
        TrainConfig(norm="instance")


def test_batch_norm_equals_flax_batch_norm_in_float64():
    """jaxres's BatchNorm (sums as matrix-vector products, a hand-written backward) against
    flax.linen.BatchNorm with the same settings, in float64: outputs, the running mean (the
    running variance against NumPy: PyTorch's unbiased one, where flax keeps the biased), and
    the gradients of a loss with respect to the input and both parameters, in training and in
    inference mode. Agreement to 1e-12 leaves room only for summation order."""
    import flax.linen as nn

    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(2, 3, (8, 5, 5, 7)))
        weights = jnp.asarray(rng.normal(size=x.shape))
        reference = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=jnp.float64, param_dtype=jnp.float64)
        variables = reference.init(jax.random.PRNGKey(0), x, use_running_average=False)
        variables = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(1, 0.3, a.shape)), variables)

        for train in (True, False):
            ours = models.BatchNorm(use_running_average=not train, dtype=jnp.float64)

            def loss(module, params, inputs):
                collections = {"params": params, "batch_stats": variables["batch_stats"]}
                if train:
                    y, updates = module.apply(collections, inputs, mutable=["batch_stats"])
                else:
                    y, updates = module.apply(collections, inputs), {}
                return jnp.sum(jnp.tanh(y) * weights), (y, updates)

            gradient = jax.grad(loss, argnums=(1, 2), has_aux=True)
            (ours_grads, (ours_y, ours_stats)) = gradient(ours, variables["params"], x)
            reference_mode = nn.BatchNorm(
                use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=jnp.float64, param_dtype=jnp.float64
            )
            (ref_grads, (ref_y, ref_stats)) = gradient(reference_mode, variables["params"], x)
            chex.assert_trees_all_close(ours_y, ref_y, rtol=0, atol=1e-12)
            chex.assert_trees_all_close(ours_grads, ref_grads, rtol=1e-12, atol=1e-12)
            if not train:
                assert ours_stats == ref_stats == {}
                continue
            ours_stats, ref_stats = ours_stats["batch_stats"], ref_stats["batch_stats"]
            chex.assert_trees_all_close(ours_stats["mean"], ref_stats["mean"], rtol=0, atol=1e-12)
            # flax keeps the biased batch variance; jaxres, as PyTorch, the unbiased one
            old = variables["batch_stats"]["var"]
            n = x.size // x.shape[-1]
            chex.assert_trees_all_close(ref_stats["var"], 0.9 * old + 0.1 * np.var(np.asarray(x), axis=(0, 1, 2)), atol=1e-12)
            chex.assert_trees_all_close(ours_stats["var"], 0.9 * old + 0.1 * np.var(np.asarray(x), axis=(0, 1, 2), ddof=1), atol=1e-12)
            assert n == 200


@pytest.mark.parametrize(
    "size, height, width",
    [(2, 6, 8), (2, 7, 9), (2, 5, 5), (2, 6, 3), (2, 28, 28), (2, 3, 2), (3, 3, 3), (3, 7, 8), (3, 9, 6), (3, 4, 5)],
)
def test_max_pool_sends_the_gradient_to_the_first_maximum_as_pytorch(size, height, width):
    """Pooled values and gradients of max_pool_floor (size 2: the ResNets' and airbench's
    blocks, as max_pool_2x2; size 3: airbench's head) equal torch.nn.functional.max_pool2d's
    on inputs full of ties (small integers), where a tie-splitting rule would differ; sizes
    that are not multiples floor as PyTorch's (the last rows or columns dropped, their
    gradient zero)."""
    import torch

    rng = np.random.default_rng(size * 1000 + height * 31 + width)
    x = rng.integers(0, 3, (2, height, width, 3)).astype(np.float32)
    g = rng.normal(size=(2, height // size, width // size, 3)).astype(np.float32)
    pools = [functools.partial(models.max_pool_floor, size=size)] + ([models.max_pool_2x2] if size == 2 else [])
    x_torch = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    pooled_torch = torch.nn.functional.max_pool2d(x_torch, size)
    pooled_torch.backward(torch.tensor(g.transpose(0, 3, 1, 2)))
    for pool in pools:
        pooled, pullback = jax.vjp(pool, jnp.asarray(x))
        (gradient,) = pullback(jnp.asarray(g))
        np.testing.assert_array_equal(np.asarray(pooled), pooled_torch.detach().numpy().transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(np.asarray(gradient), x_torch.grad.numpy().transpose(0, 2, 3, 1))
        assert np.count_nonzero(np.asarray(gradient)) == g.size  # one position per window


def test_batch_norm_statistics_are_accurate_in_float32():
    """The training statistics in float32 on 131,072 rows (a batch of 128 at 32x32) against
    float64: mean and variance within 1e-5 relative (measured 6e-7 and 2e-7; one matrix-vector
    product over all rows gave 8e-6 and, with E[x^2] - E[x]^2, 4e-4)."""
    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 1.0, (128 * 32 * 32, 16)) * rng.uniform(0.1, 3, 16) + rng.normal(0, 2, 16)
    _, mean, var = models.batch_norm_rows(jnp.asarray(x, jnp.float32), jnp.ones(16), jnp.zeros(16), 1e-5)
    np.testing.assert_allclose(np.asarray(mean, np.float64), x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(var, np.float64), x.var(0), rtol=1e-5)


def test_models_import_only_their_math_and_building_one_has_no_side_effects():
    """jaxres.models imports no jaxres module that can build a library, print or read the
    environment (only config's choice checks and errors; jaxres.runtime is the package's own
    __init__'s), and building each model prints nothing. The convolution backend comes in as
    a value: the default `conv` is flax's nn.Conv, which is XLA's (`jaxres.backends.XLA`)."""
    import subprocess
    import sys

    script = (
        "import sys, json, jaxres.models as m\n"
        "for name in m.MODEL_NAMES: m.create_model(name, width=0.0625)\n"
        "print(json.dumps(sorted(n for n in sys.modules if n.startswith('jaxres'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""
    imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert imported == ["jaxres", "jaxres.config", "jaxres.errors", "jaxres.layers", "jaxres.models", "jaxres.runtime"]
    assert done.stdout.count("\n") == 1  # nothing printed but the list

    from jaxres import backends

    assert backends.XLA.conv is models.create_model().conv
    assert models.create_model(conv=backends.XLA.conv) == models.create_model()
