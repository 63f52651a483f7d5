"""Packaging: self-contained `.mar` archives, the A/B router and workflow archives, and the build report."""
