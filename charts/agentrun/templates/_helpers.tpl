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

{{- /* The Secret with the bundled Redis's ACL passwords: the user's, or the chart's own. */}}
{{- define "agentrun.redisAuthSecret" -}}
{{- .Values.redis.auth.existingSecret | default (printf "%s-redis-auth" (include "agentrun.fullname" .)) -}}
{{- end -}}

{{- /* AGENTRUN_REDIS_URL for one of the product's Redis users: (list $ "operator") or
       (list $ "sse"). The password comes from the Secret and is put into the URL by the
       kubelet ($(VAR) expansion), so no manifest or `kubectl describe` shows it. */}}
{{- define "agentrun.redisURLEnv" -}}
{{- $root := index . 0 -}}
{{- $who := index . 1 -}}
{{- if $root.Values.redis.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "agentrun.redisAuthSecret" $root }}
      key: {{ $who }}-password
- name: AGENTRUN_REDIS_URL
  value: {{ printf "redis://agentrun-%s:$(REDIS_PASSWORD)@%s-redis:6379/0" $who (include "agentrun.fullname" $root) | quote }}
{{- else if $root.Values.redis.externalSecret.name }}
{{- /* The SSE sidecar faces the internet: give it a user limited to reading streams and
       publishing stops (externalSecret.sseKey); without one it shares the operator's. */}}
- name: AGENTRUN_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.redis.externalSecret.name }}
      key: {{ (and (eq $who "sse") $root.Values.redis.externalSecret.sseKey) | default $root.Values.redis.externalSecret.key }}
{{- else }}
- name: AGENTRUN_REDIS_URL
  value: {{ required "redis.externalURL (or redis.externalSecret.name) is required when redis.enabled is false" $root.Values.redis.externalURL | quote }}
{{- end }}
{{- if $root.Values.redis.cluster }}
{{- if $root.Values.redis.enabled }}
{{- fail "redis.cluster is for an external Redis Cluster (redis.externalURL or redis.externalSecret): the bundled Redis is one server" }}
{{- end }}
- name: AGENTRUN_REDIS_CLUSTER
  value: "true"
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
{{- with .Values.mcp.urlAllow }}
- name: AGENTRUN_MCP_URL_ALLOW
  value: {{ join "," . | quote }}
{{- end }}
{{- end -}}

{{/* The webhooks of agentrun_operator.webhooks.configurations(); a test keeps them equal. */}}
{{- define "agentrun.webhookEntries" -}}
{{- $root := index . 0 -}}
{{- $mode := index . 1 -}}
{{- $ca := index . 2 -}}
{{- $svc := printf "%s-webhooks" (include "agentrun.fullname" $root) -}}
{{- $hooks := list (list "toolapprovals" "" (list "CREATE" "UPDATE") "Fail" "Namespaced") (list "agentruns" "-create" (list "CREATE") "Fail" "Namespaced") (list "agentruns" "-update" (list "UPDATE") "Ignore" "Namespaced") -}}
{{- if eq $mode "validate" -}}
{{- /* Policies are admitted only when every CEL rule compiles; MCPServers only when their URL is allowed. */ -}}
{{- $hooks = concat $hooks (list (list "agentpolicies" "" (list "CREATE" "UPDATE") "Fail" "Namespaced") (list "mcpservers" "" (list "CREATE" "UPDATE") "Fail" "Namespaced") (list "clusteragentpolicies" "" (list "CREATE" "UPDATE") "Fail" "Cluster")) -}}
{{- end -}}
{{- range $h := $hooks }}
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
      scope: {{ index $h 4 }}
  failurePolicy: {{ index $h 3 }}
  sideEffects: None
  admissionReviewVersions: [v1]
  timeoutSeconds: 5
  {{- if eq $mode "mutate" }}
  reinvocationPolicy: Never
  {{- end }}
{{- end }}
{{- end -}}

{{/* The environment of every process that executes runs: the operator (all or controller)
     and the workers. */}}
{{- define "agentrun.runEnv" -}}
{{- include "agentrun.redisURLEnv" (list . "operator") }}
{{ include "agentrun.modelEnv" . }}
{{- if .Values.model.apiKeySecret.name }}
- name: AGENTRUN_MODEL_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.model.apiKeySecret.name }}
      key: {{ .Values.model.apiKeySecret.key }}
{{- end }}
- name: AGENTRUN_NAMESPACES
  value: {{ join "," .Values.operator.namespaces | quote }}
- name: AGENTRUN_MAX_CONCURRENT_RUNS
  value: {{ .Values.operator.maxConcurrentRuns | quote }}
- name: AGENTRUN_STREAM_MAXLEN
  value: {{ .Values.operator.streamMaxlen | quote }}
{{- with .Values.operator.prices }}
- name: AGENTRUN_PRICES
  value: {{ toJson . | quote }}
{{- end }}
- name: AGENTRUN_OPERATOR_ID
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
{{- if .Values.notifications.enabled }}
- name: AGENTRUN_NOTIFY_CONFIGMAP
  value: {{ printf "%s/%s-notifications" .Release.Namespace (include "agentrun.fullname" .) | quote }}
{{- end }}
{{- with .Values.uiURL }}
- name: AGENTRUN_UI_URL
  value: {{ . | quote }}
{{- end }}
{{- if .Values.tracing.enabled }}
{{- if not .Values.tracing.endpoint }}
{{- fail "tracing.enabled needs tracing.endpoint: the OTLP HTTP base URL of your collector, e.g. http://jaeger-collector.tracing:4318" }}
{{- end }}
- name: AGENTRUN_OTEL_ENDPOINT
  value: {{ .Values.tracing.endpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ .Values.tracing.serviceName | quote }}
{{- end }}
{{- range $k, $v := .Values.operator.extraEnv }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- end -}}
