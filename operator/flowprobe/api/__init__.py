"""ProbePolicy API (flowprobe.io/v1alpha1), shared by the operator and the node agents.

- ``v1alpha1``: the ProbePolicy resource (spec, status) as pydantic models.
- ``conditions``: status conditions with ``SetStatusCondition`` semantics.
- ``policyset``: the compiled set the operator writes and the agents read.
- ``agentreport``: what agents report back, via one Lease per node.
- ``constants``: names every component has to agree on.

This package imports nothing from the operator or the agent.
"""
