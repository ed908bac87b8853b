"""The XLA/JAX defaults jaxres sets at import (jaxres/runtime.py): YNNPACK fusions and the new
fusion emitters off on CPU, the persistent compilation cache on; and glibc's malloc keeping freed
memory in the train command; a user's own setting wins; JAXRES_XLA_DEFAULTS=0 turns them all off."""

import json
import os
import subprocess
import sys

import pytest

from jaxres import runtime

SHOW = (
    "import jaxres, os, json, jax; "
    "print(json.dumps({'flags': os.environ.get('XLA_FLAGS', ''), 'cache': jax.config.jax_compilation_cache_dir}))"
)
OWN_VARIABLES = (
    "XLA_FLAGS", "JAXRES_XLA_DEFAULTS", "JAXRES_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR", runtime.OWN_CACHE_VARIABLE,
    runtime.MALLOC_VARIABLE, "GLIBC_TUNABLES", *runtime.GLIBC_MALLOC_VARIABLES,
)
YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
EMITTERS_OFF = "--xla_cpu_use_fusion_emitters=false"


def after_import(tmp_path, code=SHOW, **env_changes) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OWN_VARIABLES}
    env.update({"JAXRES_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu", **env_changes})
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_by_default_the_ynn_fusions_and_new_emitters_are_off_and_the_users_flags_kept(tmp_path):
    assert after_import(tmp_path)["flags"].split() == [YNN_OFF, EMITTERS_OFF]
    flags = after_import(tmp_path, XLA_FLAGS="--xla_force_host_platform_device_count=2")["flags"]
    assert flags.split() == ["--xla_force_host_platform_device_count=2", YNN_OFF, EMITTERS_OFF]


def test_a_users_own_setting_of_either_option_is_left_alone(tmp_path):
    own = "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise"
    assert after_import(tmp_path, XLA_FLAGS=own)["flags"].split() == [own, EMITTERS_OFF]
    assert runtime.with_cpu_flags("--xla_cpu_experimental_ynn_fusion_type").split() == [
        "--xla_cpu_experimental_ynn_fusion_type", EMITTERS_OFF]
    own = "--xla_cpu_use_fusion_emitters=true"
    assert after_import(tmp_path, XLA_FLAGS=own)["flags"].split() == [own, YNN_OFF]


def test_the_compilation_cache_lives_in_the_jaxres_cache_unless_told_otherwise(tmp_path):
    cache = after_import(tmp_path)["cache"]
    assert cache.startswith(str(tmp_path / "cache" / "compiled" / "jaxlib-"))
    assert after_import(tmp_path, JAXRES_COMPILATION_CACHE="0")["cache"] in (None, "")
    assert after_import(tmp_path, JAXRES_COMPILATION_CACHE=str(tmp_path / "mine"))["cache"] == str(tmp_path / "mine")
    assert after_import(tmp_path, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "theirs"))["cache"] == str(tmp_path / "theirs")


