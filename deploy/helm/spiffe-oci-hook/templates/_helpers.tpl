{{/* Object names: the release name when it holds the chart's name. */}}
{{- define "spiffe-oci-hook.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object. The selector uses only app.kubernetes.io/name, as the kustomize base does. */}}
{{- define "spiffe-oci-hook.labels" -}}
app.kubernetes.io/part-of: spiffe-oci-hook
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "spiffe-oci-hook.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{/* The runtime flavour, checked. */}}
{{- define "spiffe-oci-hook.runtime" -}}
{{- $r := .Values.runtime -}}
{{- if not (has $r (list "crio" "openshift" "containerd-nri")) -}}
{{- fail (printf "runtime %q must be crio, openshift or containerd-nri" $r) -}}
{{- end -}}
{{- $r -}}
{{- end -}}

{{/* The agent API, checked. */}}
{{- define "spiffe-oci-hook.agentAPI" -}}
{{- $api := .Values.agent.api | default "delegated" -}}
{{- if not (has $api (list "delegated" "broker")) -}}
{{- fail (printf "agent.api %q must be delegated or broker" $api) -}}
{{- end -}}
{{- range $k, $v := dict "adminSocket" .Values.agent.adminSocket "brokerSocket" .Values.agent.brokerSocket "workloadAPISocket" .Values.agent.workloadAPISocket -}}
{{- if not (isAbs $v) -}}
{{- fail (printf "agent.%s %q must be an absolute path" $k $v) -}}
{{- end -}}
{{- end -}}
{{- $api -}}
{{- end -}}

{{/* The node configuration file's text. */}}
{{- define "spiffe-oci-hook.nodeConfig" -}}
{{- $api := include "spiffe-oci-hook.agentAPI" . -}}
{{- $sock := .Values.agent.adminSocket -}}
{{- if .Values.nodeConfig -}}
{{- $cfg := fromYaml .Values.nodeConfig -}}
{{- if hasKey $cfg "Error" -}}
{{- fail (printf "nodeConfig is not YAML: %s" $cfg.Error) -}}
{{- end -}}
{{- if ne ($cfg.agent_admin_socket | default "/run/spire/agent/admin/admin.sock") $sock -}}
{{- fail (printf "nodeConfig agent_admin_socket %q differs from agent.adminSocket %q" ($cfg.agent_admin_socket | default "/run/spire/agent/admin/admin.sock") $sock) -}}
{{- end -}}
{{- if ne ($cfg.agent_api | default "delegated") $api -}}
{{- fail (printf "nodeConfig agent_api %q differs from agent.api %q" ($cfg.agent_api | default "delegated") $api) -}}
{{- end -}}
{{- if eq $api "broker" -}}
{{- if ne ($cfg.broker_socket | default "/run/spire/agent/broker/broker.sock") .Values.agent.brokerSocket -}}
{{- fail (printf "nodeConfig broker_socket %q differs from agent.brokerSocket %q" ($cfg.broker_socket | default "/run/spire/agent/broker/broker.sock") .Values.agent.brokerSocket) -}}
{{- end -}}
{{- if ne ($cfg.workload_api_socket | default "/run/spire/agent/public/api.sock") .Values.agent.workloadAPISocket -}}
{{- fail (printf "nodeConfig workload_api_socket %q differs from agent.workloadAPISocket %q" ($cfg.workload_api_socket | default "/run/spire/agent/public/api.sock") .Values.agent.workloadAPISocket) -}}
{{- end -}}
{{- end -}}
{{- if ne ($cfg.state_dir | default "/run/spiffe-oci-hook") "/run/spiffe-oci-hook" -}}
{{- fail "nodeConfig state_dir must be /run/spiffe-oci-hook, the DaemonSet's hostPath" -}}
{{- end -}}
{{- .Values.nodeConfig -}}
{{- else -}}
{{- $cfg := regexReplaceAll "(?m)^agent_admin_socket: .*$" (.Files.Get "files/config.yaml") (printf "agent_admin_socket: %s" $sock) -}}
{{- $cfg = regexReplaceAll "(?m)^agent_api: .*$" $cfg (printf "agent_api: %s" $api) -}}
{{- $cfg = regexReplaceAll "(?m)^broker_socket: .*$" $cfg (printf "broker_socket: %s" .Values.agent.brokerSocket) -}}
{{- $cfg = regexReplaceAll "(?m)^workload_api_socket: .*$" $cfg (printf "workload_api_socket: %s" .Values.agent.workloadAPISocket) -}}
{{- $cfg = regexReplaceAll "(?m)^broker_spiffe_id: .*$" $cfg (printf "broker_spiffe_id: %s" (.Values.agent.brokerSPIFFEID | default "" | quote)) -}}
{{- /* The DaemonSet requires its refresher: after helm uninstall the hook
  left on a node refuses containers rather than hand out identities
  nothing rotates (docs/install-lifecycle.md). */ -}}
{{- regexReplaceAll "(?m)^require_refresher: .*$" $cfg "require_refresher: true" -}}
{{- end -}}
{{- end -}}

{{/* The agent's socket directories the refresher mounts: the admin
  socket's (api delegated), or the broker socket's and the Workload API
  socket's (api broker), each once. */}}
{{- define "spiffe-oci-hook.agentDirs" -}}
{{- $api := include "spiffe-oci-hook.agentAPI" . -}}
{{- if eq $api "broker" -}}
{{- $dirs := list (dir .Values.agent.brokerSocket) -}}
{{- $dirs = append $dirs (dir .Values.agent.workloadAPISocket) | uniq -}}
{{- toJson $dirs -}}
{{- else -}}
{{- toJson (list (dir .Values.agent.adminSocket)) -}}
{{- end -}}
{{- end -}}

{{/* The registration's SPIFFE IDs. */}}
{{- define "spiffe-oci-hook.hookID" -}}
{{- .Values.registration.hookID | default (printf "spiffe://%s/spiffe-oci-hook" .Values.registration.trustDomain) -}}
{{- end -}}
{{- define "spiffe-oci-hook.refresherID" -}}
{{- .Values.registration.refresherID | default (printf "spiffe://%s/spiffe-oci-refresher" .Values.registration.trustDomain) -}}
{{- end -}}
{{- define "spiffe-oci-hook.nodeAliasID" -}}
{{- .Values.registration.nodeAliasID | default (printf "spiffe://%s/spiffe-oci-hook/node/%s" .Values.registration.trustDomain .Values.registration.clusterName) -}}
{{- end -}}
