"""Deployment: TorchServe's config.properties for a host, GPU placement, Kubernetes manifests, alerting rules."""
