"""Operating a running TorchServe: start/stop, the token-aware client, version swaps, status, the deployment
record and its restore, drift, the OIP gateway (health, metadata, versioned infer) and gRPC client, and `tune`."""
