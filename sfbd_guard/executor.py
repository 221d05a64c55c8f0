"""Where `guard prepare` and `guard audit` run their work: this machine's process pool (`local`) or Ray (`ray`).

Ray is an optional extra (`pip install 'sfbd_guard[ray]'`) and is imported only here, lazily, when the
`ray` executor is chosen; every other module talks to Ray through the untyped handle `ray_session` yields
(Ray's own annotations do not cover remote functions and actors, so they are typed `Any` in one place).

Addresses: none (the default) starts a Ray on this machine with as many CPUs as this process may use
(the affinity mask, capped by a cgroup quota: threads.py) or `cpus`; `auto` joins the cluster this node
belongs to (`ray start`); `ray://host:port` connects a client to a remote cluster; `host:port` is a GCS
address as `ray start --address` takes it. A Ray that is already initialised in this process (a test
fixture, a notebook) is used as it is and left running.
"""

from __future__ import annotations

import logging
import math
import re
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from .errors import InputError
from .threads import affinity_cpus, cgroup_quota

RAY_VERSION = "2.60.0"
INSTALL_LINE = f"pip install 'sfbd_guard[ray]' (or: pip install 'ray=={RAY_VERSION}')"
EXECUTORS = ("local", "ray")
_ADDRESS = re.compile(r"^(auto|local|ray://[\w.\-\[\]:]+|[\w.\-]+:\d{1,5})$")


@dataclass(frozen=True)
class ExecutorSpec:
    """`kind` local | ray; `address` of the Ray cluster (None: start one here); `cpus` of a Ray started here."""

    kind: Literal["local", "ray"] = "local"
    address: str | None = None
    cpus: int | None = None

    @property
    def is_ray(self) -> bool:
        return self.kind == "ray"


LOCAL = ExecutorSpec()


def executor_spec(kind: str | None, address: str | None = None, cpus: int | None = None) -> ExecutorSpec:
    """The checked executor choice of a command line or pipeline (InputError naming the bad value)."""
    kind = kind or "local"
    if kind not in EXECUTORS:
        raise InputError(f"--executor: {kind!r} is not one of {', '.join(EXECUTORS)}")
    if address is not None and not _ADDRESS.match(address):
        raise InputError(f"--ray-address: {address!r} is not an address Ray takes",
                         hint="auto, ray://HOST:PORT (a Ray client) or HOST:PORT (the head's GCS address); "
                              "leave it out to start a Ray on this machine")
    if address is not None and kind != "ray":
        raise InputError("--ray-address needs --executor ray")
    if kind == "ray":
        import_ray()  # missing: stop before any work, with the install line
    return ExecutorSpec("ray" if kind == "ray" else "local", None if address == "local" else address, cpus)


def import_ray() -> Any:
    """The `ray` module, or an InputError (exit 2) whose one line says how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError(f"--executor ray needs Ray, which is not installed: {INSTALL_LINE}") from None
    return ray


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity mask capped by a cgroup CPU quota (as threads.py counts)."""

    quota = cgroup_quota()
    cpus = float(affinity_cpus()) if quota is None else min(float(affinity_cpus()), quota)
    return max(1, math.floor(cpus))


@contextmanager
def ray_session(spec: ExecutorSpec) -> Iterator[Any]:
    """An initialised Ray for the duration of the block (see the module docstring); yields the `ray` module."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    if spec.address is None:
        # A Ray of our own: no dashboard, and no object spilling (the object store holds decoded protected
        # originals on their way to the embedding actors; spilled objects would be written to /tmp).
        ray.init(num_cpus=spec.cpus or usable_cpus(), include_dashboard=False, logging_level=logging.WARNING,
                 _system_config={"automatic_object_spilling_enabled": False})
    else:
        try:
            ray.init(address=spec.address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise InputError(f"--ray-address {spec.address}: cannot connect to Ray: {str(err).splitlines()[0]}",
                             hint="start the cluster first (ray start --head; docs/scale-out.md)") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def cluster_cpus(ray: Any) -> int:
    """The CPUs of the Ray cluster (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def ray_get(ray: Any, ref: Any) -> Any:
    """`ray.get(ref)`, re-raising a task's own exception as itself (a GuardError stays one line)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise


def ordered_remote_map(ray: Any, submit: Any, jobs: Iterable[Any], window: int) -> Iterator[Any]:
    """`ray_get(submit(job))` for each job, in job order, with at most `window` jobs submitted and not yet
    collected (the Ray twin of prepare.ordered_map)."""
    pending: deque[Any] = deque()
    for job in jobs:
        pending.append(submit(job))
        if len(pending) >= window:
            yield ray_get(ray, pending.popleft())
    while pending:
        yield ray_get(ray, pending.popleft())
