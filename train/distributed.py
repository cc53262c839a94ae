"""Multi-process (multi-host) launch: ``jax.distributed`` set-up from flags or environment, and process slices.

These are *launch* settings, not run settings: they never enter a run's Config (nor its checkpoint
fingerprint), so a run may be resumed under another launch (e.g. 1 process of 4 devices -> 2 processes of 2).

- ``--num-processes N --process-id I --coordinator HOST:PORT`` (or JAX's environment variables
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, ``JAX_COORDINATOR_ADDRESS``; a flag wins over its variable).
- ``--num-processes auto``: a bare ``jax.distributed.initialize()`` (cluster auto-detection: TPU pods, SLURM,
  Open MPI, ...); ``--process-id``/``--coordinator`` are passed on when given.
- none of these: one process (nothing initialised). A process where the user already called
  ``jax.distributed.initialize()`` needs nothing: the training loop reads ``jax.process_count()``.

Timeouts (bounded, so that a lost process never hangs the others): ``--init-timeout`` seconds for all
processes to reach the coordinator, ``--heartbeat-timeout`` seconds without a heartbeat after which JAX's
coordination service declares a process dead and every other process aborts (non-zero exit, with a fatal log
naming the task ``/job:jax_worker/replica:0/task:I``, that is process I).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

ENV_VARS = {"num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID",
            "coordinator": "JAX_COORDINATOR_ADDRESS", "init_timeout": "SRIGL_INIT_TIMEOUT",
            "heartbeat_timeout": "SRIGL_HEARTBEAT_TIMEOUT"}
DEFAULT_INIT_TIMEOUT = 120      # seconds for all processes to connect to the coordinator
DEFAULT_HEARTBEAT_TIMEOUT = 20  # seconds without heartbeats before a process is declared lost


class LaunchError(ValueError):
    """A launch flag / environment variable has a bad value; one line naming it, the value and what is allowed."""

    def __init__(self, name: str, value: Any, allowed: str, reason: str = ""):
        super().__init__(f"{name} {value} is invalid{f' ({reason})' if reason else ''}; allowed: {allowed}")


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins a multi-process run (``num_processes`` None: single process)."""

    num_processes: int | str | None = None   # int >= 1, "auto", or None
    process_id: int | None = None
    coordinator: str | None = None
    init_timeout: int = DEFAULT_INIT_TIMEOUT
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT

    @property
    def distributed(self) -> bool:
        return self.num_processes == "auto" or (isinstance(self.num_processes, int) and self.num_processes > 1)


def parse_launch(flags: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Launch:
    """A validated :class:`Launch` from CLI values (None: not given) and the environment; LaunchError."""
    env = os.environ if env is None else env
    raw, from_env = {}, {}
    for field, var in ENV_VARS.items():
        value = flags.get(field)
        from_env[field] = value is None and bool(env.get(var, "").strip())
        raw[field] = env[var].strip() if from_env[field] else value

    def error(field, allowed, reason=""):
        label = f"${ENV_VARS[field]}" if from_env[field] else "--" + field.replace("_", "-")
        return _launch_error(label, "=" if from_env[field] else " ", raw[field], allowed, reason)

    n = raw["num_processes"]
    if n is not None and str(n).strip().lower() == "auto":
        n = "auto"
    elif n is not None:
        try:
            n = int(str(n).strip())
            if n < 1:
                raise ValueError
        except ValueError:
            raise error("num_processes", "an integer >= 1, or auto") from None
    pid = raw["process_id"]
    if pid is not None:
        try:
            pid = int(str(pid).strip())
            if pid < 0:
                raise ValueError
        except ValueError:
            raise error("process_id", "an integer >= 0") from None
    coord = raw["coordinator"]
    if coord is not None:
        coord = str(coord).strip()
        m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+):(\d+)", coord)
        if not m or not 1 <= int(m.group(2)) <= 65535:
            raise error("coordinator", "HOST:PORT with a port in [1, 65535], e.g. 127.0.0.1:12355")
    timeouts = {}
    for field, default in (("init_timeout", DEFAULT_INIT_TIMEOUT), ("heartbeat_timeout", DEFAULT_HEARTBEAT_TIMEOUT)):
        value = raw[field]
        if value is None:
            timeouts[field] = default
            continue
        try:
            timeouts[field] = int(str(value).strip())
            if timeouts[field] < 1:
                raise ValueError
        except ValueError:
            raise error(field, "an integer >= 1 (seconds)") from None
    if n is None or n == 1:
        given = [f for f in ("process_id", "coordinator") if raw[f] is not None and not from_env[f]]
        if n is None and given:
            raise error(given[0], "only together with --num-processes (or $JAX_NUM_PROCESSES)",
                        "no number of processes given")
        if n == 1 and pid not in (None, 0):
            raise error("process_id", "0 with --num-processes 1")
        return Launch(n if n == 1 else None, None, None, **timeouts)
    if n != "auto":
        if pid is None:
            raise error("num_processes", f"with --process-id in [0, {n - 1}] and --coordinator HOST:PORT "
                                         f"(or their environment variables), or auto", "--process-id is missing")
        if pid >= n:
            raise error("process_id", f"an integer in [0, {n - 1}] (--num-processes {n})")
        if coord is None:
            raise error("num_processes", "with --coordinator HOST:PORT (or $JAX_COORDINATOR_ADDRESS), or auto",
                        "--coordinator is missing")
    return Launch(n, pid, coord, **timeouts)


