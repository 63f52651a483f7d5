"""TorchServe handler for image requests: raw JPEG/PNG/WebP bytes, multipart uploads, base64, or JSON.

Preprocessing (resize, crop, colour mode, normalisation) and the runtime are whatever the archive was
built with. TorchServe wants exactly one class here.
"""

from handlers.base import TspackHandler


class ImageHandler(TspackHandler):
    frontend_name = "image"
