"""Typed errors of the build and operate side. The CLI prints their message on one line and exits 2."""

from __future__ import annotations

from handlers.errors import SpecError

__all__ = ["TspackCliError", "SpecError", "BuildError", "ValidationFailed", "ServerError", "ApiError",
           "DeploymentError", "TuneError"]


class TspackCliError(Exception):
    """Root of errors the CLI reports as one line, without a traceback."""


class BuildError(TspackCliError):
    """An export, optimization or packaging step failed."""


class ValidationFailed(BuildError):
    """An exported artifact does not compute what the eager model computes, within tolerance."""


class ServerError(TspackCliError):
    """TorchServe did not start, stop, or answer as expected."""


class DeploymentError(ServerError):
    """The deployment record (run folder's deployment.json) cannot be read, written or restored."""


class ApiError(TspackCliError):
    """The management or inference API answered with an error."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class TuneError(TspackCliError):
    """`tspack tune` cannot measure: the load generator is missing or produced no numbers."""
