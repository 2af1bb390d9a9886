"""Observers: the controller's view of the world as typed observations (DESIGN §4, §9).

`mqtt.HeartbeatSubscriber` validates agents' heartbeats and status into a HeartbeatBook; the
Kubernetes list+watch caches live beside it. Observers record what they saw and when (the
controller's monotonic clock); they never decide, and a lost source is reported as such.
"""
