"""jaxres: a pure-functional JAX trainer for the CIFAR-10 custom ResNet, with Grad-CAM."""

from jaxres import runtime

__version__ = "0.1.0"

# XLA:CPU's YNNPACK fusions and new fusion emitters off and JAX's persistent compilation
# cache on, unless the user set them already or JAXRES_XLA_DEFAULTS=0 (see jaxres/runtime.py).
runtime.apply_defaults()
