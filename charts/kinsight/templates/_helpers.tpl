{{- define "kinsight.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "kinsight.catalogVolume" -}}
{{ include "kinsight.apiAccessVolume" . }}
- name: catalog
  configMap: {name: {{ .Release.Name }}-catalog}
{{- with .Values.database.caSecretName }}
- name: database-ca
  secret:
    secretName: {{ . | quote }}
    items: [{key: {{ $.Values.database.caSecretKey | quote }}, path: ca.crt}]
{{- end }}
{{- with .Values.modelsVolume }}
- {{ merge (dict "name" "models") . | toJson }}
{{- end }}
{{- end -}}

{{- define "kinsight.catalogMounts" -}}
- {name: kube-api-access, mountPath: /var/run/secrets/kubernetes.io/serviceaccount, readOnly: true}
- {name: catalog, mountPath: /etc/kinsight/catalog, readOnly: true}
{{- if .Values.database.caSecretName }}
- {name: database-ca, mountPath: /etc/kinsight/database-ca, readOnly: true}
{{- end }}
{{- if .Values.modelsVolume }}
- {name: models, mountPath: {{ .Values.modelsDir | quote }}, readOnly: true}
{{- end }}
{{- end -}}

{{- define "kinsight.catalogEnv" -}}
- {name: KINSIGHT_CATALOG, value: /etc/kinsight/catalog/catalog.yaml}
- {name: KINSIGHT_MODELS_DIR, value: {{ .Values.modelsDir | quote }}}
{{- end -}}

{{- define "kinsight.labels" -}}
app.kubernetes.io/name: kinsight
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* The database URL, from the Secret the operator names (values: database). */}}
{{- define "kinsight.databaseEnv" -}}
- name: KINSIGHT_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.secretName | quote }}
      key: {{ .Values.database.secretKey | quote }}
{{- if .Values.database.caSecretName }}
- {name: PGSSLMODE, value: verify-full}
- {name: PGSSLROOTCERT, value: /etc/kinsight/database-ca/ca.crt}
{{- end }}
{{- end }}

{{/* The pod's way into the API server, the volume Kubernetes (1.21+) itself projects: a
bound ServiceAccount token, the cluster CA and the namespace. The chart projects it itself
(with automountServiceAccountToken: false) so that it is the same on clusters that mount no
token (the ServiceAccount admission plugin off, as in the testbed). */}}
{{- define "kinsight.apiAccessVolume" -}}
- name: kube-api-access
  projected:
    sources:
      - serviceAccountToken: {path: token, expirationSeconds: 3607}
      - configMap: {name: kube-root-ca.crt, items: [{key: ca.crt, path: ca.crt}]}
      - downwardAPI: {items: [{path: namespace, fieldRef: {fieldPath: metadata.namespace}}]}
{{- end -}}

{{/* The namespace of the API-key records (values: apiKeys). */}}
{{- define "kinsight.keysNamespace" -}}
{{ .Values.apiKeys.namespace | default (printf "%s-keys" .Release.Namespace) | trimPrefix "-" }}
{{- end -}}

{{/* The spec of the NetworkPolicy the controller puts beside worker pods in every tenant
namespace (values: worker.networkPolicy). */}}
{{- define "kinsight.workerNetworkPolicy" -}}
{{- $np := .Values.worker.networkPolicy -}}
podSelector:
  matchLabels: {app.kubernetes.io/managed-by: kinsight-controller, app.kubernetes.io/component: worker}
# No ingress rule: nothing connects to a worker.
policyTypes: [Ingress, Egress]
egress:
  # DNS, wherever the cluster's resolver runs.
  - to: [{namespaceSelector: {}}]
    ports: [{protocol: UDP, port: 53}, {protocol: TCP, port: 53}]
  # The API's internal results path.
  - to:
      - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: {{ .Release.Namespace }}}}
        podSelector: {matchLabels: {app.kubernetes.io/instance: {{ .Release.Name }}, app.kubernetes.io/component: api}}
    ports: [{protocol: TCP, port: {{ .Values.api.port }}}]
  # Image hosts: anywhere but the cluster's private ranges.
  - to:
      {{- range $np.imageHosts }}
      - ipBlock: {{ toJson . }}
      {{- end }}
    {{- with $np.imageHostPorts }}
    ports: {{ toJson . }}
    {{- end }}
  {{- with $np.extraEgress }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* Span export (values: tracing): the OpenTelemetry variables, set only when an endpoint is given. */}}
{{- define "kinsight.tracingEnv" -}}
{{- with .Values.tracing.otlpEndpoint }}
- {name: OTEL_EXPORTER_OTLP_ENDPOINT, value: {{ . | quote }}}
{{- end }}
{{- end -}}
