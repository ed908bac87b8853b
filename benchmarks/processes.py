"""The worker processes of a benchmark run and the protocol the orchestrator speaks with them.

`Worker` is one `python -m benchmarks.worker` process (its `@@bench` messages read on a
thread, its stderr in a log file); `ContentionProbe` measures the CPU time other processes
use while a worker is measured; `Runner` starts workers with a plan's shared settings
(threads, environment, compilation cache, flags), keeps the time budget, and runs the
alternating measure protocol (see `benchmarks.worker` for the messages).
"""

from __future__ import annotations

import datetime
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks import common
from benchmarks.plans import Plan


class WorkerError(RuntimeError):
    """A worker reported an error, exited or did not answer in time (the row records it)."""


class Worker:
    """One `benchmarks.worker` process and its protocol messages."""

    def __init__(self, label: str, argv: list[str], env: dict, log_path: Path):
        self.label = label
        self.argv = argv
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", *argv],
            cwd=common.REPO_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
        )
        self.messages: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            message = common.parse_message(line)
            if message is not None:
                self.messages.put(message)
            else:
                self.log.write(line)
        self.messages.put(None)

    def read(self, timeout: float) -> dict:
        try:
            message = self.messages.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise WorkerError(f"{self.label}: no answer within {timeout:.0f} s (log: {self.log_path})") from None
        if message is None:
            self.process.wait()
            raise WorkerError(f"{self.label}: exited with status {self.process.returncode} (log: {self.log_path})")
        if message.get("event") == "error":
            raise WorkerError(f"{self.label}: {message.get('error')} (log: {self.log_path})")
        return message

    def send(self, command: str) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def close(self, timeout: float = 60) -> None:
        try:
            if self.process.stdin and not self.process.stdin.closed:
                self.process.stdin.close()
            self.process.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, OSError):
            self.kill()
        self.log.close()


class ContentionProbe:
    """CPU time that other processes used while one worker was measured.

    `finish()` returns {other_cpu_cores, worker_cpu_cores}: the CPU seconds of the whole
    machine minus those of the worker (and its children, e.g. DataLoader workers), and the
    worker's own, each divided by the wall time. On an idle machine other_cpu_cores is
    about 0; above ~0.25 on a small machine the pair is contaminated by other work.
    Empty without psutil.
    """

    def __init__(self, pid: int):
        try:
            import psutil
        except ImportError:
            self.psutil = None
            return
        self.psutil = psutil
        self.process = psutil.Process(pid)
        self.started = time.perf_counter()
        self.system = self._system()
        self.worker = self._worker()

    def _system(self) -> float:
        times = self.psutil.cpu_times()._asdict()
        idle = ("idle", "iowait", "guest", "guest_nice")  # guest time is already inside user time
        return sum(value for name, value in times.items() if name not in idle)

    def _worker(self) -> float:
        total = 0.0
        try:
            for process in [self.process, *self.process.children(recursive=True)]:
                times = process.cpu_times()
                total += times.user + times.system
        except self.psutil.Error:
            pass
        return total

    def finish(self) -> dict:
        if self.psutil is None:
            return {}
        wall = max(time.perf_counter() - self.started, 1e-9)
        worker = self._worker() - self.worker
        other = max(0.0, self._system() - self.system - worker)
        return {"other_cpu_cores": other / wall, "worker_cpu_cores": worker / wall}


class Runner:
    """Starts workers with the plan's shared settings and runs the measurement protocol."""

    def __init__(self, plan: Plan, data: str, cache_dir: str | None, scratch: Path, timeout: float, log=print):
        self.plan = plan
        self.data = data
        self.cache_dir = cache_dir
        self.scratch = scratch
        self.timeout = timeout
        self.log = log
        self.started = time.perf_counter()
        self.count = 0
        self.row_seconds: dict[str, float] = {"train-compile": 150.0}  # task -> duration of its last row (estimates first)
        self.caches_made = 0
        self.fresh_compilation_cache()

    def fresh_compilation_cache(self) -> None:
        """jaxres workers started from now on share a new, empty compilation cache."""
        self.caches_made += 1
        stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S%f")
        self.compilation_cache = self.scratch / "compilation-cache" / f"{stamp}-{self.caches_made}"

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def over_budget(self, task: str | None = None) -> bool:
        """True when the budget is spent, or would be by a row of `task` as long as the last one."""
        budget = self.plan.budget_seconds
        if budget is None:
            return False
        expected = self.row_seconds.get(task, 0.0) if task else 0.0
        return self.elapsed() + expected > budget

    def env(self, framework: str) -> dict:
        env = common.thread_environment(self.plan.threads)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.REPO_ROOT), env.get("PYTHONPATH")]))
        if framework == "jax":
            # a persistent compilation cache of this run only: each program's first worker
            # compiles (a first run), later workers of the same setting load it (a second run)
            env["JAXRES_COMPILATION_CACHE"] = str(self.compilation_cache)
            if self.plan.jax_xla_flags:
                env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {self.plan.jax_xla_flags}".strip()
            if self.plan.device == "cpu":
                env["JAX_PLATFORMS"] = "cpu"
            else:  # leave room on the GPU for the PyTorch worker alive at the same time
                env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
        else:
            env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(self.scratch / "inductor-cache"))
        return env

    def argv(self, framework: str, task: str, options: dict) -> list[str]:
        values = {
            "framework": framework,
            "task": task,
            "device": self.plan.device,
            "threads": self.plan.threads,
            "data": self.data,
            "warmup": self.plan.warmup,
            **options,
        }
        if self.cache_dir:
            values["cache_dir"] = self.cache_dir
        if framework == "jax":
            values["conv_backend"] = self.plan.jax_conv_backend
        argv = []
        for key, value in values.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif value is False or value is None:
                continue
            else:
                argv += [flag, str(value)]
        return argv

    def start(self, label: str, framework: str, task: str, options: dict) -> Worker:
        self.count += 1
        log_path = self.scratch / "logs" / f"{self.count:03d}-{task}-{label}.log"
        return Worker(label, self.argv(framework, task, options), self.env(framework), log_path)

    def one_shot(self, label: str, framework: str, task: str, options: dict, timeout: float | None = None) -> dict:
        worker = self.start(label, framework, task, options)
        try:
            return worker.read(timeout or self.timeout)
        finally:
            worker.close()

    def alternate(self, specs: list[tuple[str, str, dict]], task: str, repeats: int) -> dict:
        """Start each (label, framework, options) worker in turn, then A B A B ... measurements.

        Returns {label: {ready, measurements, memory}} for the workers that completed.
        """
        workers, out = [], {}
        try:
            for label, framework, options in specs:
                worker = self.start(label, framework, task, options)
                workers.append(worker)
                out[label] = {"ready": worker.read(self.timeout), "measurements": []}
            for _ in range(repeats):
                for worker in workers:
                    probe = ContentionProbe(worker.process.pid)
                    worker.send("measure")
                    measurement = worker.read(self.timeout)
                    measurement.update(probe.finish())
                    out[worker.label]["measurements"].append(measurement)
            for worker in workers:
                worker.send("finish")
                out[worker.label]["memory"] = worker.read(self.timeout)
        except BaseException:
            for worker in workers:
                worker.kill()
            raise
        finally:
            for worker in workers:
                worker.close()
        return out
