"""Connect to the Ray cluster for a job, or start a local one; list its nodes.

Where the cluster comes from:
- an address (`--address auto|HOST:PORT|ray://...`, or `RAY_ADDRESS`, which `ray job
  submit` sets): an existing cluster, possibly many nodes;
- otherwise a local cluster started for this job and sized from the config
  (`parallel.world_size * launch.cpus_per_worker` CPUs), stopped when it ends;
- a Ray already initialised in this process (tests, notebooks) is used as is.

Ray itself retries a silent address for many minutes, printing a warning every
few seconds. So an address is first resolved (`auto`: the cluster `ray start`
recorded on this machine) and probed over TCP: a refused port fails at once, a
silent host within a few seconds, a port that does not speak gRPC (the dashboard's
8265, say) at once, each naming the address and the fix. Only then does `ray.init`
connect, limited to `launch.start_timeout_s` and with its retry warnings kept off
the terminal.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import tempfile
import time
from typing import Iterator

from distattn.train import quiet

quiet.ray_env()  # before `import ray`

import ray  # noqa: E402

from distattn.train.launch_errors import LaunchError  # noqa: E402
from distattn.train.ray_plan import NodeInfo  # noqa: E402

_FIX = ("start one with `ray start --head` (see launch/README.md), or drop --address and unset "
        "RAY_ADDRESS to run on a local cluster started for this job")
# HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS) answers SETTINGS
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_RETRY_NOISE = re.compile(r"Failed to connect to (GCS|the observability pubsub)|Failed to get cluster ID")
_ATTEMPT_S = 41  # one attempt of ray.init against a silent GCS (5 + 5 + 30 + 1 s by Ray's defaults)


def _origin(address: str, given: str | None) -> str:
    return f"--address {address}" if given else f"RAY_ADDRESS={address}"


def resolve(address: str, origin: str) -> tuple[str, int]:
    """(host, port) that `ray.init(address)` would contact; LaunchError when there is none."""
    if address.startswith("ray://"):
        rest = address[len("ray://"):].rstrip("/")
        host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "10001")
    else:
        from ray._private import services
        try:
            canon = services.canonicalize_bootstrap_address(address)
        except ConnectionError:
            raise LaunchError(f"{origin}: no running Ray cluster was found on this machine; "
                              f"{_FIX}") from None
        except ValueError as e:
            raise LaunchError(f"{origin}: not a Ray address ({e}); expected auto, HOST:PORT or "
                              f"ray://HOST:PORT") from None
        if canon is None:  # "local"
            return "", 0
        host, _, port = canon.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise LaunchError(f"{origin}: {port!r} is not a port number; expected auto, HOST:PORT or "
                          f"ray://HOST:PORT") from None


def probe(host: str, port: int, origin: str, timeout_s: float, grpc: bool = True) -> None:
    """Raise LaunchError unless something that speaks gRPC listens at host:port."""
    at = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            if not grpc:
                return
            s.settimeout(timeout_s)
            s.sendall(_H2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = s.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
    except socket.gaierror:
        raise LaunchError(f"{origin}: cannot resolve the host {host!r}; {_FIX}") from None
    except ConnectionRefusedError:
        raise LaunchError(f"{origin}: nothing listens at {at} (connection refused), so no Ray cluster "
                          f"runs there; {_FIX}") from None
    except (socket.timeout, TimeoutError):
        raise LaunchError(f"{origin}: no answer from {at} within {timeout_s:g}s (host down or port "
                          f"filtered); {_FIX}") from None
    except OSError as e:
        raise LaunchError(f"{origin}: cannot reach {at}: {e.strerror or e}; {_FIX}") from None
    if len(head) < 9 or head[3] != 0x04:
        raise LaunchError(f"{origin}: {at} answers, but not as a Ray cluster's GCS (the address is "
                          f"the head's `ray start --port`, 6379 by default, not the dashboard's 8265); "
                          f"{_FIX}")


@contextlib.contextmanager
def _stderr_kept_back() -> Iterator[None]:
    """Hold back what is written to fd 2 (Ray's C++ retry warnings); replay the rest after."""
    import sys
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not _RETRY_NOISE.search(ln)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def connect(address: str, given: str | None, timeout_s: float) -> str:
    """Connect this process to the cluster at `address`; returns what to call it."""
    origin = _origin(address, given)
    host, port = resolve(address, origin)
    if not host:  # "local": Ray starts one
        ray.init(address="local", log_to_driver=True, logging_level="WARNING")
        return "local Ray cluster"
    probe(host, port, origin, timeout_s=min(5.0, timeout_s), grpc=not address.startswith("ray://"))
    target = address if address.startswith("ray://") else f"{host}:{port}"
    # ray.init retries a GCS that does not answer: one attempt per ~41 s of the time-out
    retries = str(max(1, int(timeout_s // _ATTEMPT_S)))
    old = os.environ.get("RAY_gcs_server_port_wait_time_s")
    os.environ["RAY_gcs_server_port_wait_time_s"] = retries
    t0 = time.monotonic()
    try:
        with _stderr_kept_back():
            ray.init(address=target, log_to_driver=True, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise LaunchError(f"{origin}: cannot connect to the Ray cluster at {host}:{port} "
                          f"(after {time.monotonic() - t0:.0f}s: {first}); {_FIX}") from None
    finally:
        if old is None:
            os.environ.pop("RAY_gcs_server_port_wait_time_s", None)
        else:
            os.environ["RAY_gcs_server_port_wait_time_s"] = old
    return f"Ray cluster at {address}"


@contextlib.contextmanager
def ray_session(cfg, address: str | None = None) -> Iterator[str]:
    """Connect to the cluster for this job; yields a description of it."""
    quiet.install()
    if ray.is_initialized():
        yield "the Ray cluster this process is connected to"
        return
    given = address
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        where = connect(address, given, float(cfg.launch.start_timeout_s))
    else:
        cpus = max(1, math.ceil(cfg.parallel.world_size * cfg.launch.cpus_per_worker))
        # address="local": a cluster of this job's own, even when another job's (or `ray start`'s)
        # runs on this machine, which ray.init would otherwise try to join
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=True,
                 logging_level="WARNING", object_store_memory=256 * 2**20)
        where = f"local Ray cluster ({cpus} CPUs)"
    try:
        yield where
    finally:
        time.sleep(0.5)  # let the last streamed lines of the ranks reach the terminal
        ray.shutdown()


def cluster_nodes() -> list[NodeInfo]:
    here = ray.get_runtime_context().get_node_id()
    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = {k: float(v) for k, v in n.get("Resources", {}).items()}
        out.append(NodeInfo(node_id=n["NodeID"], address=n["NodeManagerAddress"], resources=res,
                            is_driver=n["NodeID"] == here))
    out.sort(key=lambda n: (not n.is_driver, n.address, n.node_id))
    return out
