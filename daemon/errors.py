"""The one exception hierarchy of the host side. Every error dropq raises on purpose is a DropqError."""

from __future__ import annotations


class DropqError(Exception):
    """Root of every error dropq raises on purpose; its message is meant for a person."""


class ConfigError(DropqError):
    """The configuration file is missing, malformed, names an unknown key or has a wrong type."""


class LayoutError(ConfigError):
    """The workspace cannot work as laid out: its folders are not on one mount, or not in one folder."""


class ManifestError(DropqError):
    """A manifest cannot be run. The message is the reason written to the job's result.yaml."""


class UnsafePathError(ManifestError):
    """A path in a manifest leaves its allowed root (absolute, `..`, NUL, or through a symlink)."""


class StoreError(DropqError):
    """The job store refused an operation (a job that does not exist, or a transition not allowed)."""


class SchemaError(DropqError):
    """The job database cannot be used by this dropq: a newer one wrote it, or upgrading it failed."""


class PoolError(DropqError):
    """Workers could not be started, found or adopted."""


class ProtocolMismatch(PoolError):
    """A worker speaks another version of the worker protocol than this daemon: its health answer says
    so, or it refused a request for that reason. The message says what to do (rebuild the image...)."""


class TransportError(DropqError):
    """A request to a worker failed: the worker is down, gone, or answered with something unexpected."""


class WorkerBusy(TransportError):
    """The worker already runs another job (HTTP 409)."""


class JobRefused(TransportError):
    """The worker refused the job's description (HTTP 400): a program or path it cannot run."""


class UnknownJob(TransportError):
    """The worker does not know the job asked for (HTTP 404): it restarted, or never received it."""


class NotYours(DropqError):
    """On a shared host, a job belongs to another user: its results cannot be read, nor the job cancelled,
    by whoever asked (the message names the owner's uid and the asker's)."""


class DaemonRunning(DropqError):
    """Another daemon already holds this state directory."""


class NoDaemon(DropqError):
    """No daemon runs on the configuration's state folder, so a job waited for could never end."""


class EngineUnavailable(DropqError):
    """No Docker engine answers where DOCKER_HOST (or the default socket) says one is."""


class EnvSpecError(ManifestError):
    """A program's declared dependencies cannot be read (a bad PEP 723 block, requirements.txt line,
    pyproject.toml): the job is rejected with the reason, as for any other fault of what was dropped."""


class EnvError(DropqError):
    """Programs' environments (dropq.envs)."""


class EnvBuildError(EnvError):
    """An environment could not be built: the installer's reason, in one sentence."""


class AgentError(DropqError):
    """An agent and its daemon could not agree (a refused token, an unknown lease, a daemon that is gone)."""


class BadArchive(DropqError):
    """A tar from an agent or the daemon that is not what it must be (checksum, size, a forbidden entry)."""
