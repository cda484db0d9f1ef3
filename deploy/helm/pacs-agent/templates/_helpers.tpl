{{/* Names and labels shared by every template. */}}
{{- define "pacs-agent.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pacs-agent.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "pacs-agent.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "pacs-agent.image" -}}
{{ printf "%s:%s-%s" .root.Values.image.repository .root.Values.image.tag .suffix | quote }}
{{- end -}}

{{- define "pacs-agent.secretName" -}}
{{- if .Values.secret.existingSecret -}}
{{ .Values.secret.existingSecret }}
{{- else -}}
{{ include "pacs-agent.fullname" . }}
{{- end -}}
{{- end -}}

{{- define "pacs-agent.claimName" -}}
{{- if .Values.storage.existingClaim -}}
{{ .Values.storage.existingClaim }}
{{- else -}}
{{ include "pacs-agent.fullname" . }}-shared
{{- end -}}
{{- end -}}

{{/* Environment of every pacs-agent container: settings, secrets, the storage layout. */}}
{{- define "pacs-agent.env" -}}
- name: PACS_AGENT_DATA_DIR
  value: /var/lib/pacs-agent
- name: PACS_AGENT_STORAGE__SPOOL_DIR
  value: /srv/pacs-agent/spool
- name: PACS_AGENT_STORAGE__RESULTS_DIR
  value: /srv/pacs-agent/results
- name: PACS_AGENT_DATABASE__AUTO_UPGRADE
  value: "false"
- name: PACS_AGENT_WORKER__EMBEDDED
  value: "false"
- name: HOME
  value: /var/lib/pacs-agent
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
{{- if .Values.configToml }}
- name: PACS_AGENT_CONFIG
  value: /etc/pacs-agent/pacs-agent.toml
{{- end }}
{{- end -}}

{{- define "pacs-agent.envFrom" -}}
- configMapRef:
    name: {{ include "pacs-agent.fullname" . }}
- secretRef:
    name: {{ include "pacs-agent.secretName" . }}
{{- end -}}

{{- define "pacs-agent.volumeMounts" -}}
- name: data
  mountPath: /var/lib/pacs-agent
- name: shared
  mountPath: /srv/pacs-agent
- name: tmp
  mountPath: /tmp
{{- if .Values.configToml }}
- name: config
  mountPath: /etc/pacs-agent
  readOnly: true
{{- end }}
{{- end -}}

{{- define "pacs-agent.volumes" -}}
- name: data
  emptyDir: {}
- name: tmp
  emptyDir: {}
- name: shared
  persistentVolumeClaim:
    claimName: {{ include "pacs-agent.claimName" . }}
{{- if .Values.configToml }}
- name: config
  configMap:
    name: {{ include "pacs-agent.fullname" . }}-toml
{{- end }}
{{- end -}}
