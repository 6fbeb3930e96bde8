"""Compilation -> the agent ServiceAccount, ConfigMap and DaemonSet, as plain dicts.

Pure and deterministic (golden-tested in tests/operator/test_render.py): the
same compilation always renders the same objects, which is what makes
server-side apply of the result idempotent.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from flowprobe.api import constants
from flowprobe.api.v1alpha1 import ResourceRequirements
from flowprobe.controller.compiler import Compilation, OwnerRef
from flowprobe.controller.config import OperatorConfig

# Root in the default mode: with only NET_RAW and NET_ADMIN it cannot do much
# else, and it needs no file capabilities (which no_new_privs would block).
ROOT_UID = 0
NON_ROOT_UID = 65532
_CAPABILITIES = ["NET_ADMIN", "NET_RAW"]


@dataclass(frozen=True)
class AgentObjects:
    service_account: dict[str, Any]
    config_map: dict[str, Any]
    daemon_set: dict[str, Any]

    def in_apply_order(self) -> list[dict[str, Any]]:
        # The pods need the ServiceAccount and ConfigMap to exist first.
        return [self.service_account, self.config_map, self.daemon_set]


def selector_labels(config: OperatorConfig) -> dict[str, str]:
    """Immutable DaemonSet selector: never add to it (the API refuses selector changes)."""
    return {
        constants.LABEL_NAME: constants.PART_OF,
        constants.LABEL_INSTANCE: config.agent.name,
        constants.LABEL_COMPONENT: constants.COMPONENT_AGENT,
    }


def agent_labels(config: OperatorConfig) -> dict[str, str]:
    return {
        **selector_labels(config),
        constants.LABEL_PART_OF: constants.PART_OF,
        constants.LABEL_MANAGED_BY: constants.MANAGER,
    }


def _metadata(
    config: OperatorConfig, owners: list[OwnerRef], annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": config.agent.name,
        "namespace": config.namespace,
        "labels": agent_labels(config),
    }
    if annotations:
        meta["annotations"] = annotations
    # Several owners and none of them the controller: the garbage collector
    # deletes the objects only once every owning policy is gone.
    meta["ownerReferences"] = [
        {
            "apiVersion": constants.API_VERSION,
            "kind": constants.KIND,
            "name": o.name,
            "uid": o.uid,
            "controller": False,
            "blockOwnerDeletion": False,
        }
        for o in owners
    ]
    return meta


def secret_volume_name(secret: str) -> str:
    # Volume names are DNS labels (63 chars); secret names may be 253.
    return "secret-" + hashlib.sha256(secret.encode()).hexdigest()[:12]


def render(comp: Compilation, config: OperatorConfig) -> AgentObjects:
    checksum = comp.policy_set.checksum()
    annotations = {constants.ANNOTATION_CONFIG_CHECKSUM: checksum}
    service_account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(config, comp.owners),
    }
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(config, comp.owners, annotations),
        "data": {constants.POLICY_SET_KEY: comp.policy_set.to_json()},
    }
    daemon_set = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _metadata(config, comp.owners, annotations),
        "spec": {
            "selector": {"matchLabels": selector_labels(config)},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "revisionHistoryLimit": 5,
            "template": {
                "metadata": {
                    "labels": agent_labels(config),
                    "annotations": {
                        **annotations,
                        "kubectl.kubernetes.io/default-container": "agent",
                    },
                },
                "spec": _pod_spec(comp, config),
            },
        },
    }
    return AgentObjects(service_account, config_map, daemon_set)


def _pod_spec(comp: Compilation, config: OperatorConfig) -> dict[str, Any]:
    agent = config.agent
    settings = comp.agent
    volumes: list[dict[str, Any]] = [
        {"name": "policies", "configMap": {"name": agent.name}},
        # readOnlyRootFilesystem: tshark's temporary files go here.
        {"name": "tmp", "emptyDir": {"sizeLimit": "512Mi"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "policies", "mountPath": constants.POLICY_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    for secret in comp.secrets:
        vol = secret_volume_name(secret)
        volumes.append({"name": vol, "secret": {"secretName": secret, "defaultMode": 0o440}})
        mounts.append(
            {"name": vol, "mountPath": f"{constants.SECRETS_DIR}/{secret}", "readOnly": True}
        )
    forensics_volumes, forensics_mounts = _forensics_volumes(comp, config)
    volumes += forensics_volumes
    mounts += forensics_mounts

    pod_security: dict[str, Any] = {"seccompProfile": {"type": "RuntimeDefault"}}
    container_security: dict[str, Any] = {
        "capabilities": {"drop": ["ALL"], "add": _CAPABILITIES},
        "readOnlyRootFilesystem": True,
        "privileged": False,
    }
    if agent.run_as_non_root:
        pod_security |= {
            "runAsNonRoot": True,
            "runAsUser": NON_ROOT_UID,
            "runAsGroup": NON_ROOT_UID,
            "fsGroup": NON_ROOT_UID,
        }
        # dumpcap gets NET_RAW/NET_ADMIN from file capabilities, which the
        # kernel ignores under no_new_privs.
        container_security["allowPrivilegeEscalation"] = True
    else:
        pod_security |= {"runAsNonRoot": False, "runAsUser": ROOT_UID}
        container_security["allowPrivilegeEscalation"] = False

    port = agent.health_port
    container: dict[str, Any] = {
        "name": "agent",
        "image": settings.image,
        "imagePullPolicy": agent.image_pull_policy,
        "args": list(constants.AGENT_ARGS),
        "env": [
            _field_env(constants.ENV_NODE_NAME, "spec.nodeName"),
            _field_env(constants.ENV_POD_NAME, "metadata.name"),
            _field_env(constants.ENV_POD_NAMESPACE, "metadata.namespace"),
            {"name": constants.ENV_POLICY_FILE, "value": constants.POLICY_FILE},
            {"name": constants.ENV_HEALTH_PORT, "value": str(port)},
            {"name": constants.ENV_REPORT_INTERVAL, "value": str(agent.report_interval_seconds)},
        ],
        "ports": [{"name": "health", "containerPort": port, "protocol": "TCP"}],
        "livenessProbe": {
            "httpGet": {"path": constants.AGENT_HEALTH_LIVENESS_PATH, "port": "health"},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": constants.AGENT_HEALTH_READINESS_PATH, "port": "health"},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        "resources": _resources(settings.resources),
        "securityContext": container_security,
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }

    spec: dict[str, Any] = {
        "serviceAccountName": agent.name,
        "automountServiceAccountToken": True,
        # Capture sees the node's interfaces (every pod's veth) only from the
        # host network namespace; ClusterFirstWithHostNet keeps cluster DNS.
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        # Service environment variables are useless to the agent and, on the
        # host network, can be thousands of entries.
        "enableServiceLinks": False,
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [
            t.model_dump(mode="json", by_alias=True, exclude_none=True)
            for t in settings.tolerations
        ],
        "securityContext": pod_security,
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
        "volumes": volumes,
    }
    if settings.node_selector_terms is not None:
        spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    # Terms are ORed: a node qualifies if any policy wants it.
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": k, "operator": "In", "values": [v]}
                                for k, v in sorted(term.items())
                            ]
                        }
                        for term in settings.node_selector_terms
                    ]
                }
            }
        }
    if settings.priority_class_name:
        spec["priorityClassName"] = settings.priority_class_name
    if agent.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": n} for n in agent.image_pull_secrets]
    return spec


# Beyond the ring and the frozen pcaps: the cut being written.
_FORENSICS_SLACK_MIB = 64


def _forensics_volumes(
    comp: Compilation, config: OperatorConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ring's emptyDir and the pcap endpoint's token, only while a policy enables forensics."""
    specs = [p.forensics for p in comp.policy_set.policies if p.forensics is not None]
    if not specs:
        return [], []
    # Sized for the largest policy's bounds (the agent applies one policy's),
    # so the kubelet never evicts the agent for what forensics keeps.
    mib = _FORENSICS_SLACK_MIB + max(
        s.ring.files * s.ring.file_size_megabytes + s.max_frozen_megabytes for s in specs
    )
    volumes: list[dict[str, Any]] = [
        {"name": "forensics", "emptyDir": {"sizeLimit": f"{mib}Mi"}},
        {
            "name": "forensics-token",
            "secret": {
                "secretName": config.agent.forensics_token_secret,
                "defaultMode": 0o440,
                # Without the Secret the agent still runs; its endpoint refuses everyone.
                "optional": True,
                "items": [
                    {"key": constants.FORENSICS_TOKEN_KEY, "path": constants.FORENSICS_TOKEN_KEY}
                ],
            },
        },
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "forensics", "mountPath": constants.FORENSICS_DIR},
        {"name": "forensics-token", "mountPath": constants.FORENSICS_TOKEN_DIR, "readOnly": True},
    ]
    return volumes, mounts


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


def _resources(req: ResourceRequirements) -> dict[str, Any]:
    return req.model_dump(mode="json", by_alias=True, exclude_none=True)
