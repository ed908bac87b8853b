"""Grad-CAM and relatives (jaxres.gradcam): closed forms, properties, PyTorch parity, CLI.

The metrics themselves are tested in tests/test_cam_metrics.py; the slow trained-model test
here scores real maps with them."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres import cli
from jaxres import gradcam as cam_lib
from jaxres.augment import normalize
from jaxres.errors import JaxresError
from jaxres.cam_metrics import energy_pointing_game, pointing_game_baseline
from jaxres.gradcam import METHODS, gradcam, min_max_normalize, overlay, plot_cams
from jaxres.models import CustomResNet
from tests.helpers import random_variables

WIDTH = 0.25  # channels 16, 32, 64, 128


@pytest.fixture(scope="module")
def model():
    return CustomResNet(width=WIDTH)


@pytest.fixture(scope="module")
def variables(model):
    return random_variables(model, seed=0)


@pytest.fixture(scope="module")
def images():
    """Six synthetic-shape images (structured, so maps are not degenerate)."""
    from jaxres.data.shapes import make_shapes

    return make_shapes(num_train=1, num_test=6, seed=0).test.images


@pytest.fixture(scope="module")
def layer3_and_logits(model, variables, images):
    """(A float32[N,4,4,K] at layer3, logits float32[N,10]) from a plain forward pass."""
    logits, state = jax.jit(
        lambda v, x: model.apply(v, normalize(x), train=False, capture_intermediates=True, mutable=["intermediates"])
    )(variables, images)
    return np.asarray(state["intermediates"]["layer3"]["__call__"][0], np.float64), np.asarray(logits)


@pytest.fixture(scope="module")
def image_gradient(model):
    """d/d images of sum(weights * gradcam(images)): one compiled program for every test."""

    def loss(variables, pixels, weights):
        return jnp.sum(gradcam(model, variables, pixels) * weights)

    return jax.jit(jax.grad(loss, argnums=1))


def pearson(a, b) -> float:
    """Mean Pearson correlation of two stacks of maps [N, H, W], over the pairs where
    neither map is flat (a random network can give all-zero maps); at least 3 such pairs."""
    values = []
    for x, y in zip(np.asarray(a).reshape(len(a), -1), np.asarray(b).reshape(len(b), -1)):
        if x.std() > 0 and y.std() > 0:
            values.append(np.corrcoef(x, y)[0, 1])
    assert len(values) >= 3, "too many flat maps to compare"
    return float(np.mean(values))


# --------------------------------------------------------------------------- closed forms at layer3


def closed_form_gradient(activation, kernel, targets, logit_scale=0.125):
    """dS_c/dA at the last stage: the global max-pool routes W[k, c] * 0.125 to the argmax.

    Where several positions tie for a channel's maximum (dead channels after ReLU are
    all 0), JAX's max splits the gradient equally among them; the Grad-CAM weight (the
    mean over positions) is W[k, c] * 0.125 / (h * w) either way.
    """
    at_max = activation == activation.max(axis=(1, 2), keepdims=True)
    share = at_max / at_max.sum(axis=(1, 2), keepdims=True)
    weights = kernel[:, targets].T * logit_scale  # [N, K]
    return share * weights[:, None, None, :]


def numpy_cam(activation, gradient, method):
    """pytorch-grad-cam 1.5.7's formulas, transcribed from its source into NumPy (float64,
    NHWC), before the ReLU; its `BaseCAM.get_cam_image` is cam = sum_k weights_k A_k."""
    spatial = (1, 2)
    if method == "gradcam":  # grad_cam.py: np.mean(grads, axis=(2, 3))
        weights = gradient.mean(axis=spatial)
    elif method == "gradcam++":  # grad_cam_plusplus.py, eq. 19 of arXiv:1710.11063
        grads_power_2 = gradient**2
        grads_power_3 = grads_power_2 * gradient
        sum_activations = activation.sum(axis=spatial, keepdims=True)
        eps = 0.000001
        aij = grads_power_2 / (2 * grads_power_2 + sum_activations * grads_power_3 + eps)
        aij = np.where(gradient != 0, aij, 0)
        weights = (np.maximum(gradient, 0) * aij).sum(axis=spatial)
    elif method == "hirescam":  # hirescam.py: (grads * activations).sum(axis=1)
        return (gradient * activation).sum(-1)
    elif method == "xgradcam":  # xgrad_cam.py
        sum_activations = activation.sum(axis=spatial, keepdims=True)
        eps = 1e-7
        weights = (gradient * activation / (sum_activations + eps)).sum(axis=spatial)
    else:  # layer_cam.py: (np.maximum(grads, 0) * activations).sum(axis=1)
        return (np.maximum(gradient, 0) * activation).sum(-1)
    return np.einsum("nhwk,nk->nhw", activation, weights)


MIXED_TARGETS = np.array([0, 3, 5, 7, 9, 2])


def test_stage_activation_and_gradient_closed_form_at_layer3(model, variables, images, layer3_and_logits):
    activation, logits = layer3_and_logits
    kernel = np.asarray(variables["params"]["classifier"]["kernel"], np.float64)
    passes = jax.jit(lambda v, x, t: cam_lib.stage_activation_and_gradient(model, v, normalize(x), t, "layer3"))
    got_logits, got_targets, got_activation, got_gradient = passes(variables, images, MIXED_TARGETS)
    np.testing.assert_allclose(np.asarray(got_logits), logits, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got_targets), MIXED_TARGETS)
    np.testing.assert_allclose(np.asarray(got_activation), activation, rtol=1e-6, atol=1e-6)
    expected = closed_form_gradient(activation, kernel, MIXED_TARGETS)
    np.testing.assert_allclose(np.asarray(got_gradient), expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_cam_formulas_match_numpy(variables, layer3_and_logits, method):
    """Each method's map from (A, dS/dA) against pytorch-grad-cam's formula in NumPy."""
    activation, _ = layer3_and_logits
    kernel = np.asarray(variables["params"]["classifier"]["kernel"], np.float64)
    gradient = closed_form_gradient(activation, kernel, MIXED_TARGETS)
    expected = numpy_cam(activation, gradient, method)
    scale = np.abs(expected).max()
    assert scale > 0 and (expected > 0).sum() > expected.size // 4  # not vacuous
    got = cam_lib.cam_from_activation(jnp.asarray(activation, jnp.float32), jnp.asarray(gradient, jnp.float32), method)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "layercam"])
def test_end_to_end_closed_forms_at_layer3(model, variables, images, layer3_and_logits, method):
    """Raw maps (no normalisation, no upsampling) from the model against closed forms.

    At layer3 the head is max-pool then dense, so dS_c/dA_k = 0.125 W[k, c] at A_k's
    argmax (split equally among ties, as JAX differentiates max) and 0 elsewhere:
      Grad-CAM = sum_k 0.125 W[k, c] A_k / (h w)          (checked here before the ReLU)
      HiResCAM = ReLU(sum_k 0.125 W[k, c] A_k [argmax_k])
      LayerCAM = ReLU(sum_k ReLU(0.125 W[k, c]) A_k [argmax_k])
    """
    activation, _ = layer3_and_logits
    kernel = np.asarray(variables["params"]["classifier"]["kernel"], np.float64)
    weights = 0.125 * kernel[:, MIXED_TARGETS].T[:, None, None, :]  # [N, 1, 1, K]
    at_max = activation == activation.max(axis=(1, 2), keepdims=True)
    share = at_max / at_max.sum(axis=(1, 2), keepdims=True)
    h, w = activation.shape[1:3]
    if method == "gradcam":
        expected = (weights * activation).sum(-1) / (h * w)
        relu = False
    elif method == "hirescam":
        expected = np.maximum((weights * share * activation).sum(-1), 0)
        relu = True
    else:
        expected = np.maximum((np.maximum(weights * share, 0) * activation).sum(-1), 0)
        relu = True
    scale = np.abs(expected).max()
    assert scale > 0
    raw = gradcam(model, variables, images, MIXED_TARGETS, method=method, relu=relu, normalize=False, upsample=False)
    assert raw.shape == (len(images), h, w) and raw.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(raw), expected, rtol=1e-4, atol=1e-5 * scale)


# --------------------------------------------------------------------------- properties


def test_output_shapes_range_and_dtype(model, variables, images):
    cams = gradcam(model, variables, images)
    assert isinstance(cams, jax.Array) and cams.shape == (6, 32, 32) and cams.dtype == jnp.float32
    cams = np.asarray(cams)
    peaks = cams.max(axis=(1, 2))
    assert cams.min() == 0.0 and np.all(np.isclose(peaks, 1.0) | (peaks == 0)) and (peaks == 1).sum() >= 3
    float_cams = np.asarray(gradcam(model, variables, images.astype(np.float32)))
    np.testing.assert_allclose(float_cams, cams, atol=1e-6)


def test_batch_invariance(model, variables, images):
    together = np.asarray(gradcam(model, variables, images, layer="layer2"))
    for i in (0, 3):
        alone = np.asarray(gradcam(model, variables, images[i : i + 1], layer="layer2"))
        np.testing.assert_allclose(alone[0], together[i], atol=1e-5)


def test_targets(model, variables, images, layer3_and_logits):
    _, logits = layer3_and_logits
    predicted = logits.argmax(-1)
    np.testing.assert_allclose(
        np.asarray(gradcam(model, variables, images)), np.asarray(gradcam(model, variables, images, predicted)), atol=1e-7
    )
    np.testing.assert_allclose(
        np.asarray(gradcam(model, variables, images, 4)), np.asarray(gradcam(model, variables, images, np.full(6, 4))), atol=1e-7
    )
    first, second = (np.asarray(gradcam(model, variables, images, c)) for c in (1, 2))
    assert np.abs(first - second).max() > 0.1
    with pytest.raises(JaxresError, match="one per image"):
        gradcam(model, variables, images, [1, 2, 3])
    with pytest.raises(JaxresError, match="target class 10 out of range"):
        gradcam(model, variables, images, 10)
    with pytest.raises(JaxresError, match="target class -1 out of range"):
        gradcam(model, variables, images, [0, 1, 2, 3, 4, -1])
    with pytest.raises(JaxresError, match="integers"):
        gradcam(model, variables, images, 1.5)


def test_bad_layer_method_and_images(model, variables, images):
    with pytest.raises(JaxresError, match="unknown layer 'layer4'.*prep, layer1, layer2, layer3"):
        gradcam(model, variables, images, layer="layer4")
    with pytest.raises(JaxresError, match="unknown CAM method 'gradcam\\+'.*gradcam, gradcam\\+\\+, hirescam, xgradcam, layercam, .*, randomcam"):
        gradcam(model, variables, images, method="gradcam+")
    with pytest.raises(JaxresError, match=r"\[N, H, W, 3\].*\(32, 32, 3\)"):
        gradcam(model, variables, images[0])
    with pytest.raises(JaxresError, match=r"\(6, 3, 32, 32\)"):
        gradcam(model, variables, images.transpose(0, 3, 1, 2))


def test_flat_map_gives_zeros_not_nan(model, variables, images, image_gradient):
    assert np.array_equal(np.asarray(min_max_normalize(jnp.full((2, 3, 3), 5.0))), np.zeros((2, 3, 3)))
    params = dict(variables["params"])
    params["classifier"] = {**params["classifier"], "kernel": jnp.zeros_like(params["classifier"]["kernel"])}
    blind = {**variables, "params": params}  # every gradient is zero, so is every map
    for method in ("gradcam", "gradcam++"):
        cams = np.asarray(gradcam(model, blind, images, method=method))
        assert np.array_equal(cams, np.zeros_like(cams)), method
    gradient = image_gradient(blind, images.astype(np.float32), jnp.ones((len(images), 32, 32)))
    assert np.isfinite(np.asarray(gradient)).all()


def test_jit_vmap_and_cache(model, variables, images):
    eager = np.asarray(gradcam(model, variables, images, layer="layer2"))
    predicted = np.asarray(jax.jit(lambda v, x: model.apply(v, normalize(x), train=False))(variables, images)).argmax(-1)
    # traced variables, images and targets (the range check needs concrete targets and is skipped)
    jitted = jax.jit(lambda v, x, t: gradcam(model, v, x, t, layer="layer2"))(variables, images, predicted)
    np.testing.assert_allclose(np.asarray(jitted), eager, atol=1e-6)
    per_image = jax.vmap(lambda x: gradcam(model, variables, x[None], layer="layer2")[0])(images)
    np.testing.assert_allclose(np.asarray(per_image), eager, atol=1e-5)
    # one compiled program per (model, layer, method, flags, shapes): a second call does not retrace
    size = cam_lib._gradcam._cache_size()
    gradcam(model, variables, images, layer="layer2")
    assert cam_lib._gradcam._cache_size() == size


def test_differentiable_with_respect_to_images(model, variables, images, image_gradient):
    pixels = images.astype(np.float32)
    rng = np.random.default_rng(1)
    weights = jnp.asarray(rng.random((len(images), 32, 32)), jnp.float32)
    gradient = image_gradient(variables, pixels, weights)
    gradient = np.asarray(gradient)
    assert gradient.shape == pixels.shape
    assert np.isfinite(gradient).all() and np.abs(gradient).max() > 0


def test_model_randomisation_changes_maps(model, variables, images):
    """Adebayo et al. 2018: maps must depend on the weights (random vs re-initialised)."""
    base = gradcam(model, variables, images)
    other = random_variables(model, seed=1)
    top_reset = {**variables, "params": {**variables["params"], "classifier": other["params"]["classifier"]}}
    assert pearson(base, gradcam(model, random_variables(model, seed=0), images)) > 0.999
    assert pearson(base, gradcam(model, top_reset, images)) < 0.5
    assert pearson(base, gradcam(model, other, images)) < 0.5


# --------------------------------------------------------------------------- PyTorch parity


@pytest.fixture(scope="module")
def torch_twin(model, variables):
    """The PyTorch reference model (benchmarks/torch_reference.py) with the same weights."""
    torch = pytest.importorskip("torch")
    from benchmarks.torch_reference import CustomResNet as TorchResNet
    from jaxres.convert import flax_to_torch

    torch.use_deterministic_algorithms(True)
    twin = TorchResNet(width=WIDTH).float().eval()
    twin.load_state_dict(flax_to_torch(variables, model, tensors=True), strict=True)
    return twin


@pytest.mark.parametrize("layer, targets", [("layer3", None), ("layer3", MIXED_TARGETS), ("layer1", MIXED_TARGETS)])
def test_parity_with_pytorch_hook_gradcam(model, variables, images, layer3_and_logits, torch_twin, layer, targets):
    """Same weights (random, with random BatchNorm statistics), eval mode, float32:
    logits within 1e-4, upsampled and normalised maps within 1e-4 of the hook-based Grad-CAM."""
    import torch

    from benchmarks.torch_reference import torch_gradcam

    inputs = torch.from_numpy(np.asarray(normalize(images)).transpose(0, 3, 1, 2).copy())
    assert inputs.dtype == torch.float32
    with torch.no_grad():
        expected_logits = torch_twin(inputs).numpy()
    _, logits = layer3_and_logits
    np.testing.assert_allclose(logits, expected_logits, atol=1e-4, rtol=0)
    expected = torch_gradcam(torch_twin, inputs, targets, layer)
    cams = np.asarray(gradcam(model, variables, images, targets, layer=layer))
    assert expected.shape == cams.shape == (len(images), 32, 32)
    assert expected.max() == 1.0  # not a flat map
    assert np.abs(cams - expected).max() < 1e-4


def pytorch_grad_cam_postprocess(raw):
    """pytorch-grad-cam 1.5.7's `BaseCAM` after `get_cam_image`, for one target layer:
    ReLU; `scale_cam_image` with the input size (per map (x - min) / (1e-7 + max of that),
    then cv2.resize INTER_LINEAR, which for upsampling is torch's bilinear with
    align_corners=False); `aggregate_multi_layers` (ReLU, `scale_cam_image` again)."""
    import torch
    import torch.nn.functional as F

    def scale(maps):
        maps = maps - maps.min(axis=(1, 2), keepdims=True)
        return maps / (1e-7 + maps.max(axis=(1, 2), keepdims=True))

    small = scale(np.maximum(raw, 0)).astype(np.float32)
    large = F.interpolate(torch.from_numpy(small)[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0].numpy()
    return scale(np.maximum(large, 0))


@pytest.mark.parametrize("method", METHODS)
def test_one_normalisation_matches_pytorch_grad_cams_two(model, variables, images, method):
    """jaxres min-max normalises once, after upsampling; pytorch-grad-cam before and after
    its resize, with 1e-7 in the denominators. On the same raw maps they agree to 1e-5."""
    pytest.importorskip("torch")
    raw = np.asarray(gradcam(model, variables, images, MIXED_TARGETS, layer="layer2", method=method, relu=False, normalize=False, upsample=False))
    expected = pytorch_grad_cam_postprocess(raw)
    assert (expected.max(axis=(1, 2)) > 0.99).sum() >= 3  # mostly not flat
    cams = np.asarray(gradcam(model, variables, images, MIXED_TARGETS, layer="layer2", method=method))
    np.testing.assert_allclose(cams, expected, atol=1e-5)


def test_upsample_matches_torch_bilinear():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    for small, large in ((4, 32), (8, 32), (16, 32), (5, 32), (3, 10), (32, 12)):
        maps = rng.normal(size=(2, small, small)).astype(np.float32)
        expected = F.interpolate(torch.from_numpy(maps)[:, None], size=(large, large), mode="bilinear", align_corners=False)
        np.testing.assert_allclose(np.asarray(cam_lib.upsample(jnp.asarray(maps), (large, large))), expected[:, 0].numpy(), atol=1e-6)


# --------------------------------------------------------------------------- pictures


def test_overlay_and_plot(tmp_path, images):
    cam = np.zeros((32, 32), np.float32)
    cam[8:16, 8:16] = 1.0
    out = overlay(images[0], cam, alpha=0.0)
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out, images[0])
    heat = overlay(images[0], cam, colormap="gray", alpha=1.0)
    assert (heat[8:16, 8:16] == 255).all() and (heat[:8] == 0).all()
    with pytest.raises(JaxresError, match="does not match"):
        overlay(images[0], cam[:16])
    with pytest.raises(JaxresError, match="colormap"):
        overlay(images[0], cam, colormap="no-such-map")
    cams = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    figure = plot_cams(images[:3], cams, [0, 1, 2], [0, 2, 2], class_names=[f"class{i}" for i in range(10)])
    assert len(figure.axes) == 9
    assert figure.axes[0].get_title() == "true: class0, pred: class0"
    assert figure.axes[3].get_title() == "true: class1, pred: class2"
    path = tmp_path / "cams.png"
    figure.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("rows", [1, 16])
def test_plot_title_clears_the_first_row(rows):
    """The suptitle (wrapped to the figure's width) sits above the first row's titles and
    inside the figure, for one row and for the CLI's default 16 (tight_layout put it onto
    the first row there)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    images = np.zeros((rows, 32, 32, 3), np.uint8)
    cams = np.zeros((rows, 32, 32), np.float32)
    title = "gradcam at layer3 (predicted class), test images " + ", ".join(str(1000 + i) for i in range(8)) + " ..."
    figure = plot_cams(images, cams, np.zeros(rows, int), np.ones(rows, int), title=title)
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    (suptitle,) = figure.texts
    assert "\n" in suptitle.get_text()  # wrapped
    title_box = suptitle.get_window_extent(renderer)
    first_row_top = max(axes.title.get_window_extent(renderer).y1 for axes in figure.axes[:3])
    assert title_box.y0 > first_row_top
    assert 0 <= title_box.x0 and title_box.x1 <= figure.bbox.width and title_box.y1 <= figure.bbox.height


