{{/* Base name of every object: the release name, plus "-starling" unless it already says so. */}}
{{- define "starling.fullname" -}}
{{- if contains "starling" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-starling" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "starling.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: starling
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
{{- end -}}

{{/* Selector labels of one component: include with (list . "agent"). */}}
{{- define "starling.selector" -}}
app.kubernetes.io/name: starling
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "starling.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "starling.swarmKeySecret" -}}
{{- .Values.swarmKey.existingSecret | default (printf "%s-swarm-key" (include "starling.fullname" .)) -}}
{{- end -}}

{{- define "starling.supernodeName" -}}
{{- printf "%s-supernode" (include "starling.fullname" .) -}}
{{- end -}}

{{/* The agents' --supernode addresses: one stable DNS name per supernode pod, pinned to its peer ID. Empty until supernode.peerIDs is set. */}}
{{- define "starling.supernodeAddrs" -}}
{{- $ids := .Values.supernode.peerIDs | default list -}}
{{- if and $ids (ne (len $ids) (int .Values.supernode.replicas)) -}}
{{- fail (printf "supernode.peerIDs has %d entries but supernode.replicas is %d: give one peer ID per supernode pod, in pod order" (len $ids) (int .Values.supernode.replicas)) -}}
{{- end -}}
{{- $name := include "starling.supernodeName" . -}}
{{- range $i, $id := $ids }}
- /dns4/{{ $name }}-{{ $i }}.{{ $name }}.{{ $.Release.Namespace }}.svc.cluster.local/tcp/{{ $.Values.supernode.p2pPort }}/p2p/{{ $id }}
{{- end -}}
{{- end -}}
