"""`make reliability` (GitHub issue 8): reliability, security and monitoring of a real TorchServe under load,
faults and bad input. Run it with `python -m benchmarks.reliability [--quick]`.

rig.py builds the archives and starts the servers; inputs.py holds the bad-input matrix; load.py the bounded
clients and measurements; one module per scenario (metrics, status, bad_input, security, swap, crash, overload,
soak, known_issues, restart); runner.py runs them in order and report.py writes RELIABILITY.md and
benchmarks/results/reliability.json. tests/integration/test_reliability.py runs the same scenario functions,
shortened.
"""
