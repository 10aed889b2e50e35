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
