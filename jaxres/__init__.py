"""jaxres: a pure-functional JAX trainer for the CIFAR-10 custom ResNet, with Grad-CAM."""

__version__ = "0.1.0"
