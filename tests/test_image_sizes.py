"""Images whose sizes are not multiples of 8 (issue 25, item 4): the model trains and Grad-CAM
explains 28x28 and 36x36 images, and a size too small for the model is refused naming it and
the smallest accepted. (The 2x2 max-pool on odd sizes against PyTorch's: tests/test_models.py.)"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres import gradcam as cam_lib
from jaxres import models, train
from jaxres.data import Dataset, Split
from jaxres.errors import JaxresError
from tests.helpers import quiet, random_variables, tiny_config


def sized_dataset(size: int, num_train: int = 64, num_test: int = 20) -> Dataset:
    rng = np.random.default_rng(size)

    def split(n):
        return Split(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, 4, n).astype(np.int32))

    return Dataset(split(num_train), split(num_test), ("a", "b", "c", "d"), f"random {size}x{size} images")


@pytest.mark.parametrize("size", [28, 36])
def test_the_custom_resnet_trains_and_explains_sizes_that_are_not_multiples_of_8(tmp_path, size):
    dataset = sized_dataset(size)
    result = train.train_and_evaluate(
        tiny_config(tmp_path / "run", epochs=1), dataset=dataset, progress=False, log=quiet, write_plots=False
    )
    assert len(result.history) == 1 and np.isfinite(result.history[0]["train_loss"])
    variables = {"params": result.state.params, "batch_stats": result.state.batch_stats}
    model = models.create_model(num_classes=4, width=0.0625)
    cams = cam_lib.gradcam(model, variables, dataset.test.images[:3], layer="layer2")
    assert cams.shape == (3, size, size) and np.all(np.isfinite(np.asarray(cams)))


@pytest.mark.parametrize("size", [4, 7, 1])
def test_a_size_too_small_for_the_model_is_refused_naming_the_smallest(tmp_path, size):
    model = models.create_model(width=0.0625)
    message = f"images of {size}x{size} pixels are too small for CustomResNet: .*the smallest it accepts is 8x8"
    with pytest.raises(JaxresError, match=message):
        models.init_variables(model, jax.random.PRNGKey(0), (size, size, 3))
    with pytest.raises(JaxresError, match=message):
        train.train_and_evaluate(tiny_config(tmp_path / "run", batch_size=16), dataset=sized_dataset(size, 32, 8),
                                 progress=False, log=quiet)  # fmt: skip
    variables = random_variables(model, seed=0)
    with pytest.raises(JaxresError, match=message):
        cam_lib.gradcam(model, variables, np.zeros((1, size, size, 3), np.uint8))
    assert models.smallest_image_size(models.create_model("resnet18", width=0.0625)) == 1


def test_an_8x8_image_at_layer3_warns_that_its_one_pixel_map_is_flat():
    model = models.create_model(width=0.0625)
    variables = random_variables(model, seed=0)
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    with pytest.warns(UserWarning, match=r"layer3's map is 1x1 for 8x8 images.*all zeros.*layer2.*2x2"):
        cams = cam_lib.gradcam(model, variables, images)
    assert np.all(np.asarray(cams) == 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cam_lib.gradcam(model, variables, images, layer="layer2")
        cam_lib.gradcam(model, variables, images, normalize=False)  # the raw value is kept: no flat map
