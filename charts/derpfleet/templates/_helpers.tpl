{{- define "derpfleet.name" -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "derpfleet.labels" -}}
app.kubernetes.io/name: derpfleet-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "derpfleet.selector" -}}
app.kubernetes.io/name: derpfleet-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
What the operator does in a namespace it serves: watch DerpRegions and what
they own, apply the relays' objects, post Events. Secrets are read and written
by name only (no list/watch of every Secret).
*/}}
{{- define "derpfleet.regionRules" }}
  - apiGroups: [derpfleet.io]
    resources: [derpregions]
    verbs: [get, list, watch, patch, update]
  - apiGroups: [derpfleet.io]
    resources: [derpregions/status]
    verbs: [get, patch, update]
  - apiGroups: [""]
    resources: [pods]
    verbs: [get, list, watch]
  - apiGroups: [""]
    resources: [secrets]
    verbs: [get, create, patch]
  - apiGroups: [""]
    resources: [configmaps, services]
    verbs: [get, list, watch, create, patch]
  - apiGroups: [apps]
    resources: [statefulsets]
    verbs: [get, list, watch, create, patch]
  - apiGroups: [policy]
    resources: [poddisruptionbudgets]
    verbs: [get, list, watch, create, patch]
  - apiGroups: [cert-manager.io]
    resources: [certificates]
    verbs: [get, create, patch]
  - apiGroups: ["", events.k8s.io]
    resources: [events]
    verbs: [create, patch]
{{- end }}

{{/* Fail, naming the value and the CRD, when a monitoring object's CRD is not installed. */}}
{{- define "derpfleet.requireMonitoringCRD" -}}
{{- $root := index . 0 -}}
{{- $kind := index . 1 -}}
{{- $value := index . 2 -}}
{{- if not ($root.Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" $kind)) -}}
{{- fail (printf "%s is true, but the cluster has no %s CRD (monitoring.coreos.com/v1): install the Prometheus Operator's CRDs first, or leave it off (helm template: pass --api-versions monitoring.coreos.com/v1/%s)" $value $kind $kind) -}}
{{- end -}}
{{- end -}}
