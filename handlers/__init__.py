"""tspack handlers: TorchServe handlers that ship inside every archive.

Only torch, numpy, onnxruntime, Pillow and TorchServe's `ts` may be imported here, so an archive
serves on a TorchServe host that does not have this pack installed.
"""