def test_jaxres_xla_defaults_0_turns_every_default_off(tmp_path):
    report = after_import(tmp_path, JAXRES_XLA_DEFAULTS="0", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert report == {"flags": "--xla_force_host_platform_device_count=2", "cache": None}


def test_imported_after_jax_it_still_sets_the_cache(tmp_path):
    code = "import jax, jaxres, json; print(json.dumps({'cache': jax.config.jax_compilation_cache_dir}))"
    assert after_import(tmp_path, code)["cache"].startswith(str(tmp_path / "cache" / "compiled"))


def test_a_second_process_loads_the_compiled_program_from_the_cache(tmp_path):
    """The first process compiles and writes the cache; the second finds it (JAX counts the hits)."""
    code = (
        "import jaxres, jax, jax.numpy as jnp, json\n"
        "from jax import monitoring\n"
        "hits = []\n"
        "monitoring.register_event_listener(lambda event, **kw: hits.append(event) if 'cache_hits' in event else None)\n"
        "f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T)\n"
        "f(jnp.ones((64, 64))).block_until_ready()\n"
        "print(json.dumps({'hits': len(hits)}))\n"
    )
    first = after_import(tmp_path, code, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    second = after_import(tmp_path, code, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    assert first["hits"] == 0 and second["hits"] >= 1
    assert any((tmp_path / "cache" / "compiled").rglob("*")), "the first process wrote nothing"


def test_a_child_of_a_jaxres_process_decides_its_cache_by_its_own_settings(tmp_path):
    """The parent's default cache folder, inherited through the environment, is not taken for
    the user's own setting (the benchmarks give each worker its own cache this way)."""
    environ = {"JAXRES_CACHE": str(tmp_path / "cache")}
    runtime.apply_defaults(environ)  # as a parent process that imported jaxres
    parent = environ["JAX_COMPILATION_CACHE_DIR"]
    inherited = {k: v for k, v in environ.items() if k in ("JAX_COMPILATION_CACHE_DIR", runtime.OWN_CACHE_VARIABLE)}
    assert after_import(tmp_path, **inherited)["cache"] == parent
    assert after_import(tmp_path, JAXRES_COMPILATION_CACHE=str(tmp_path / "child"), **inherited)["cache"] == str(tmp_path / "child")
    assert after_import(tmp_path, JAXRES_COMPILATION_CACHE="0", **inherited)["cache"] is None
    code = "import jax, jaxres, json; print(json.dumps({'cache': jax.config.jax_compilation_cache_dir}))"  # jax first
    assert after_import(tmp_path, code, JAXRES_COMPILATION_CACHE="0", **inherited)["cache"] is None
    # a user's own JAX_COMPILATION_CACHE_DIR (not the one jaxres recorded) still wins
    assert after_import(tmp_path, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "mine"))["cache"] == str(tmp_path / "mine")


# A 64 MiB block allocated, freed, and allocated again after importing jaxres: the page faults
# of the second allocation (numpy's MADV_HUGEPAGE off, so that the count is in 4 KiB pages
# wherever the kernel's transparent huge pages are "madvise"; with "always" it is in 2 MiB ones).
PAGE_FAULTS = (
    "import json, os, resource, numpy as np, jaxres\n"
    "from jaxres import runtime\n"
    "if os.environ.get('AS_THE_TRAIN_COMMAND'):\n"
    "    runtime.malloc_setting = runtime.keep_freed_memory()\n"
    "getattr(np._core.multiarray, '_set_madvise_hugepage', lambda on: None)(False)\n"
    "def faults():\n"
    "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "    block = np.ones(16 << 20, np.float32)\n"
    "    del block\n"
    "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
    "faults()\n"
    "print(json.dumps({'setting': runtime.malloc_setting, 'faults': faults()}))\n"
)


@pytest.mark.skipif(runtime.malloc_left_alone_because({}) == "not glibc's malloc", reason="malloc is not glibc's here")
def test_freed_memory_is_reused_without_page_faults_unless_the_user_says_system(tmp_path):
    kept = after_import(tmp_path, PAGE_FAULTS, AS_THE_TRAIN_COMMAND="1")
    system = after_import(tmp_path, PAGE_FAULTS, AS_THE_TRAIN_COMMAND="1", JAXRES_MALLOC="system")
    imported = after_import(tmp_path, PAGE_FAULTS)  # importing jaxres alone leaves malloc as it is
    assert kept["setting"] == "kept" and system["setting"] == "JAXRES_MALLOC=system"
    assert imported["setting"].startswith("glibc's defaults")
    for other in (system, imported):
        assert other["faults"] >= 32  # the block comes back from the kernel: at least one fault per 2 MiB
        assert kept["faults"] < other["faults"] / 4  # the heap's pages, reused


def test_the_train_command_keeps_freed_memory_before_anything_else(monkeypatch):
    from jaxres import cli

    monkeypatch.setattr(runtime, "malloc_setting", runtime.malloc_setting)
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: "kept (fake)")
    with pytest.raises(SystemExit):
        cli.train_main(["--help"])
    assert runtime.malloc_setting == "kept (fake)"


def test_the_glibc_tunables_say_what_mallopt_sets():
    """The reference of the airbench comparison gets jaxres's malloc settings as tunables."""
    names = {-8: "glibc.malloc.arena_max", -4: "glibc.malloc.mmap_max", -1: "glibc.malloc.trim_threshold"}
    tunables = dict(item.split("=") for item in runtime.GLIBC_TUNABLES_KEEPING_FREED_MEMORY.split(":"))
    assert tunables == {names[p]: str(v % 2**64 if v < 0 else v) for p, v in runtime.KEEP_FREED_MEMORY}


def test_a_users_own_malloc_settings_are_left_alone():
    calls = []
    fake = lambda parameter, value: calls.append((parameter, value)) or 1  # noqa: E731
    for environ, reason in (
        ({"JAXRES_MALLOC": "system"}, "JAXRES_MALLOC=system"),
        ({"JAXRES_XLA_DEFAULTS": "0"}, "JAXRES_XLA_DEFAULTS is off"),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, "the user's own malloc settings (GLIBC_TUNABLES)"),
        ({"MALLOC_ARENA_MAX": "2", "MALLOC_TOP_PAD_": "0"}, "the user's own malloc settings (MALLOC_ARENA_MAX, MALLOC_TOP_PAD_)"),
    ):
        assert runtime.keep_freed_memory(environ, mallopt=fake) == reason
    assert calls == []
    if runtime.malloc_left_alone_because({}) is None:  # glibc: a tunable of another kind is no reason
        assert runtime.keep_freed_memory({"GLIBC_TUNABLES": "glibc.cpu.x86_ibt=off"}, mallopt=fake) == "kept"
        assert calls == [(-8, 1), (-4, 0), (-1, -1)]  # M_ARENA_MAX 1, M_MMAP_MAX 0, M_TRIM_THRESHOLD -1
        assert runtime.keep_freed_memory({}, mallopt=lambda parameter, value: int(parameter != -4)) == (
            "mallopt refused parameters [-4]"
        )