# --------------------------------------------------------------------------- trained model (slow)


@pytest.mark.slow
def test_trained_model_localises_shapes_and_fails_randomisation():
    """A small model trained briefly on synthetic shapes: CAM energy falls on the object
    more than chance, and re-initialising the model decorrelates the maps (Adebayo 2018)."""
    import optax

    from jaxres.data.shapes import make_shapes

    dataset = make_shapes(num_train=2048, num_test=64, seed=0)
    model = CustomResNet(width=WIDTH, num_classes=len(dataset.class_names))
    variables = random_variables(model, seed=0)
    optimizer = optax.adam(3e-3)

    @jax.jit
    def step(params, batch_stats, opt_state, x, y):
        def loss(p):
            logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, normalize(x), train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates["batch_stats"]

        (_, batch_stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state

    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = optimizer.init(params)
    for i in range(80):
        batch = slice(i * 64 % 2048, i * 64 % 2048 + 64)
        params, batch_stats, opt_state = step(params, batch_stats, opt_state, dataset.train.images[batch], dataset.train.labels[batch])
    trained = {"params": params, "batch_stats": batch_stats}
    test = dataset.test
    logits = jax.jit(lambda v, x: model.apply(v, normalize(x), train=False))(trained, test.images)
    assert (np.asarray(logits).argmax(-1) == test.labels).mean() > 0.4  # chance is 0.2
    cams = gradcam(model, trained, test.images, test.labels)
    assert float(energy_pointing_game(cams, test.masks)) > 1.5 * float(pointing_game_baseline(test.masks))
    assert pearson(cams, gradcam(model, random_variables(model, seed=9), test.images, test.labels)) < 0.5


# --------------------------------------------------------------------------- command line


@pytest.fixture
def fake_run(monkeypatch, model, variables, images):
    """`load_for_inference`, `load_dataset` and `read_dataset_info` replaced by the test model,
    six images and their dataset.json."""
    from jaxres import data, evaluate, rundir
    from jaxres.config import TrainConfig

    labels = np.array([0, 1, 2, 3, 4, 5], np.int32)
    split = data.Split(images=np.asarray(images), labels=labels)
    dataset = data.Dataset(split, split, tuple(f"class{i}" for i in range(10)), "fake")
    calls = {}

    def load_for_inference(workdir):
        calls["workdir"] = str(workdir)
        return model, variables, TrainConfig(data="shapes", workdir=str(workdir))

    def load_dataset(source, cache_dir=None, **kwargs):
        calls["source"] = source
        return dataset

    info = {"class_names": list(dataset.class_names), "image_shape": list(split.images.shape[1:]), "source": "fake"}
    monkeypatch.setattr(evaluate, "load_for_inference", load_for_inference)
    monkeypatch.setattr(data, "load_dataset", load_dataset)
    monkeypatch.setattr(rundir, "read_dataset_info", lambda workdir: info)
    return calls


def test_cli_writes_the_grid(tmp_path, fake_run, capsys):
    out = tmp_path / "cams.png"
    assert cli.gradcam_main(["--workdir", "RUN", "--misclassified", "3", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert fake_run == {"workdir": "RUN", "source": "shapes"}
    assert f"wrote {out}" in capsys.readouterr().out
    out2 = tmp_path / "indices.png"
    argv = ["--workdir", "RUN", "--data", "elsewhere", "--indices", "0", "5", "--layer", "layer2", "--method", "layercam", "--target", "true", "--out", str(out2)]
    assert cli.gradcam_main(argv) == 0 and out2.is_file()
    assert fake_run["source"] == "elsewhere"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--layer", "layer7", "--indices", "0"], "error: unknown layer 'layer7' for CustomResNet; choose one of prep, layer1, layer2, layer3"),
        (["--indices", "6"], "error: --indices 6 out of range: the test split has 6 images"),
        (["--misclassified", "0"], "error: --misclassified must be positive"),
    ],
)
def test_cli_errors_exit_2_without_traceback(fake_run, capsys, argv, message):
    assert cli.gradcam_main(["--workdir", "RUN", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--misclassified", "0"], ["--batch-size", "0"]])
def test_cli_flag_errors_come_before_loading_the_run(fake_run, capsys, argv):
    assert cli.gradcam_main(["--workdir", "RUN", *argv]) == 2
    assert capsys.readouterr().err.startswith("error: --") and fake_run == {}


@pytest.mark.parametrize("out, message", [("x.txt", "has the suffix .txt"), (".", "is a folder")])
def test_cli_checks_the_output_before_any_work(tmp_path, fake_run, capsys, out, message):
    """Issue 11 item 12: --out x.txt raised ValueError after all the work; a folder printed
    'wrote FOLDER' but wrote FOLDER.png."""
    assert cli.gradcam_main(["--workdir", "RUN", "--indices", "0", "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and message in err and err.count("\n") == 1
    assert fake_run == {}  # neither the run nor the data were loaded
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_an_unwritable_output_without_traceback(tmp_path, fake_run, capsys, monkeypatch):
    from matplotlib.figure import Figure

    out = tmp_path / "cams.png"

    def read_only(self, path, **kwargs):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(Figure, "savefig", read_only)
    assert cli.gradcam_main(["--workdir", "RUN", "--indices", "0", "5", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {out}: Read-only file system\n"


def test_float_images_in_the_unit_range_warn(model, variables, images):
    """Issue 11 item 14: pixels in [0, 1] were accepted silently and gave wrong maps."""
    unit = np.asarray(images, np.float32) / 255.0
    with pytest.warns(UserWarning, match=r"float images with values in \[0, 1\].*expects pixel values in \[0, 255\]"):
        gradcam(model, variables, unit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradcam(model, variables, images)  # uint8
        gradcam(model, variables, unit * 255.0)  # float in [0, 255]
        jax.jit(lambda x: gradcam(model, variables, x))(unit[:2])  # traced: values unknown, no check


def test_cli_argument_parsing():
    parser = cli.gradcam_parser()
    args = parser.parse_args(["--workdir", "RUN"])
    assert (args.split, args.method, args.layer, args.misclassified, args.indices, args.out) == ("test", "gradcam", None, None, None, "cams.png")
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--workdir", "RUN", "--misclassified", "3", "--indices", "1"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--workdir", "RUN", "--method", "gradcam+"])
    for method in cam_lib.ALL_METHODS:  # every method, option and score kind
        args = parser.parse_args(["--workdir", "RUN", "--method", method, "--score", "softmax", "--eigen-smooth", "--aug-smooth"])
        assert (args.method, args.score, args.eigen_smooth, args.aug_smooth, args.seed) == (method, "softmax", True, True, 0)
    assert "--misclassified K" in parser.format_help()


def test_cli_guided_adds_guided_gradcam_of_the_shown_maps(tmp_path, fake_run, monkeypatch, model, variables, images):
    from jaxres import guided

    seen = {}
    real_plot = cam_lib.plot_cams

    def plot_cams(chosen, cams, **kwargs):
        seen.update(chosen=np.asarray(chosen), cams=np.asarray(cams), **kwargs)
        return real_plot(chosen, cams, **kwargs)

    monkeypatch.setattr(cam_lib, "plot_cams", plot_cams)
    out = tmp_path / "guided.png"
    argv = ["--workdir", "RUN", "--indices", "0", "3", "--method", "layercam", "--target", "true", "--guided", "--out", str(out)]
    assert cli.gradcam_main(argv) == 0 and out.is_file()
    truths = np.array([0, 3])
    saliency = np.asarray(guided.guided_backprop(model, variables, seen["chosen"], truths))
    np.testing.assert_array_equal(seen["guided"], guided.deprocess(saliency * seen["cams"][..., None]))
    assert seen["title"].startswith("layercam at layer3, guided (true class)")


def test_cli_guided_refuses_a_model_without_relus_before_any_work(tmp_path, fake_run, monkeypatch, capsys):
    from jaxres import evaluate, models

    airbench = models.create_model("airbench94", width=0.125)
    calls = []
    monkeypatch.setattr(evaluate, "load_run_and_data", lambda *a: (calls.append(a), (airbench, {}, None, None))[1])
    assert cli.gradcam_main(["--workdir", "RUN", "--indices", "0", "--guided", "--out", str(tmp_path / "x.png")]) == 2
    assert "guided backpropagation swaps a model's ReLUs; Airbench94 has no `activation` field" in capsys.readouterr().err
    assert len(calls) == 1 and not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_cli_end_to_end_on_a_trained_run(tmp_path):
    """Train a tiny model for one epoch with `python -m jaxres.train`, then explain it."""
    from jaxres import cli

    workdir = tmp_path / "run"
    argv = ["--data", "shapes", "--width", "0.125", "--epochs", "1", "--train-subset", "256", "--batch-size", "128", "--workdir", str(workdir)]
    assert cli.train_main(argv) == 0
    out = tmp_path / "cams.png"
    assert cli.gradcam_main(["--workdir", str(workdir), "--misclassified", "4", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- issue 25: bounded figures, API edges


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--misclassified", "33"], "error: --misclassified 33: one figure shows at most 32 images (MAX_FIGURE_IMAGES); "
         "ask for 32 or fewer, and page through more with --skip (--misclassified 32 --skip 32 shows the next 32)"),
        (["--indices", *map(str, range(33))], "error: --indices names 33 images: one figure shows at most 32"),
        (["--misclassified", "100000"], "error: --misclassified 100000: one figure shows at most 32 images"),
        (["--layer", "", "--indices", "0"], "error: --layer is empty: name one of the model's stages"),
        (["--skip", "-1"], "error: --skip must be 0 or more"),
        (["--skip", "2", "--indices", "0"], "error: --skip pages through --misclassified"),
    ],
)
def test_cli_bounds_a_figure_and_refuses_empty_flags_before_loading(fake_run, capsys, argv, message):
    assert cli.gradcam_main(["--workdir", "RUN", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert fake_run == {}


def test_cli_skip_pages_through_the_misclassified_images(tmp_path, fake_run, monkeypatch, model, variables, images):
    shown = []
    real_plot = cam_lib.plot_cams

    def plot_cams(chosen, cams, **kwargs):
        shown.append(np.asarray(chosen))
        return real_plot(chosen, cams, **kwargs)

    monkeypatch.setattr(cam_lib, "plot_cams", plot_cams)
    labels = np.arange(6)
    wrong = np.flatnonzero(cam_lib._predict(model, variables, np.asarray(images), 256) != labels)
    order = cam_lib.round_robin_over_classes(wrong, labels[wrong], 6)
    assert len(order) >= 3  # random weights: most of the six are wrong
    for page, skip in enumerate((0, 2)):
        assert cli.gradcam_main(["--workdir", "RUN", "--misclassified", "2", "--skip", str(skip), "--out", str(tmp_path / f"{page}.png")]) == 0
        np.testing.assert_array_equal(shown[page], np.asarray(images)[order[skip : skip + 2]])
    with pytest.raises(JaxresError, match=f"--skip 6 skips every misclassified image: the test split has {len(wrong)}"):
        cli.gradcam_run(cli.gradcam_parser().parse_args(["--workdir", "RUN", "--skip", "6", "--out", str(tmp_path / "x.png")]))


def test_cli_takes_the_methods_options_and_scores_of_cam_methods(tmp_path, fake_run, capsys):
    """Three of jaxres.cam_methods' kinds (many forward passes with aug_smooth and a softmax
    score, a keyed method, eigen_smooth) through the command line, and a refused combination."""
    out = str(tmp_path / "cams.png")
    for argv in (["--method", "scorecam", "--score", "softmax", "--aug-smooth"], ["--method", "randomcam", "--seed", "3"],
                 ["--method", "layercam", "--eigen-smooth"]):  # fmt: skip
        assert cli.gradcam_main(["--workdir", "RUN", "--indices", "0", "1", "--out", out, *argv]) == 0
    capsys.readouterr()
    assert cli.gradcam_main(["--workdir", "RUN", "--indices", "0", "--out", out, "--method", "fem", "--eigen-smooth"]) == 2
    assert capsys.readouterr().err.startswith("error: eigen_smooth does not apply to fem (pytorch-grad-cam ignores it there")


def test_images_above_255_warn_like_the_unit_range(model, variables, images):
    for sixteen_bit in (np.asarray(images, np.uint16) * 257, np.asarray(images, np.int16) * 100, np.asarray(images, np.float32) * 257):
        with pytest.warns(UserWarning, match=r"images with values above 255 \(the largest is .*\): jaxres expects pixel values in \[0, 255\]"):
            gradcam(model, variables, sixteen_bit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradcam(model, variables, np.asarray(images, np.uint16))  # on the 8-bit scale: no warning


def test_api_edges_are_named_errors(model, variables, images):
    with pytest.raises(JaxresError, match=r"targets is empty: give None \(the predicted classes\), an int, or 6 ints"):
        gradcam(model, variables, images, targets=[])
    with pytest.raises(JaxresError, match=r"images must be an array \(NumPy or JAX\).*got a list; stack them first: np.stack"):
        gradcam(model, variables, list(images))
    with pytest.raises(JaxresError, match="variables have no 'batch_stats' collection, which CustomResNet \\(norm 'batch'\\) needs"):
        gradcam(model, {"params": variables["params"]}, images)
    with pytest.raises(JaxresError, match="variables have no 'params' collection"):
        gradcam(model, {"batch_stats": variables["batch_stats"]}, images)


# --------------------------------------------------------------------------- issue 24: the meta-methods on the command line


def test_cli_runs_refinecam_and_sess_as_cam_meta_does(tmp_path, fake_run, monkeypatch, model, variables, images):
    """--refine-layers (RefineCAM of --method over those stages) and --sess (SESS around --method
    at --layer): the figure shows jaxres.cam_meta's maps of the chosen images, and its title says
    which meta-method made them."""
    from jaxres import cam_meta

    shown = []
    real_plot = cam_lib.plot_cams

    def plot_cams(chosen, cams, **kwargs):
        shown.append((np.asarray(cams), kwargs["title"]))
        return real_plot(chosen, cams, **kwargs)

    monkeypatch.setattr(cam_lib, "plot_cams", plot_cams)
    out = str(tmp_path / "cams.png")
    chosen = np.asarray(images)[[0, 1]]
    targets = cam_lib._predict(model, variables, chosen, 256)
    base = ["--workdir", "RUN", "--indices", "0", "1", "--out", out]
    assert cli.gradcam_main([*base, "--refine-layers", "layer2", "layer3", "--method", "gradcam++"]) == 0
    expected = cam_meta.refinecam(model, variables, chosen, targets, layers=("layer2", "layer3"), method="gradcam++")
    np.testing.assert_allclose(shown[-1][0], np.asarray(expected), atol=1e-6)
    assert shown[-1][1].startswith("refinecam of gradcam++ over layer2, layer3 (predicted class)")
    assert cli.gradcam_main([*base, "--sess", "--sess-scales", "2", "--sess-pool", "max", "--layer", "layer2"]) == 0
    expected = cam_meta.sess(model, variables, chosen, targets, layer="layer2", num_scales=2, pool="max")
    np.testing.assert_allclose(shown[-1][0], np.asarray(expected), atol=1e-6)
    assert shown[-1][1].startswith("sess of gradcam at layer2 (predicted class)")
    assert shown[-1][0].shape == (2, 32, 32) and float(shown[-1][0].max()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--refine-layers", "layer2", "--layer", "layer3"], "error: --refine-layers names the layers RefineCAM multiplies: drop --layer"),
        (["--sess-scales", "2"], "error: --sess-scales is an option of --sess: add --sess"),
        (["--sess-pool", "max"], "error: --sess-pool is an option of --sess: add --sess"),
        (["--sess", "--sess-scales", "0"], "error: --sess-scales must be positive, got 0"),
        (["--sess", "--aug-smooth"], "error: --aug-smooth is not an option of --sess (pytorch-grad-cam's RefineCAM and SESS"),
        (["--refine-layers", "layer3", "--aug-smooth"], "error: --aug-smooth is not an option of --refine-layers"),
    ],
)
def test_cli_meta_method_mistakes_are_named_before_loading(fake_run, capsys, argv, message):
    assert cli.gradcam_main(["--workdir", "RUN", "--indices", "0", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert fake_run == {}


def test_cli_meta_method_flags_parse_and_refuse_each_other(fake_run, capsys):
    parser = cli.gradcam_parser()
    args = parser.parse_args(["--workdir", "RUN"])
    assert (args.refine_layers, args.sess, args.sess_scales, args.sess_pool) == (None, False, None, None)
    args = parser.parse_args(["--workdir", "RUN", "--refine-layers", "prep", "layer3"])
    assert args.refine_layers == ["prep", "layer3"]
    with pytest.raises(SystemExit) as exit_info:  # two meta-methods at once: argparse's usage error
        parser.parse_args(["--workdir", "RUN", "--sess", "--refine-layers", "layer3"])
    assert exit_info.value.code == 2
    capsys.readouterr()
    help_text = " ".join(parser.format_help().split())
    assert "--refine-layers L [L ...]" in help_text and "--sess-scales S" in help_text
    assert "(default: 12, the library's)" in help_text
    assert cli.gradcam_main(["--workdir", "RUN", "--indices", "0", "--refine-layers", "layer3", "layer7"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown layer 'layer7' for CustomResNet")
