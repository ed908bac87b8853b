"""The dataset constants: CIFAR-10's class names and per-channel statistics, the split names,
and what `jaxres.data.load_dataset` accepts.

Plain Python values with no imports, so that on-device code (`jaxres.augment`) and the PyTorch
side of the benchmarks can read them without loading the readers (PIL, tarfile) or the
sources; every other part of `jaxres.data` imports them from here.
"""

# CIFAR-10's class names in label order (that of the official archive and of tensorflow-datasets).
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # per channel, on the [0, 1] scale
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

SPLIT_NAMES = ("train", "test")  # the splits of every Dataset, in the order Dataset holds them
# What `jaxres.data.load_dataset` accepts, for the messages of every source that rejects a path.
ACCEPTED_SOURCES = (
    "'cifar10' (tensorflow-datasets, else the official archive downloaded once), 'shapes' (synthetic), or a path to: the official "
    "cifar-10-python.tar.gz or its extracted cifar-10-batches-py/ folder; an image folder "
    "ROOT/train/<class>/*.png|jpg + ROOT/test/<class>/*; a .tar/.tar.gz/.tgz holding such folders"
)
