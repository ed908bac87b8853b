"""jaxres: a pure-functional JAX trainer for the CIFAR-10 custom ResNet, with Grad-CAM."""

from jaxres import runtime

__version__ = "0.1.0"

# XLA:CPU's YNNPACK fusions off and JAX's persistent compilation cache on, unless the user
# set either already or JAXRES_XLA_DEFAULTS=0 (see jaxres/runtime.py for why and how).
runtime.apply_defaults()