def _launch_error(label: str, sep: str, value: Any, allowed: str, reason: str) -> LaunchError:
    err = LaunchError(label, value, allowed, reason)
    if sep == "=":  # '$JAX_PROCESS_ID=x is invalid ...'
        err.args = (str(err).replace(f"{label} {value} ", f"{label}={value} ", 1),)
    return err


def initialize(launch: Launch) -> None:
    """``jax.distributed.initialize`` for ``launch`` (nothing for a single process, or when already done).

    On CPU, cross-process collectives need an implementation: gloo is selected (it only affects the CPU
    backend, so it is harmless on GPU/TPU). Call before any other use of jax."""
    if not launch.distributed:
        return
    import jax
    from jax._src import distributed as _dist
    if _dist.global_state.client is not None:  # the user initialised it already
        return
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(initialization_timeout=launch.init_timeout, heartbeat_timeout_seconds=launch.heartbeat_timeout)
    if launch.num_processes == "auto":
        jax.distributed.initialize(coordinator_address=launch.coordinator, process_id=launch.process_id, **kwargs)
        return
    host = launch.coordinator.rsplit(":", 1)[0]
    bind = launch.coordinator if host in ("127.0.0.1", "localhost", "[::1]") else None
    jax.distributed.initialize(coordinator_address=launch.coordinator, num_processes=launch.num_processes,
                               process_id=launch.process_id, coordinator_bind_address=bind, **kwargs)


def process_count() -> int:
    import jax
    return jax.process_count()


def is_primary() -> bool:
    """Process 0: the one that writes the run's files (metrics, config, summary, plots) and prints."""
    import jax
    return jax.process_index() == 0


def process_rows(n: int, index: int | None = None, count: int | None = None) -> slice:
    """This process's rows of a global batch of ``n`` examples (contiguous, equal parts, process order, the
    order of ``jax.devices()`` on the global mesh): rows ``[index * n / count, (index + 1) * n / count)``."""
    if index is None or count is None:
        import jax
        index, count = jax.process_index(), jax.process_count()
    if n % count:
        raise ValueError(f"a global batch of {n} examples does not split over {count} processes")
    part = n // count
    return slice(index * part, (index + 1) * part)


def check_masks_agree(fingerprint: int, step: int) -> list[int]:
    """All processes' mask fingerprints at ``step`` (collective); RuntimeError naming the processes whose masks
    differ from process 0's."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    every = [int(v) for v in np.asarray(multihost_utils.process_allgather(np.uint32(fingerprint))).reshape(-1)]
    bad = [i for i, v in enumerate(every) if v != every[0]]
    if bad:
        raise RuntimeError(f"step {step}: the masks of process(es) {bad} differ from process 0's (fingerprints "
                           f"{every}); data parallelism is broken (process {jax.process_index()} stops)")
    return every


def barrier(name: str) -> None:
    """Wait for every process (no-op with one)."""
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


class Watchdog:
    """Names a lost process in one line before JAX's own abort (whose fatal log is long and names it only as a
    task number). A daemon thread publishes a counter for this process in the coordination service's key-value
    store every ``interval`` s and reads every process's; one whose counter has not moved for ``after`` s (less
    than the heartbeat timeout) is reported and this process exits 1 at once. :meth:`done` marks this process
    as finished (its silence is then expected). The coordinator (process 0) lost: the key-value store is gone,
    reported the same way."""

    def __init__(self, client: Any, index: int, count: int, after: float, interval: float = 1.0):
        import threading
        self.client, self.index, self.count, self.after, self.interval = client, index, count, after, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="srigl-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def done(self) -> None:
        self._stop.set()
        try:
            self.client.key_value_set(f"srigl_watchdog/{self.index}", "done", allow_overwrite=True)
        except Exception:
            pass

    def _lost(self, who: str, seconds: float) -> None:
        import sys
        print(f"python -m train: error: {who} stopped responding (no sign of life for {seconds:.0f} s); process "
              f"{self.index} exits too. Re-launch all processes to resume from the last checkpoint.",
              file=sys.stderr, flush=True)
        os._exit(1)

    def _run(self) -> None:
        import time
        beat, seen, since = 0, {}, time.monotonic()
        while not self._stop.wait(self.interval):
            beat += 1
            now = time.monotonic()
            try:
                self.client.key_value_set(f"srigl_watchdog/{self.index}", str(beat), allow_overwrite=True)
                values = dict(self.client.key_value_dir_get("srigl_watchdog/"))
                since = now
            except Exception:
                if self._stop.is_set():
                    return
                if now - since > self.after:
                    self._lost("process 0 (the coordinator)", now - since)
                continue
            for j in range(self.count):
                value = values.get(f"srigl_watchdog/{j}")
                if j == self.index or value == "done":
                    continue
                if value is None or seen.get(j, (None,))[0] != value:
                    seen[j] = (value, now)
                elif now - seen[j][1] > self.after:
                    self._lost(f"process {j}", now - seen[j][1])


_watchdog: Watchdog | None = None


def start_watchdog(launch: Launch) -> None:
    """Start the :class:`Watchdog` of a multi-process launch (after :func:`initialize`); nothing otherwise."""
    global _watchdog
    import jax
    from jax._src import distributed as _dist
    client = _dist.global_state.client
    if client is None or jax.process_count() == 1 or _watchdog is not None:
        return
    after = max(2.0, 0.4 * launch.heartbeat_timeout)
    _watchdog = Watchdog(client, jax.process_index(), jax.process_count(), after).start()


def stop_watchdog() -> None:
    """This process finished normally: the others will not report its silence."""
    if _watchdog is not None:
        _watchdog.done()
