"""`make bench`: tspack against the model alone, a naive TorchServe, FastAPI and LitServe, on this machine."""
