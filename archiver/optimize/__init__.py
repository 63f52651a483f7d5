"""Optimize and export stages built on torch.export: one ExportedProgram per model, then AOTInductor, the dynamo ONNX
exporter and pt2e int8 from it. Each stage is a small module; import the one you use (importing this package imports
none of them, so reading the format table stays cheap)."""
