"""Guided backpropagation and Guided Grad-CAM, batched and pure.

    saliency = guided_backprop(model, variables, images, targets)           # float32[N, H, W, 3]
    combined = guided_gradcam(model, variables, images, targets, layer="layer3")

Guided backpropagation (Springenberg et al. 2015) is the gradient of the explained score
with respect to the (normalised) input image in which every ReLU lets a gradient through
only where both its input and the incoming gradient are positive: pytorch-grad-cam 1.5.7's
`guided_backprop.py`, `GuidedBackpropReLU.backward`: grad_input = (input > 0) * (grad_output
> 0) * grad_output, in a `GuidedBackpropReLUModel` that swaps every `torch.nn.ReLU` of the
model for it and explains one image at a time. Here the swap is an argument: jaxres's
ReLU models take their ReLU as the `activation` field (`models.CustomResNet`,
`models.ResNet`), and `guided_backprop` runs `model.clone(activation=guided_relu)`, a
`jax.custom_vjp` ReLU; nothing is patched and every image of the batch is explained at
once. Guided Grad-CAM (Selvaraju et al. 2017; the library's `cam.py` example and Captum's
`GuidedGradCam`) multiplies it, channel by channel, with the Grad-CAM map upsampled to the
input (`jaxres.gradcam.gradcam`, min-max normalised as the library's `GradCAM` returns it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxres import cam_methods, gradcam as gradcam_lib
from jaxres.augment import normalize as normalize_images
from jaxres.errors import JaxresError


@jax.custom_vjp
def guided_relu(x: jax.Array) -> jax.Array:
    """max(x, 0), whose gradient passes only where x > 0 and the incoming gradient g > 0."""
    return jnp.maximum(x, jnp.zeros((), x.dtype))


def _guided_relu_forward(x):
    return guided_relu(x), x


def _guided_relu_backward(x, g):
    return (jnp.where((x > 0) & (g > 0), g, jnp.zeros((), g.dtype)),)


guided_relu.defvjp(_guided_relu_forward, _guided_relu_backward)


def guided_model(model):
    """`model` with every ReLU its guided-backpropagation twin (`guided_relu`); the same
    parameters. Raises JaxresError for a model without a selectable ReLU (Airbench94's
    activations are GELUs, which the library's guided model leaves as they are)."""
    if "activation" not in getattr(model, "__dataclass_fields__", {}):
        raise JaxresError(f"guided backpropagation swaps a model's ReLUs; {type(model).__name__} has no `activation` field to swap")
    return model.clone(activation=guided_relu)


@functools.partial(jax.jit, static_argnames=("model", "score"))
def _guided_gradients(model, variables, images, classes, score):
    inputs = normalize_images(images)
    guided = guided_model(model)

    def total_score(inputs):
        logits = guided.apply(variables, inputs, train=False)
        return cam_methods.target_scores(logits, classes, score).sum()  # images are independent: one backward pass

    return jax.grad(total_score)(inputs)


def guided_backprop(model, variables, images, targets=None, *, score="logit") -> jax.Array:
    """The guided-backpropagation gradient of each image's score with respect to its
    normalised input.  images: uint8 (or float in [0, 255])[N, H, W, 3]; targets: None
    (the predicted classes), an int, or int[N]; score: as `jaxres.gradcam.gradcam`'s.
    Returns float32[N, H, W, 3] (the library's `GuidedBackpropReLUModel` output, HWC)."""
    gradcam_lib.check_images(images)
    gradcam_lib.check_variables(model, variables)
    variables = cam_methods.inference_variables(variables)
    images = jnp.asarray(images)
    classes = gradcam_lib.prepare_targets(targets, images.shape[0], model.num_classes)
    if classes is None:
        logits = model.apply(variables, normalize_images(images), train=False)
        classes = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return _guided_gradients(model, variables, images, classes, score)


def guided_gradcam(model, variables, images, targets=None, *, layer: str, score="logit", method: str = "gradcam") -> jax.Array:
    """Guided Grad-CAM: `guided_backprop` times the CAM of `method` at `layer` (min-max
    normalised, upsampled to the input), per channel.  Returns float32[N, H, W, 3]."""
    saliency = guided_backprop(model, variables, images, targets, score=score)
    cams = gradcam_lib.gradcam(model, variables, images, targets, layer=layer, method=method, score=score)
    return saliency * cams[..., None]


def deprocess(saliency) -> np.ndarray:
    """Guided saliency for display: float[N, H, W, 3] -> uint8[N, H, W, 3], each image as
    pytorch-grad-cam 1.5.7's `utils/image.py` `deprocess_image` (after jacobgil's
    keras-grad-cam): centred on its mean, divided by (its std + 1e-5), times 0.1, plus 0.5,
    clipped to [0, 1], times 255 and truncated to uint8. On the host (NumPy, float64)."""
    x = np.asarray(saliency, np.float64)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise JaxresError(f"saliency must be [N, H, W, 3], got shape {x.shape}")
    axes = (1, 2, 3)
    x = x - x.mean(axis=axes, keepdims=True)
    x = x / (x.std(axis=axes, keepdims=True) + 1e-5)
    return np.uint8(np.clip(x * 0.1 + 0.5, 0, 1) * 255)
