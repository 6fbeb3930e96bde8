{{/* Chart name, honouring nameOverride. */}}
{{- define "flowprobe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Object name prefix: "<release>-<chart>" (or just the release if it already
contains the chart name), honouring fullnameOverride. Truncated so that the
longest suffix ("-operator", "-agent") still fits Kubernetes name limits.
*/}}
{{- define "flowprobe.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 43 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 43 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 43 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "flowprobe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object the chart creates. */}}
{{- define "flowprobe.labels" -}}
helm.sh/chart: {{ include "flowprobe.chart" . }}
{{ include "flowprobe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: flowprobe
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "flowprobe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flowprobe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "flowprobe.operatorName" -}}
{{- printf "%s-operator" (include "flowprobe.fullname" .) }}
{{- end }}

{{/* The agent DaemonSet, ConfigMap and ServiceAccount the operator creates. */}}
{{- define "flowprobe.agentName" -}}
{{- printf "%s-agent" (include "flowprobe.fullname" .) }}
{{- end }}

{{- define "flowprobe.operatorServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "flowprobe.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "flowprobe.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) }}
{{- end }}

{{- define "flowprobe.agentImage" -}}
{{- printf "%s:%s" .Values.agent.image.repository (default .Chart.AppVersion .Values.agent.image.tag) }}
{{- end }}

{{/* Operator configuration (flowprobe.controller.config.OperatorConfig) as JSON. */}}
{{- define "flowprobe.operatorConfig" -}}
{{- $agent := dict
    "name" (include "flowprobe.agentName" .)
    "image" (include "flowprobe.agentImage" .)
    "imagePullPolicy" .Values.agent.image.pullPolicy
    "imagePullSecrets" .Values.agent.imagePullSecrets
    "healthPort" .Values.agent.healthPort
    "reportIntervalSeconds" .Values.agent.reportIntervalSeconds
    "resources" .Values.agent.resources
    "tolerations" .Values.agent.tolerations
    "nodeSelector" .Values.agent.nodeSelector
    "runAsNonRoot" .Values.agent.runAsNonRoot
    "forensicsTokenSecret" .Values.agent.forensicsTokenSecret }}
{{- with .Values.agent.priorityClassName }}
{{- $_ := set $agent "priorityClassName" . }}
{{- end }}
{{- $election := dict
    "enabled" .Values.operator.leaderElection.enabled
    "leaseName" (include "flowprobe.operatorName" .)
    "leaseDurationSeconds" .Values.operator.leaderElection.leaseDurationSeconds
    "renewDeadlineSeconds" .Values.operator.leaderElection.renewDeadlineSeconds
    "retryPeriodSeconds" .Values.operator.leaderElection.retryPeriodSeconds }}
{{- $config := dict
    "namespace" .Release.Namespace
    "agent" $agent
    "leaderElection" $election
    "resyncSeconds" .Values.operator.resyncSeconds
    "agentReportGraceSeconds" .Values.operator.agentReportGraceSeconds }}
{{- with .Values.agent.defaultExport }}
{{- if .endpoint }}
{{- $export := dict "endpoint" .endpoint "protocol" .protocol "timeoutSeconds" .timeoutSeconds }}
{{- with .headersSecretName }}
{{- $_ := set $export "headersSecretRef" (dict "name" .) }}
{{- end }}
{{- $_ := set $config "defaultExport" $export }}
{{- end }}
{{- end }}
{{- toPrettyJson $config }}
{{- end }}
