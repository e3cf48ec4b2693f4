{{/* Names and labels shared by every object of the chart. */}}

{{- define "taidon.fullname" -}}
{{- printf "%s-taidon" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{/* The shared contract's labels, plus Helm's. Call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "taidon.labels" -}}
app.kubernetes.io/name: taidon
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version }}
{{- end -}}

{{- define "taidon.selector" -}}
app.kubernetes.io/name: taidon
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- end -}}

{{- define "taidon.gatewaySA" -}}
{{- default (printf "%s-gateway" (include "taidon.fullname" .)) .Values.serviceAccount.gateway.name -}}
{{- end -}}

{{- define "taidon.controllerSA" -}}
{{- default (printf "%s-controller" (include "taidon.fullname" .)) .Values.serviceAccount.controller.name -}}
{{- end -}}

{{- define "taidon.metadataSecret" -}}
{{- default (printf "%s-metadata" (include "taidon.fullname" .)) .Values.metadata.existingSecret -}}
{{- end -}}

{{- define "taidon.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}

{{/* Pod-level security: non-root with the image's user, the runtime's seccomp profile. */}}
{{- define "taidon.podSecurity" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container-level security: read-only root, no capabilities, no privilege escalation. */}}
{{- define "taidon.containerSecurity" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
{{- end -}}

{{/* The proxy's config file: what the chart owns, merged over .Values.config. */}}
{{- define "taidon.config" -}}
{{- $own := dict
  "listen" "0.0.0.0:5432"
  "admin" (dict "listen" (printf "0.0.0.0:%d" (int .Values.admin.port)))
  "store" "/var/lib/taidon"
  "shutdown_grace" (printf "%ds" (int .Values.gateway.drainGraceSeconds))
  "runtime" (dict
    "kind" "kubernetes"
    "namespace" .Release.Namespace
    "image" .Values.runtime.image
    "storage_class" .Values.runtime.storageClass
    "snapshot_class" .Values.runtime.snapshotClass)
  "metadata" (dict "kind" "postgres" "dsn" "${TAIDON_METADATA_DSN}")
-}}
{{- $users := dict -}}
{{- range $i, $name := keys .Values.auth.users | sortAlpha -}}
{{- $_ := set $users $name (printf "${TAIDON_AUTH_%d}" $i) -}}
{{- end -}}
{{- $_ := set $own "auth" (dict "method" "scram-sha-256" "users" $users) -}}
{{- if .Values.tls.existingSecret -}}
{{- $_ := set $own "tls" (dict "cert" "/etc/taidon/tls/tls.crt" "key" "/etc/taidon/tls/tls.key") -}}
{{- end -}}
{{- toYaml (merge $own (deepCopy .Values.config)) -}}
{{- end -}}
