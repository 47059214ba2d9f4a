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

{{- /* The host agents dial: relay.publicAddress, else the agents Service's name (in-cluster only). With a
NodePort Service, agents dial a node: its address is required. */ -}}
{{- define "atlax.relayHost" -}}
{{- if eq .Values.service.type "NodePort" -}}
{{- required "relay.publicAddress is required with service.type=NodePort: the node address agents dial" .Values.relay.publicAddress -}}
{{- else -}}
{{- .Values.relay.publicAddress | default (printf "%s-agents.%s.svc" (include "atlax.fullname" .) .Release.Namespace) -}}
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

{{- /* Labels that tell the relay pods (component relay) from the controller's. */ -}}
{{- define "atlax.relaySelector" -}}
{{ include "atlax.selector" . }}
app.kubernetes.io/component: relay
{{- end -}}

{{- define "atlax.controllerSelector" -}}
{{ include "atlax.selector" . }}
app.kubernetes.io/component: controller
{{- end -}}

{{- /* The pod's namespace and name, for the operator's containers. */ -}}
{{- define "atlax.podEnv" -}}
- name: POD_NAMESPACE
  valueFrom:
    fieldRef: {fieldPath: metadata.namespace}
- name: POD_NAME
  valueFrom:
    fieldRef: {fieldPath: metadata.name}
- name: POD_UID
  valueFrom:
    fieldRef: {fieldPath: metadata.uid}
{{- end -}}

{{- /* The container securityContext of every container. */ -}}
{{- define "atlax.hardened" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{- /* The pod securityContext (the relay pods add the sysctl). */ -}}
{{- define "atlax.podSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- /* What automountServiceAccountToken would mount, for the one container that needs it. */ -}}
{{- define "atlax.tokenVolume" -}}
- name: kube-api-access
  projected:
    defaultMode: 0444
    sources:
      - serviceAccountToken: {path: token, expirationSeconds: 3607}
      - configMap:
          name: kube-root-ca.crt
          items: [{key: ca.crt, path: ca.crt}]
      - downwardAPI:
          items:
            - path: namespace
              fieldRef: {apiVersion: v1, fieldPath: metadata.namespace}
{{- end -}}

{{- /* `atlax operator controller` arguments. */ -}}
{{- define "atlax.controllerArgs" -}}
{{- $fullname := include "atlax.fullname" . -}}
{{- $host := include "atlax.relayHost" . -}}
{{- $c := .Values.controller -}}
- operator
- controller
- --namespace=$(POD_NAMESPACE)
- --identity=$(POD_NAME)
- --service-name={{ $fullname }}
- --lease-name={{ $fullname }}-controller
- --relay-address={{ $host }}:{{ include "atlax.relayPort" . }}
- --relay-san={{ $host }}
- --relay-san={{ $fullname }}.{{ .Release.Namespace }}.svc
- --relay-san={{ $fullname }}-agents.{{ .Release.Namespace }}.svc
{{- range .Values.relay.extraSANs }}
- --relay-san={{ . }}
{{- end }}
- --status-interval={{ $c.statusInterval }}
- --lease-duration={{ $c.leaseDuration }}
- --renew-deadline={{ $c.renewDeadline }}
- --retry-period={{ $c.retryPeriod }}
{{- end -}}

{{- /* `atlax operator sync` arguments (the relay pod's sidecar). */ -}}
{{- define "atlax.syncArgs" -}}
- operator
- sync
- --namespace=$(POD_NAMESPACE)
- --pod-name=$(POD_NAME)
- --pod-uid=$(POD_UID)
- --service-name={{ include "atlax.fullname" . }}
- --control-socket=/run/atlax/control/relay/control.sock
- --interval={{ .Values.sync.interval }}
- --health-port={{ .Values.sync.healthPort }}
- --join-grace={{ .Values.sync.joinGrace }}
{{- end -}}
