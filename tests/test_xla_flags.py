"""JAXRES_FAST_CPU=1 switches XLA:CPU's YNNPACK fusions off (see jaxres/__init__.py), without
overriding a user's own setting; without it XLA_FLAGS is left as it was."""

import os
import subprocess
import sys

import jaxres

SHOW_FLAGS = "import jaxres, os; print(os.environ.get('XLA_FLAGS', ''))"


def flags_after_import(**env_changes) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXRES_FAST_CPU")}
    env.update(env_changes)
    done = subprocess.run([sys.executable, "-c", SHOW_FLAGS], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_by_default_importing_jaxres_leaves_xla_flags_alone():
    assert flags_after_import() == ""
    assert flags_after_import(XLA_FLAGS="--xla_force_host_platform_device_count=2") == (
        "--xla_force_host_platform_device_count=2"
    )


def test_fast_cpu_adds_the_flag_and_keeps_the_users_flags():
    assert flags_after_import(JAXRES_FAST_CPU="1") == jaxres.CPU_XLA_FLAG
    assert flags_after_import(JAXRES_FAST_CPU="1", XLA_FLAGS="--xla_force_host_platform_device_count=2").split() == [
        "--xla_force_host_platform_device_count=2",
        jaxres.CPU_XLA_FLAG,
    ]


def test_a_users_own_ynn_setting_is_left_alone():
    own = "--xla_cpu_experimental_ynn_fusion_type=invalid_but_untouched"
    assert flags_after_import(JAXRES_FAST_CPU="1", XLA_FLAGS=own) == own
