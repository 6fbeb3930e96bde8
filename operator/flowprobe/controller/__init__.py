"""The flowprobe operator: ``kopf run -m flowprobe.controller``.

Importing this package registers every handler with kopf.
"""

from flowprobe.controller import handlers, probes, startup

__all__ = ["handlers", "probes", "startup"]
