"""TorchServe handler for tensor requests: JSON lists, OIP v2 `inputs`, or raw `.npy` bytes.

The archive's manifest declares the input's shape and dtype; the runtime (TorchScript, eager, ONNX
Runtime, int8) is whatever the archive was built with. TorchServe wants exactly one class here.
"""

from handlers.base import TspackHandler


class TensorHandler(TspackHandler):
    frontend_name = "tensor"
