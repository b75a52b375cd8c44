"""The one exception hierarchy of the host side. Every error dropq raises on purpose is a DropqError."""

from __future__ import annotations


class DropqError(Exception):
    """Root of every error dropq raises on purpose; its message is meant for a person."""


class ConfigError(DropqError):
    """The configuration file is missing, malformed, names an unknown key or has a wrong type."""


class ManifestError(DropqError):
    """A manifest cannot be run. The message is the reason written to the job's result.yaml."""


class UnsafePathError(ManifestError):
    """A path in a manifest leaves its allowed root (absolute, `..`, NUL, or through a symlink)."""


class StoreError(DropqError):
    """The job store refused an operation (a job that does not exist, or a transition not allowed)."""


class PoolError(DropqError):
    """Workers could not be started, found or adopted."""


class TransportError(DropqError):
    """A request to a worker failed: the worker is down, gone, or answered with something unexpected."""


class WorkerBusy(TransportError):
    """The worker already runs another job (HTTP 409)."""


class JobRefused(TransportError):
    """The worker refused the job's description (HTTP 400): a program or path it cannot run."""


class UnknownJob(TransportError):
    """The worker does not know the job asked for (HTTP 404): it restarted, or never received it."""


class DaemonRunning(DropqError):
    """Another daemon already holds this state directory."""


class EngineUnavailable(DropqError):
    """No Docker engine answers where DOCKER_HOST (or the default socket) says one is."""
