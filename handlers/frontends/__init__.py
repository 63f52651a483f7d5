"""Front ends: how a request becomes a validated array, and how outputs become an answer."""

from __future__ import annotations

from typing import Any

from handlers.spec import ArtifactManifest


def frontend_for(manifest: ArtifactManifest) -> Any:
    """The front end the archive was built with ("tensor" or "image")."""
    if manifest.frontend == "image":
        from handlers.frontends.image import ImageFrontend

        return ImageFrontend(manifest)
    from handlers.frontends.tensor import TensorFrontend

    return TensorFrontend(manifest)
