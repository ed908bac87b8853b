"""benchmarks/figures.py: the picture layouts, on tiny synthetic inputs (no training)."""

import numpy as np

from benchmarks import figures
from jaxres import cam_metrics, data
from jaxres.data import shapes


def test_one_per_class_takes_the_first_image_of_each_class_in_label_order():
    labels = np.array([3, 1, 1, 0, 3, 2])
    np.testing.assert_array_equal(figures.one_per_class(labels, 3), [3, 1, 5])
    np.testing.assert_array_equal(figures.one_per_class(labels, 10), [3, 1, 5, 0])


def test_figures_are_small_pngs(tmp_path):
    dataset = shapes.make_shapes(num_train=8, num_test=40)
    test = dataset.test
    shown = data.Split(test.images[:8], test.labels[:8], test.masks[:8])
    cams = np.random.default_rng(0).random((8, 32, 32)).astype(np.float32)  # float32[8, 32, 32] in [0, 1]
    predictions = (test.labels + (np.arange(40) % 3 == 0)) % len(dataset.class_names)
    scores = np.asarray(cam_metrics.energy_pointing_game(cams, shown.masks, per_image=True))
    made = [
        figures.save(figures.misclassified_figure(dataset, predictions), tmp_path, "misclassified.png"),
        figures.save(
            figures.gradcam_figure(shown.images, cams, shown.labels, predictions[:8], dataset.class_names, "layer3"),
            tmp_path,
            "gradcam.png",
        ),
        figures.save(
            figures.shapes_cams_figure(shown, cams, predictions[:8], scores, dataset.class_names, "layer3", 0.2),
            tmp_path,
            "shapes_cams.png",
        ),
    ]
    for path in made:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size < 150 * 1024


def test_a_folder_without_a_run_is_not_finished(tmp_path):
    assert not figures.is_finished(tmp_path)
    assert figures.read_metrics(tmp_path) == []


