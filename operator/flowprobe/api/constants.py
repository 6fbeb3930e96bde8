"""Names shared by the CRD, the operator, the chart and the agents.

Everything a second component has to agree on lives here, so a rename is one
edit plus the YAML that mirrors it (the CRD and the chart, both checked by tests).
"""

from __future__ import annotations

from typing import Final

GROUP: Final = "flowprobe.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "ProbePolicy"
PLURAL: Final = "probepolicies"
SINGULAR: Final = "probepolicy"
SHORT_NAMES: Final = ("pp", "probepol")
CATEGORIES: Final = ("flowprobe", "probes")
CRD_NAME: Final = f"{PLURAL}.{GROUP}"

# Server-side apply field manager and the `managed-by` label value: one name
# so `kubectl get ... -l app.kubernetes.io/managed-by=flowprobe-operator` and
# `metadata.managedFields` point at the same actor.
MANAGER: Final = "flowprobe-operator"
# Prefix for kopf's own bookkeeping (progress, diff base, finalizer); kopf's
# default would be kopf.zalando.org.
KOPF_PREFIX: Final = GROUP

LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_PART_OF: Final = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_VERSION: Final = "app.kubernetes.io/version"
PART_OF: Final = "flowprobe"
COMPONENT_AGENT: Final = "agent"
COMPONENT_AGENT_REPORT: Final = "agent-report"

# sha256 of the compiled policy set; on the pod template so that a config
# change rolls the agents, and on every agent report so the operator can tell
# which agents run the current set.
ANNOTATION_CONFIG_CHECKSUM: Final = f"{GROUP}/config-checksum"
# JSON AgentReport on the agent's Lease (see flowprobe.api.agentreport).
ANNOTATION_AGENT_REPORT: Final = f"{GROUP}/agent-report"

# Key of the compiled policy set in the agents' ConfigMap and where the agent
# finds it.
POLICY_SET_KEY: Final = "policies.json"
POLICY_DIR: Final = "/etc/flowprobe/policies"
POLICY_FILE: Final = f"{POLICY_DIR}/{POLICY_SET_KEY}"
# Secrets referenced by policies are mounted read-only under SECRETS_DIR/<name>/.
SECRETS_DIR: Final = "/etc/flowprobe/secrets"
# Forensics (spec.forensics): the ring and frozen pcaps (an emptyDir), and the
# pcap endpoint's bearer token (the Secret named by the Helm value
# agent.forensicsTokenSecret, key "token").
FORENSICS_DIR: Final = "/var/lib/flowprobe/forensics"
FORENSICS_TOKEN_DIR: Final = "/etc/flowprobe/forensics-token"
FORENSICS_TOKEN_KEY: Final = "token"

# Environment the agent container receives (the agent's side of the contract).
ENV_NODE_NAME: Final = "NODE_NAME"
ENV_POD_NAME: Final = "POD_NAME"
ENV_POD_NAMESPACE: Final = "POD_NAMESPACE"
ENV_POLICY_FILE: Final = "FLOWPROBE_POLICY_FILE"
ENV_HEALTH_PORT: Final = "FLOWPROBE_HEALTH_PORT"
ENV_REPORT_INTERVAL: Final = "FLOWPROBE_REPORT_INTERVAL_SECONDS"
AGENT_HEALTH_LIVENESS_PATH: Final = "/healthz"
AGENT_HEALTH_READINESS_PATH: Final = "/readyz"

# Condition types on ProbePolicy status.
CONDITION_READY: Final = "Ready"
CONDITION_DEGRADED: Final = "Degraded"
CONDITION_EXPIRED: Final = "Expired"

# How the agent image is started in the DaemonSet: the image's entrypoint is
# `flowprobe-agent`, and `daemon` is its Kubernetes mode (policy file, health
# endpoint, per-node report), configured only through the ENV_* variables above.
AGENT_ARGS: Final = ("daemon",)
