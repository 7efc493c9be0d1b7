{{/* The chart name, or nameOverride. */}}
{{- define "spate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name: release name, plus the chart name unless it already has it. */}}
{{- define "spate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "spate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "spate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{- define "spate.labels" -}}
helm.sh/chart: {{ include "spate.chart" . }}
{{ include "spate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: spate
{{- end -}}

{{- define "spate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "spate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "spate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Where the leader Lease and the source checkpoints live. */}}
{{- define "spate.leaseNamespace" -}}
{{- default .Release.Namespace .Values.leaderElection.namespace -}}
{{- end -}}

{{/*
What the controller does in the namespaces it watches, and nothing more (each line is a call
in orchestrator/src or sinks/src; orchestrator/tests/it/least_privilege.rs proves the set):
- pipelines list/watch: the controller's watch (engine/controller.rs);
- pipelines/status patch: status writes (engine/controller.rs);
- jobs create, get (after 409 AlreadyExists, and before giving up on a Pending pod), list/watch
  (the tracker), patch (release after the input, the `spate.dev/reported` mark, the widened
  parallelism, the deadline of a Job whose pod never starts), delete (Jobs a crash or a
  refused input left incomplete, engine/intake.rs and engine/emit.rs);
- pods list/watch: Pending pods, get: re-read before giving up on one (engine/stuck.rs);
- configmaps create (the input of large events and indexed batches, engine/emit.rs), get (read
  back when reporting, engine/tracker.rs);
- events create: the default dead-letter sink (sinks/src/kubernetes_event.rs);
- secrets get: `secretKeyRef` credentials (engine/secrets.rs), with rbac.readSecrets.
*/}}
{{- define "spate.workloadRules" -}}
- apiGroups: ["spate.dev"]
  resources: ["pipelines"]
  verbs: ["list", "watch"]
- apiGroups: ["spate.dev"]
  resources: ["pipelines/status"]
  verbs: ["patch"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["create", "get", "list", "watch", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create", "get"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if .Values.rbac.readSecrets }}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}
{{- end -}}

{{/*
Leader election and checkpoints, in the Lease's namespace (engine/leader.rs,
engine/checkpoints.rs): the Lease is read and renewed by name; checkpoints are read, and
written by server-side apply (a patch that creates the ConfigMap when missing).
*/}}
{{- define "spate.leaderRules" -}}
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["create"]
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  resourceNames: ["spate-controller"]
  verbs: ["get", "update"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "patch"]
{{- end -}}

{{/* A value that may be an object or a template string. */}}
{{- define "spate.render" -}}
{{- if typeIs "string" .value -}}
{{- tpl .value .context -}}
{{- else -}}
{{- tpl (.value | toYaml) .context -}}
{{- end -}}
{{- end -}}
