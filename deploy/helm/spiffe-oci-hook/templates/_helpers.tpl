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

{{/* The node configuration file's text. */}}
{{- define "spiffe-oci-hook.nodeConfig" -}}
{{- $sock := .Values.agent.adminSocket -}}
{{- if not (isAbs $sock) -}}
{{- fail (printf "agent.adminSocket %q must be an absolute path" $sock) -}}
{{- end -}}
{{- if .Values.nodeConfig -}}
{{- $cfg := fromYaml .Values.nodeConfig -}}
{{- if hasKey $cfg "Error" -}}
{{- fail (printf "nodeConfig is not YAML: %s" $cfg.Error) -}}
{{- end -}}
{{- if ne ($cfg.agent_admin_socket | default "/run/spire/agent/admin/admin.sock") $sock -}}
{{- fail (printf "nodeConfig agent_admin_socket %q differs from agent.adminSocket %q" ($cfg.agent_admin_socket | default "/run/spire/agent/admin/admin.sock") $sock) -}}
{{- end -}}
{{- if ne ($cfg.state_dir | default "/run/spiffe-oci-hook") "/run/spiffe-oci-hook" -}}
{{- fail "nodeConfig state_dir must be /run/spiffe-oci-hook, the DaemonSet's hostPath" -}}
{{- end -}}
{{- .Values.nodeConfig -}}
{{- else -}}
{{- $cfg := regexReplaceAll "(?m)^agent_admin_socket: .*$" (.Files.Get "files/config.yaml") (printf "agent_admin_socket: %s" $sock) -}}
{{- /* The DaemonSet requires its refresher: after helm uninstall the hook
  left on a node refuses containers rather than hand out identities
  nothing rotates (docs/install-lifecycle.md). */ -}}
{{- regexReplaceAll "(?m)^require_refresher: .*$" $cfg "require_refresher: true" -}}
{{- end -}}
{{- end -}}
