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

{{/* Fail, naming the value and the CRD, when a monitoring object's CRD is not installed. */}}
{{- define "derpfleet.requireMonitoringCRD" -}}
{{- $root := index . 0 -}}
{{- $kind := index . 1 -}}
{{- $value := index . 2 -}}
{{- if not ($root.Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" $kind)) -}}
{{- fail (printf "%s is true, but the cluster has no %s CRD (monitoring.coreos.com/v1): install the Prometheus Operator's CRDs first, or leave it off (helm template: pass --api-versions monitoring.coreos.com/v1/%s)" $value $kind $kind) -}}
{{- end -}}
{{- end -}}
