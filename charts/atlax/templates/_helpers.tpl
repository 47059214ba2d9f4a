{{- define "atlax.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "atlax.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "atlax.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "atlax.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- /* The host agents dial: relay.publicAddress, else the Service's name (in-cluster only). With a
NodePort Service, agents dial a node: its address is required. */ -}}
{{- define "atlax.relayHost" -}}
{{- if eq .Values.service.type "NodePort" -}}
{{- required "relay.publicAddress is required with service.type=NodePort: the node address agents dial" .Values.relay.publicAddress -}}
{{- else -}}
{{- .Values.relay.publicAddress | default (printf "%s.%s.svc" (include "atlax.fullname" .) .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{- /* The port agents dial: the agent port's node port with a NodePort Service, else the Service's port. */ -}}
{{- define "atlax.relayPort" -}}
{{- if eq .Values.service.type "NodePort" -}}
{{- required "service.agentNodePort is required with service.type=NodePort: agents dial NODE:agentNodePort" .Values.service.agentNodePort -}}
{{- else -}}
{{- .Values.relay.agentPort -}}
{{- end -}}
{{- end -}}

{{- /* `atlax operator` arguments, shared by the pod's certificate step and the operator. */ -}}
{{- define "atlax.operatorArgs" -}}
{{- $fullname := include "atlax.fullname" . -}}
{{- $host := include "atlax.relayHost" . -}}
- operator
- --namespace=$(POD_NAMESPACE)
- --control-socket=/run/atlax/control/relay/control.sock
- --service-name={{ $fullname }}
- --relay-address={{ $host }}:{{ include "atlax.relayPort" . }}
- --relay-san={{ $host }}
- --relay-san={{ $fullname }}.{{ .Release.Namespace }}.svc
{{- range .Values.relay.extraSANs }}
- --relay-san={{ . }}
{{- end }}
- --relay-tls-dir=/run/atlax/tls
- --status-interval={{ .Values.operator.statusInterval }}
{{- end -}}
