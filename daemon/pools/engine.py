"""A client of the Docker engine, made only once the engine answers.

docker-py leaves its Unix socket unclosed when the engine does not answer (docker/docker-py#3356,
open at docker 7.1): the socket is collected later as a ResourceWarning, in whatever code runs then.
So where the engine is a Unix socket, connect to it once ourselves (closing it either way) before the
SDK is asked anything.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from dropq.errors import EngineUnavailable

DEFAULT_SOCKET = "/var/run/docker.sock"


def engine_socket() -> str | None:
    """The Unix socket the Docker SDK would use, or None when DOCKER_HOST names another kind of address."""
    host = os.environ.get("DOCKER_HOST", "")
    if not host:
        return DEFAULT_SOCKET
    for scheme in ("unix://", "http+unix://"):
        if host.startswith(scheme):
            return "/" + host[len(scheme):].lstrip("/")
    return None


def probe(path: str, timeout: float) -> None:
    """Raise EngineUnavailable unless something accepts connections on the Unix socket `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            raise EngineUnavailable(f"no Docker engine answers on {path} ({exc.strerror or exc})") from None


def engine_client(*, timeout: float | None = 60) -> Any:
    """A docker.DockerClient whose engine has answered a ping; the caller closes it."""
    import docker

    path = engine_socket()
    if path is not None:
        probe(path, timeout=5.0 if timeout is None else min(timeout, 5.0))
    try:
        client = docker.from_env(timeout=timeout)
    except docker.errors.DockerException as exc:
        raise EngineUnavailable(f"no Docker engine answers: {exc}") from None
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001 - the SDK raises several kinds when no engine answers
        client.close()
        raise EngineUnavailable(f"no Docker engine answers: {exc}") from None
    return client


def update_resources(client: Any, container_id: str, *, memory: int, nano_cpus: int) -> None:
    """Change a running container's memory limit (swap none: memory+swap the same) and CPUs, in place (POST
    /containers/{id}/update). docker-py's `Container.update` takes no NanoCpus (docker 7.1), and the engine
    refuses a CPU quota for a container made with NanoCpus, as ours are: so the engine's own call, through
    the SDK's client. Raises docker.errors.APIError (e.g. a memory limit below what the container uses)."""
    api = client.api
    answer = api._post_json(api._url("/containers/{0}/update", container_id),
                            data={"Memory": memory, "MemorySwap": memory, "NanoCpus": nano_cpus})
    api._result(answer, True)
