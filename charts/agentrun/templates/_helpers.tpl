{{- define "agentrun.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "agentrun.labels" -}}
app.kubernetes.io/name: agentrun
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: agentrun
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "agentrun.selector" -}}
app.kubernetes.io/name: agentrun
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "agentrun.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "agentrun.redisURLEnv" -}}
{{- if .Values.redis.enabled }}
- name: AGENTRUN_REDIS_URL
  value: {{ printf "redis://%s-redis:6379/0" (include "agentrun.fullname" .) | quote }}
{{- else if .Values.redis.externalSecret.name }}
- name: AGENTRUN_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.externalSecret.name }}
      key: {{ .Values.redis.externalSecret.key }}
{{- else }}
- name: AGENTRUN_REDIS_URL
  value: {{ required "redis.externalURL (or redis.externalSecret.name) is required when redis.enabled is false" .Values.redis.externalURL | quote }}
{{- end }}
{{- end -}}

{{- define "agentrun.modelEnv" -}}
- name: AGENTRUN_MODEL_BASE_URL
  value: {{ .Values.model.baseURL | quote }}
- name: AGENTRUN_MODEL_NAME
  value: {{ .Values.model.name | quote }}
{{- with .Values.model.baseURLAllow }}
- name: AGENTRUN_MODEL_BASE_URL_ALLOW
  value: {{ join "," . | quote }}
{{- end }}
{{- end -}}

{{/* The webhooks of agentrun_operator.webhooks.configurations(); a test keeps them equal. */}}
{{- define "agentrun.webhookEntries" -}}
{{- $root := index . 0 -}}
{{- $mode := index . 1 -}}
{{- $ca := index . 2 -}}
{{- $svc := printf "%s-webhooks" (include "agentrun.fullname" $root) -}}
{{- range $h := list (list "toolapprovals" "" (list "CREATE" "UPDATE") "Fail") (list "agentruns" "-create" (list "CREATE") "Fail") (list "agentruns" "-update" (list "UPDATE") "Ignore") }}
- name: {{ printf "%s-%s%s.agentrun.dev" $mode (index $h 0) (index $h 1) }}
  clientConfig:
    service:
      namespace: {{ $root.Release.Namespace }}
      name: {{ $svc }}
      port: 443
      path: {{ printf "/%s/%s" $mode (index $h 0) }}
    {{- if $ca }}
    caBundle: {{ $ca }}
    {{- end }}
  rules:
    - apiGroups: [agentrun.dev]
      apiVersions: [v1alpha1]
      operations: {{ index $h 2 | toJson }}
      resources: [{{ index $h 0 }}]
      scope: Namespaced
  failurePolicy: {{ index $h 3 }}
  sideEffects: None
  admissionReviewVersions: [v1]
  timeoutSeconds: 5
  {{- if eq $mode "mutate" }}
  reinvocationPolicy: Never
  {{- end }}
{{- end }}
{{- end -}}
