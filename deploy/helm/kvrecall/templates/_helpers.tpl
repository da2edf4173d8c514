{{/*
Names. Kubernetes names are at most 63 characters; the base is cut to 40 so that every suffix
below ("-tier-headless", "-tier-<ordinal>" for pod host names) still fits.
*/}}
{{- define "kvrecall.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvrecall.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The StatefulSet of tier nodes, also the client Service's name. */}}
{{- define "kvrecall.tier.name" -}}
{{- printf "%s-tier" (include "kvrecall.fullname" .) -}}
{{- end -}}

{{/* The headless Service that governs the StatefulSet: pod DNS names and the clients' discovery. */}}
{{- define "kvrecall.tier.headless" -}}
{{- printf "%s-tier-headless" (include "kvrecall.fullname" .) -}}
{{- end -}}

{{- define "kvrecall.worker.name" -}}
{{- printf "%s-worker" (include "kvrecall.fullname" .) -}}
{{- end -}}

{{- define "kvrecall.config.name" -}}
{{- printf "%s-config" (include "kvrecall.fullname" .) -}}
{{- end -}}

{{- define "kvrecall.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kvrecall.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* "<headless>.<namespace>.svc.<clusterDomain>": the zone the tier's pod DNS names live in. */}}
{{- define "kvrecall.tier.domain" -}}
{{- printf "%s.%s.svc.%s" (include "kvrecall.tier.headless" .) .Release.Namespace .Values.clusterDomain -}}
{{- end -}}

{{/*
--peers: every tier pod's DNS name and gRPC port, "<sts>-<i>.<headless>.<ns>.svc.<domain>:<port>"
for i in [0, tier.replicas), exactly as the server's placement check and a static client list
name the nodes.
*/}}
{{- define "kvrecall.tier.peers" -}}
{{- $sts := include "kvrecall.tier.name" . -}}
{{- $domain := include "kvrecall.tier.domain" . -}}
{{- $port := int .Values.tier.grpcPort -}}
{{- $peers := list -}}
{{- range $i := until (int .Values.tier.replicas) -}}
{{- $peers = append $peers (printf "%s-%d.%s:%d" $sts $i $domain $port) -}}
{{- end -}}
{{- join "," $peers -}}
{{- end -}}

{{/* The worker's --tier value. */}}
{{- define "kvrecall.worker.tier" -}}
{{- if eq .Values.worker.tierDiscovery "dns" -}}
{{- printf "dns:///%s:%d" (include "kvrecall.tier.domain" .) (int .Values.tier.grpcPort) -}}
{{- else if eq .Values.worker.tierDiscovery "static" -}}
{{- include "kvrecall.tier.peers" . -}}
{{- else -}}
{{- fail (printf "worker.tierDiscovery must be dns or static, not %q" .Values.worker.tierDiscovery) -}}
{{- end -}}
{{- end -}}

{{- define "kvrecall.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "kvrecall.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "tier"). */}}
{{- define "kvrecall.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvrecall.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "kvrecall.image" -}}
{{- $img := .image -}}
{{- printf "%s:%s" $img.repository (default .ctx.Chart.AppVersion $img.tag) -}}
{{- end -}}

{{/* Checks that hold for the whole chart; included by every template that depends on them. */}}
{{- define "kvrecall.validate" -}}
{{- $_ := required "image.server.repository is required (the kvrecall-server image, deploy/docker/server.Dockerfile)" .Values.image.server.repository -}}
{{- if lt (int .Values.tier.replicas) 1 -}}
{{- fail "tier.replicas must be at least 1" -}}
{{- end -}}
{{- if and .Values.tier.persistence.durable (not .Values.tier.persistence.enabled) -}}
{{- fail "tier.persistence.durable needs tier.persistence.enabled (a claim per node for --data-dir)" -}}
{{- end -}}
{{- if and .Values.tier.serviceMonitor.enabled (not .Values.tier.metrics.enabled) -}}
{{- fail "tier.serviceMonitor.enabled needs tier.metrics.enabled" -}}
{{- end -}}
{{- if and (eq .Values.tier.probes.liveness.mode "http") (not .Values.tier.metrics.enabled) -}}
{{- fail "tier.probes.liveness.mode=http needs tier.metrics.enabled (it probes /healthz); use grpc or tcp" -}}
{{- end -}}
{{- if not (has .Values.tier.probes.liveness.mode (list "http" "grpc" "tcp")) -}}
{{- fail (printf "tier.probes.liveness.mode must be http, grpc or tcp, not %q" .Values.tier.probes.liveness.mode) -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tier.metrics.enabled) -}}
{{- fail "tls.enabled needs tier.metrics.enabled: kubelet's gRPC probe is plaintext, so with TLS the probes use /healthz" -}}
{{- end -}}
{{- if .Values.tls.enabled -}}
{{- $_ := required "tls.secretName is required when tls.enabled (a kubernetes.io/tls Secret)" .Values.tls.secretName -}}
{{- end -}}
{{- if .Values.auth.enabled -}}
{{- $_ := required "auth.secretName is required when auth.enabled (a Secret with the tenants' tokens file)" .Values.auth.secretName -}}
{{- if .Values.worker.enabled -}}
{{- $_ := required "auth.workerSecretName is required when auth.enabled and worker.enabled (a Secret with the worker tenant's token)" .Values.auth.workerSecretName -}}
{{- end -}}
{{- end -}}
{{- if not (has .Values.tier.transport (list "ucx" "none")) -}}
{{- fail (printf "tier.transport must be ucx or none, not %q" .Values.tier.transport) -}}
{{- end -}}
{{- if .Values.worker.enabled -}}
{{- if not (has .Values.worker.transport (list "ucx" "grpc")) -}}
{{- fail (printf "worker.transport must be ucx or grpc, not %q" .Values.worker.transport) -}}
{{- end -}}
{{- if and (eq .Values.tier.transport "none") (eq .Values.worker.transport "ucx") -}}
{{- fail "tier.transport=none streams no rows: set worker.transport=grpc (FetchKV)" -}}
{{- end -}}
{{- $_ := required "image.worker.repository is required when worker.enabled (the kvrecall-worker image, deploy/docker/worker.Dockerfile)" .Values.image.worker.repository -}}
{{- $_ := required "worker.model.path is required when worker.enabled (--model: the model directory inside the worker pod)" .Values.worker.model.path -}}
{{- if gt (int .Values.worker.replication) (int .Values.tier.replicas) -}}
{{- fail (printf "worker.replication (%d) cannot exceed tier.replicas (%d)" (int .Values.worker.replication) (int .Values.tier.replicas)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Probe handlers. gRPC health (grpc.health.v1, service "") unless TLS is on (kubelet's gRPC probe is plaintext). */}}
{{- define "kvrecall.tier.readyHandler" -}}
{{- if .Values.tls.enabled -}}
httpGet:
  path: /healthz
  port: metrics
{{- else -}}
grpc:
  port: {{ int .Values.tier.grpcPort }}
  service: ""
{{- end -}}
{{- end -}}

{{- define "kvrecall.tier.liveHandler" -}}
{{- if or (eq .Values.tier.probes.liveness.mode "http") .Values.tls.enabled -}}
httpGet:
  path: /healthz
  port: metrics
{{- else if eq .Values.tier.probes.liveness.mode "grpc" -}}
grpc:
  port: {{ int .Values.tier.grpcPort }}
  service: ""
{{- else -}}
tcpSocket:
  port: grpc
{{- end -}}
{{- end -}}

{{/* UCX_NET_DEVICES and the RDMA capability, shared by tier and worker containers. */}}
{{- define "kvrecall.ucxEnv" -}}
{{- if .Values.ucx.netDevices -}}
- name: UCX_NET_DEVICES
  value: {{ .Values.ucx.netDevices | quote }}
{{- end -}}
{{- end -}}

{{/* A container securityContext with IPC_LOCK added when RDMA is on: call with (dict "ctx" $ "sc" .Values.tier.securityContext). */}}
{{- define "kvrecall.securityContext" -}}
{{- $sc := deepCopy (default (dict) .sc) -}}
{{- if .ctx.Values.rdma.enabled -}}
{{- $caps := deepCopy (default (dict) (get $sc "capabilities")) -}}
{{- $add := default (list) (get $caps "add") -}}
{{- $_ := set $caps "add" (append $add "IPC_LOCK" | uniq) -}}
{{- $_ := set $sc "capabilities" $caps -}}
{{- end -}}
{{- toYaml $sc -}}
{{- end -}}
