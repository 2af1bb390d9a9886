"""The chaos harness: scenarios that kill nodes, the runs that measure every failover, reports.

- `scenario`: the scenario file schema (pydantic) and its loading, with errors naming the path
  of the offending field.
- `settings`: the watchdog's real-world settings compressed by a scenario's time scale.
- `recorder`: what the API said and when (watches), per node and per launcher pod.
- `measure`: per VM, node death → detected → reset → running again; invariants from the ledger.
- `runner`: one fresh test cluster per system and repetition, faults on schedule, progress,
  crash detection, teardown.
- `report`: report.md, results.json, timeline.png and the side-by-side table.
- `real`: the same scenarios against a real cluster (explicit targets, `--yes`, SSH/command
  kill methods), measured from API watches and the controllers' /metrics.
- `cli`: the `run` and `demo` subcommands of `watchdog-chaos`.

Must not: simulate anything (chaos/sim does) or be imported by the service (`watchdog`).
"""
