{{/*
Names. Resource names are capped at 63 characters (label values and DNS labels); the worker
StatefulSet name leaves room for the "-<ordinal>" pod suffix and the controller-revision hash.
*/}}
{{- define "shardop.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "shardop.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "shardop.workerName" -}}
{{- printf "%s-worker" (include "shardop.fullname" .) }}
{{- end }}

{{- define "shardop.assignerName" -}}
{{- printf "%s-assigner" (include "shardop.fullname" .) }}
{{- end }}

{{/*
Cluster-scoped objects (ClusterRoles, FlowSchemas, ...) are shared by every namespace, so
their names carry the release namespace: two releases in two namespaces never collide.
*/}}
{{- define "shardop.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "shardop.fullname" .) | trunc 50 | trimSuffix "-" }}
{{- end }}

{{- define "shardop.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "shardop.labels" -}}
helm.sh/chart: {{ include "shardop.chart" . }}
app.kubernetes.io/part-of: shardop
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component; call with (dict "ctx" $ "component" "worker"). */}}
{{- define "shardop.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shardop.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "shardop.componentLabels" -}}
{{ include "shardop.labels" .ctx }}
{{ include "shardop.selectorLabels" . }}
{{- end }}

{{- define "shardop.workerServiceAccountName" -}}
{{- if .Values.worker.serviceAccount.create }}
{{- default (include "shardop.workerName" .) .Values.worker.serviceAccount.name }}
{{- else }}
{{- required "worker.serviceAccount.name is required when worker.serviceAccount.create is false" .Values.worker.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "shardop.assignerServiceAccountName" -}}
{{- if .Values.assigner.serviceAccount.create }}
{{- default (include "shardop.assignerName" .) .Values.assigner.serviceAccount.name }}
{{- else }}
{{- required "assigner.serviceAccount.name is required when assigner.serviceAccount.create is false" .Values.assigner.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "shardop.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Whether something other than spec.replicas decides the worker count. */}}
{{- define "shardop.autoscaled" -}}
{{- if or .Values.worker.autoscaling.enabled .Values.keda.enabled }}true{{ end }}
{{- end }}

{{/* The worker's terminationGracePeriodSeconds (see values.yaml). */}}
{{- define "shardop.workerGracePeriod" -}}
{{- $timeout := int .Values.worker.shutdownTimeoutSeconds }}
{{- if kindIs "invalid" .Values.worker.terminationGracePeriodSeconds }}
{{- add $timeout 15 }}
{{- else }}
{{- $grace := int .Values.worker.terminationGracePeriodSeconds }}
{{- if le $grace $timeout }}
{{- fail (printf "worker.terminationGracePeriodSeconds (%d) must be greater than worker.shutdownTimeoutSeconds (%d): otherwise the kubelet kills a worker that is still releasing its shard Leases" $grace $timeout) }}
{{- end }}
{{- $grace }}
{{- end }}
{{- end }}

{{/*
Cross-field checks values.schema.json cannot express. Included by every workload template,
so `helm template` and `helm install` fail before anything reaches the cluster.
*/}}
{{- define "shardop.validate" -}}
{{- if and .Values.worker.autoscaling.enabled .Values.keda.enabled }}
{{- fail "worker.autoscaling.enabled and keda.enabled are mutually exclusive: KEDA creates its own HPA for the worker StatefulSet, and two HPAs on one target fight" }}
{{- end }}
{{- if ge (int .Values.worker.lease.renewDeadlineSeconds) (int .Values.worker.lease.durationSeconds) }}
{{- fail (printf "worker.lease.renewDeadlineSeconds (%d) must be less than worker.lease.durationSeconds (%d): the difference is the fencing margin that keeps an old holder from writing after another worker may take over" (int .Values.worker.lease.renewDeadlineSeconds) (int .Values.worker.lease.durationSeconds)) }}
{{- end }}
{{- if ge (int .Values.worker.lease.retryPeriodSeconds) (int .Values.worker.lease.renewDeadlineSeconds) }}
{{- fail (printf "worker.lease.retryPeriodSeconds (%d) must be less than worker.lease.renewDeadlineSeconds (%d): a holder must get at least one renewal attempt before its deadline" (int .Values.worker.lease.retryPeriodSeconds) (int .Values.worker.lease.renewDeadlineSeconds)) }}
{{- end }}
{{- if and .Values.worker.autoscaling.enabled (gt (int .Values.worker.autoscaling.minReplicas) (int .Values.worker.autoscaling.maxReplicas)) }}
{{- fail (printf "worker.autoscaling.minReplicas (%d) must not exceed worker.autoscaling.maxReplicas (%d)" (int .Values.worker.autoscaling.minReplicas) (int .Values.worker.autoscaling.maxReplicas)) }}
{{- end }}
{{- if and .Values.keda.enabled (gt (int .Values.keda.minReplicas) (int .Values.keda.maxReplicas)) }}
{{- fail (printf "keda.minReplicas (%d) must not exceed keda.maxReplicas (%d)" (int .Values.keda.minReplicas) (int .Values.keda.maxReplicas)) }}
{{- end }}
{{- with .Values.assigner.shards }}
{{- $most := int $.Values.worker.replicas }}
{{- if $.Values.worker.autoscaling.enabled }}{{ $most = int $.Values.worker.autoscaling.maxReplicas }}{{ end }}
{{- if $.Values.keda.enabled }}{{ $most = int $.Values.keda.maxReplicas }}{{ end }}
{{- if gt $most (int .) }}
{{- fail (printf "assigner.shards (%d) must be at least the most worker replicas (%d): a worker beyond the shard count serves nothing" (int .) $most) }}
{{- end }}
{{- end }}
{{- $_ := include "shardop.workerGracePeriod" . }}
{{- end }}

{{/* Restricted Pod Security Standard, pod level. */}}
{{- define "shardop.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Restricted Pod Security Standard, container level. */}}
{{- define "shardop.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Environment shared by both binaries. */}}
{{- define "shardop.commonEnv" -}}
# The operator whose labels, Leases and Shard objects these are (docs/assigner.md).
- name: SHARDOP_OPERATOR_NAME
  value: {{ .Values.operatorName | quote }}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
{{- if .Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .Values.otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ .Values.otel.protocol | quote }}
{{- end }}
{{- if .Values.otel.resourceAttributes }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ .Values.otel.resourceAttributes | quote }}
{{- end }}
{{- end }}

{{/* --watch-namespaces value, empty for all namespaces. */}}
{{- define "shardop.watchNamespacesArg" -}}
{{- join "," .Values.watchNamespaces }}
{{- end }}

{{/* Prefix of the operator's label and annotation keys: shardop.dev for the default
operator, <operatorName>.shardop.dev otherwise (shardop::names::OperatorNames). */}}
{{- define "shardop.labelPrefix" -}}
{{- if eq .Values.operatorName "shardop" -}}
shardop.dev
{{- else -}}
{{- printf "%s.shardop.dev" .Values.operatorName -}}
{{- end -}}
{{- end }}

{{/* The kinds the assigner shards, as JSON {"items": [{name, resource, version, group,
cluster}]}: each assigner.shardedResources entry is "<resource>.<version>.<group>"
("<resource>.<version>" for the core group), or {name: ..., clusterScoped: true} for a
cluster-scoped kind (whose RBAC is cluster-wide even when watchNamespaces is set). */}}
{{- define "shardop.shardedResources" -}}
{{- $items := list }}
{{- range .Values.assigner.shardedResources }}
{{- $name := . }}
{{- $cluster := false }}
{{- if kindIs "map" . }}
{{- $name = .name }}
{{- $cluster = .clusterScoped | default false }}
{{- end }}
{{- $parts := splitn "." 3 $name }}
{{- $items = append $items (dict "name" $name "resource" $parts._0 "version" $parts._1 "group" ($parts._2 | default "") "cluster" $cluster) }}
{{- end }}
{{- dict "items" $items | toJson }}
{{- end }}

{{/* RBAC rules of the assigner on the sharded kinds of scope .scope: "all", "namespaced"
or "cluster" (cluster-scoped kinds). Metadata watch and label-only patches. */}}
{{- define "shardop.assignerShardedRules" -}}
{{- $scope := .scope }}
{{- range (include "shardop.shardedResources" .ctx | fromJson).items }}
{{- if or (eq $scope "all") (eq .cluster (eq $scope "cluster")) }}
- apiGroups: [{{ .group | quote }}]
  resources: [{{ .resource | quote }}]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end }}
{{- end }}
