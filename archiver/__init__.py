"""tspack archiver: export, validate, optimize and package PyTorch models for TorchServe, and operate it.

A library first; `tspack` (archiver.cli) is a thin command line over it.
"""

__version__ = "0.1.0"
