"""jaxres: a pure-functional JAX trainer for the CIFAR-10 custom ResNet, with Grad-CAM."""

import os

__version__ = "0.1.0"

# XLA:CPU's experimental YNNPACK fusions make this model's training step about 3x slower on
# CPU (width 0.25, batch 128: 100 -> 330 img/s; width 1, batch 128: 11 -> 38 img/s, 2-core
# AMD EPYC, jaxlib 0.10.2; `benchmarks/README.md`), so jaxres switches them off unless the
# user's XLA_FLAGS already say something about them, or JAXRES_XLA_DEFAULTS=0. XLA reads
# XLA_FLAGS once, when the first backend starts: import jaxres before running any JAX
# computation for this to apply. Only XLA:CPU reads the flag.
CPU_XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def _default_xla_flags() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("JAXRES_XLA_DEFAULTS", "1") == "0" or "xla_cpu_experimental_ynn_fusion_type" in flags:
        return
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_XLA_FLAG}".strip()


_default_xla_flags()
