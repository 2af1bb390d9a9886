"""A deterministic simulation of the fencing protocol in virtual time (docs/RELIABILITY.md)."""
