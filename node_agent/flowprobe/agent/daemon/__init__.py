"""``flowprobe-agent daemon``: the agent on a Kubernetes node (docs/agent-in-cluster.md)."""
