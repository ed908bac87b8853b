"""Guided backpropagation and Guided Grad-CAM (`jaxres.guided`) against pytorch-grad-cam 1.5.7's
rule (`GuidedBackpropReLU`, written out here in torch) on the PyTorch twin with the same weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres import guided, models
from jaxres.augment import normalize
from jaxres.errors import JaxresError
from jaxres.gradcam import gradcam
from tests.helpers import random_variables

WIDTH = 0.125
TARGETS = np.array([1, 0, 4, 2])


@pytest.fixture(scope="module")
def model():
    return models.CustomResNet(width=WIDTH, num_classes=5)


@pytest.fixture(scope="module")
def variables(model):
    return random_variables(model, seed=3)


@pytest.fixture(scope="module")
def images():
    from jaxres.data.shapes import make_shapes

    return make_shapes(num_train=1, num_test=4, seed=1).test.images


def test_guided_relu_gradient_passes_only_where_input_and_gradient_are_positive():
    x = jnp.asarray([-2.0, -0.5, 0.0, 0.5, 2.0, 3.0])
    g = jnp.asarray([1.0, -1.0, 1.0, -1.0, 1.0, -2.0])
    value, vjp = jax.vjp(guided.guided_relu, x)
    np.testing.assert_array_equal(value, np.maximum(np.asarray(x), 0))
    np.testing.assert_array_equal(vjp(g)[0], np.where((np.asarray(x) > 0) & (np.asarray(g) > 0), g, 0))


def test_guided_backprop_matches_the_librarys_rule_on_the_pytorch_twin(model, variables, images):
    torch = pytest.importorskip("torch")
    from benchmarks.torch_reference import CustomResNet as TorchResNet
    from jaxres.convert import flax_to_torch

    class GuidedBackpropReLU(torch.autograd.Function):  # pytorch_grad_cam/guided_backprop.py, 1.5.7
        @staticmethod
        def forward(ctx, input_img):
            positive_mask = (input_img > 0).type_as(input_img)
            output = torch.addcmul(torch.zeros(input_img.size()).type_as(input_img), input_img, positive_mask)
            ctx.save_for_backward(input_img, output)
            return output

        @staticmethod
        def backward(ctx, grad_output):
            input_img, _ = ctx.saved_tensors
            positive_mask_1 = (input_img > 0).type_as(grad_output)
            positive_mask_2 = (grad_output > 0).type_as(grad_output)
            return torch.addcmul(torch.zeros(input_img.size()).type_as(input_img),
                                 torch.addcmul(torch.zeros(input_img.size()).type_as(input_img), grad_output, positive_mask_1),
                                 positive_mask_2)  # fmt: skip

    class GuidedBackpropReLUasModule(torch.nn.Module):
        def forward(self, x):
            return GuidedBackpropReLU.apply(x)

    twin = TorchResNet(width=WIDTH, num_classes=5).float().eval()
    twin.load_state_dict(flax_to_torch(variables, model, tensors=True), strict=True)
    swapped = 0
    for parent in list(twin.modules()):  # the library's replace_all_layer_type_recursive(ReLU -> guided)
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.ReLU):
                setattr(parent, name, GuidedBackpropReLUasModule())
                swapped += 1
    assert swapped == 8  # prep, layer1 (3), layer2, layer3 (3)
    inputs = torch.from_numpy(np.asarray(normalize(images)).transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    output = twin(inputs)
    output[torch.arange(len(TARGETS)), torch.from_numpy(TARGETS)].sum().backward()
    expected = inputs.grad.numpy().transpose(0, 2, 3, 1)

    got = np.asarray(guided.guided_backprop(model, variables, images, TARGETS))
    assert got.shape == images.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    plain = jax.grad(lambda x: model.apply(variables, x)[jnp.arange(4), TARGETS].sum())(normalize(images))
    assert not np.allclose(got, plain, atol=1e-3 * np.abs(expected).max())  # the guided rule changed the gradient


def test_batch_equals_per_image_and_predicted_classes_by_default(model, variables, images):
    together = np.asarray(guided.guided_backprop(model, variables, images, TARGETS))
    for index in range(len(images)):
        alone = np.asarray(guided.guided_backprop(model, variables, images[index : index + 1], TARGETS[index : index + 1]))
        np.testing.assert_allclose(alone[0], together[index], rtol=0, atol=1e-6 * np.abs(together).max())
    predicted = np.argmax(np.asarray(model.apply(variables, normalize(images))), axis=-1)
    np.testing.assert_array_equal(guided.guided_backprop(model, variables, images), guided.guided_backprop(model, variables, images, predicted))


def test_guided_gradcam_is_guided_backprop_times_the_upsampled_map(model, variables, images):
    combined = np.asarray(guided.guided_gradcam(model, variables, images, TARGETS, layer="layer2"))
    cams = np.asarray(gradcam(model, variables, images, TARGETS, layer="layer2"))
    saliency = np.asarray(guided.guided_backprop(model, variables, images, TARGETS))
    np.testing.assert_allclose(combined, saliency * cams[..., None], rtol=1e-6, atol=0)
    assert cams.min() >= 0 and cams.max() <= 1


def test_resnet18_relus_are_swapped_too():
    resnet = models.ResNet18(width=0.0625, num_classes=3)
    variables = random_variables(resnet, seed=1)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    got = np.asarray(guided.guided_backprop(resnet, variables, images, [0, 2]))
    plain = jax.grad(lambda x: resnet.apply(variables, x)[jnp.arange(2), jnp.asarray([0, 2])].sum())(normalize(images))
    assert np.isfinite(got).all() and not np.allclose(got, plain)


def test_a_model_without_relus_is_refused():
    with pytest.raises(JaxresError, match="Airbench94 has no `activation` field"):
        guided.guided_model(models.Airbench94(width=0.125))


def test_deprocess_is_the_librarys_deprocess_image_per_image():
    rng = np.random.default_rng(7)
    saliency = rng.normal(size=(3, 5, 6, 3)) * np.array([1e-3, 1.0, 50.0])[:, None, None, None]
    out = guided.deprocess(saliency)
    assert out.dtype == np.uint8 and out.shape == saliency.shape
    for image, shown in zip(saliency, out):  # utils/image.py deprocess_image, one image at a time
        img = image - np.mean(image)
        img = img / (np.std(img) + 1e-5)
        img = np.clip(img * 0.1 + 0.5, 0, 1)
        np.testing.assert_array_equal(shown, np.uint8(img * 255))
    with pytest.raises(JaxresError, match=r"saliency must be \[N, H, W, 3\]"):
        guided.deprocess(saliency[..., 0])


def test_plot_cams_adds_the_guided_column(images):
    from jaxres.gradcam import plot_cams

    cams = np.random.default_rng(0).uniform(size=images.shape[:3])
    shown = guided.deprocess(np.random.default_rng(1).normal(size=images.shape))
    figure = plot_cams(images, cams, guided=shown)
    axes = figure.get_axes()
    assert len(axes) == 4 * len(images) and axes[3].get_title() == "guided"
    np.testing.assert_array_equal(axes[3].get_images()[0].get_array(), shown[0])
    assert len(plot_cams(images, cams).get_axes()) == 3 * len(images)
    with pytest.raises(JaxresError, match="guided maps must have the images' shape"):
        plot_cams(images, cams, guided=shown[:, :-1])
