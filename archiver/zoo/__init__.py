"""Small reference models used by the demo, the tests and the benchmark.

Each model lives in a file of its own that imports only torch, so the file can ship inside an
archive as the model class of a state_dict artifact.
"""
