{{- define "goim.fullname" -}}
{{- printf "%s-goim" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "goim.labels" -}}
app.kubernetes.io/name: goim-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "goim.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "goim.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}
