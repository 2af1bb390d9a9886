"""node-watchdog: keeps KubeVirt/Harvester VMs alive when a Kubernetes node dies.

The import package is ``watchdog`` (distribution ``kubevirt-node-watchdog``); it is unrelated
to PyPI's ``watchdog`` file-system library and cannot be installed beside it.
"""

__version__ = "0.1.0"
