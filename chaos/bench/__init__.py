"""Scale and throughput benchmarks of node-watchdog (DESIGN §10, docs/PERFORMANCE.md).

`watchdog-chaos bench BENCHMARK` / `python -m chaos.bench BENCHMARK`, BENCHMARK one of:

- `ingest`: heartbeats of N agents at 1 Hz through a real Mosquitto into one real controller
  process on the test cluster's control plane (CPU per 1,000 heartbeats, RSS, detection).
- `cache`: VMIs and launcher pods in the control plane; the controller's sync time, RSS,
  per-event cost and its relist after a 410.
- `decide`: the pure state machine's throughput and the controller's per-tick cost.
- `failover`: power-off trials, watchdog vs the Harvester baselines, p50/p95 and ratios.
- `testcluster`: the test cluster itself at scale (issue 3): create time, Lease load, RSS.

Must not: be imported by `watchdog` (the service never imports chaos).
"""
