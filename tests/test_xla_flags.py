"""jaxres switches XLA:CPU's YNNPACK fusions off by default (see jaxres/__init__.py), without
overriding a user's own setting."""

import os
import subprocess
import sys

import jaxres

SHOW_FLAGS = "import jaxres, os; print(os.environ.get('XLA_FLAGS', ''))"


def flags_after_import(**env_changes) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXRES_XLA_DEFAULTS")}
    env.update(env_changes)
    done = subprocess.run([sys.executable, "-c", SHOW_FLAGS], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_importing_jaxres_adds_the_cpu_flag_and_keeps_the_users_flags():
    assert flags_after_import() == jaxres.CPU_XLA_FLAG
    assert flags_after_import(XLA_FLAGS="--xla_force_host_platform_device_count=2").split() == [
        "--xla_force_host_platform_device_count=2",
        jaxres.CPU_XLA_FLAG,
    ]


def test_a_users_own_ynn_setting_or_the_opt_out_is_left_alone():
    own = "--xla_cpu_experimental_ynn_fusion_type=invalid_but_untouched"
    assert flags_after_import(XLA_FLAGS=own) == own
    assert flags_after_import(JAXRES_XLA_DEFAULTS="0") == ""


def test_this_test_process_runs_with_the_flag():
    # conftest imports jaxres before any JAX computation, so the whole suite runs with it
    assert jaxres.CPU_XLA_FLAG in os.environ["XLA_FLAGS"].split()
