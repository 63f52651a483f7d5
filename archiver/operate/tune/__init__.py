"""`tspack tune`: the serving configuration of one model, picked by measurement against a real TorchServe.

`space` declares what can change (runtime, batching, workers and threads) and writes the tuned spec, `measure`
serves one configuration and loads it with wrk, `search` walks the space by coordinate descent within a time
budget, and `report` writes the table, the throughput-vs-p99 plot with its Pareto front, and the winner.
"""
