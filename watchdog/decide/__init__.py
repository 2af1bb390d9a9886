"""The pure decision core: per-node state machine, reasons and safety arithmetic.

Nothing here performs I/O, reads a clock or imports asyncio or a client library (import-linter
checks it). Callers pass observations and `now` in; decisions come back as data.
"""
