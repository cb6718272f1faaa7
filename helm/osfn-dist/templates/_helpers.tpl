{{/*
Names. Kubernetes names are DNS labels (63 characters); the RayJob gets a shorter one because
KubeRay appends a random suffix to build the RayCluster's name and then "-head-svc" etc.
*/}}
{{- define "osfn-dist.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "osfn-dist.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "osfn-dist.rayJobName" -}}
{{- include "osfn-dist.fullname" . | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "osfn-dist.curvatureName" -}}
{{- printf "%s-curvature" (include "osfn-dist.fullname" . | trunc 52 | trimSuffix "-") }}
{{- end }}

{{- define "osfn-dist.trainConfigName" -}}
{{- printf "%s-train-config" (include "osfn-dist.fullname" . | trunc 50 | trimSuffix "-") }}
{{- end }}

{{- define "osfn-dist.curvatureSecretName" -}}
{{- default (printf "%s-token" (include "osfn-dist.curvatureName" .)) .Values.curvatureService.auth.existingSecret }}
{{- end }}

{{- define "osfn-dist.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Labels: selector labels are a stable subset (a Deployment's selector is immutable). */}}
{{- define "osfn-dist.selectorLabels" -}}
app.kubernetes.io/name: {{ include "osfn-dist.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "osfn-dist.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "osfn-dist.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: osfn-dist
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The training metrics port. The package has no default (TrainConfig.metrics_port is None); the
chart turns the exporters on through the train config. Each Ray Train worker serves on
metrics_port + its local rank (osfn_dist/train/ray_worker.py), so a pod with k workers has k
ports, named osfn-train-<rank> for the PodMonitor and the scrape configs.
*/}}
{{- define "osfn-dist.trainMetricsPort" -}}9401{{- end }}

{{/* Ray Train workers per worker pod: one per GPU, or metrics.ranksPerPod (CPU pods: default 1). */}}
{{- define "osfn-dist.ranksPerPod" -}}
{{- $n := int .Values.metrics.ranksPerPod }}
{{- if eq $n 0 }}{{ $n = max 1 (int .Values.workers.gpus) }}{{ end }}
{{- $n }}
{{- end }}

{{/* Where the train config ConfigMap is mounted in the head pod. */}}
{{- define "osfn-dist.trainConfigPath" -}}/etc/osfn/train.yaml{{- end }}

{{/*
Ray Train workers: train.numWorkers, or one per GPU of the worker group (one per pod on CPU).
Asking for more GPU workers than the group has GPUs would leave the job pending forever, so that
is refused at render time with the numbers in the message.
*/}}
{{- define "osfn-dist.numWorkers" -}}
{{- $w := .Values.workers }}
{{- $capacity := int $w.replicas }}
{{- if gt (int $w.gpus) 0 }}{{ $capacity = mul (int $w.replicas) (int $w.gpus) }}{{ end }}
{{- $n := int .Values.train.numWorkers }}
{{- if eq $n 0 }}{{ $n = $capacity }}{{ end }}
{{- if and (gt (int $w.gpus) 0) (gt $n $capacity) }}
{{- fail (printf "train.numWorkers=%d asks for more GPU workers than the worker group has GPUs (workers.replicas=%d x workers.gpus=%d = %d); raise workers.replicas or workers.gpus, or lower train.numWorkers" $n (int $w.replicas) (int $w.gpus) $capacity) }}
{{- end }}
{{- $n }}
{{- end }}

{{/* The train config file (TrainConfig keys, snake_case), mounted in the head pod. */}}
{{- define "osfn-dist.trainConfig" -}}
{{- $t := .Values.train }}
{{- $cfg := dict "workload" $t.workload "seed" (int $t.seed) "checkpoint_every" (int $t.checkpointEvery) "backend" "ray" "num_workers" (int (include "osfn-dist.numWorkers" .)) "use_gpu" (gt (int .Values.workers.gpus) 0) "run_dir" $t.runDir "optimizer" $t.optimizer }}
{{- if not (kindIs "invalid" $t.steps) }}{{ $_ := set $cfg "steps" (int $t.steps) }}{{ end }}
{{- if not (kindIs "invalid" $t.batchSize) }}{{ $_ := set $cfg "batch_size" (int $t.batchSize) }}{{ end }}
{{- if .Values.metrics.enabled }}{{ $_ := set $cfg "metrics_port" (int (include "osfn-dist.trainMetricsPort" .)) }}{{ end }}
{{- range $key, $_ := $t.extraConfig }}
{{- if has $key (list "workload" "steps" "batch_size" "seed" "checkpoint_every" "backend" "num_workers" "address" "use_gpu" "run_dir" "metrics_port" "optimizer") }}
{{- fail (printf "train.extraConfig.%s is set by the chart from other values (train.*, workers.gpus, metrics.enabled); set those instead" $key) }}
{{- end }}
{{- end }}
{{- toYaml (merge $cfg (deepCopy $t.extraConfig)) }}
{{- end }}

{{/*
The job's entrypoint: a shell command line run by `ray job submit` on the head. Arguments are
single-quoted; the schema forbids single quotes inside extraArgs, so quoting cannot break.
*/}}
{{- define "osfn-dist.entrypoint" -}}
{{- $args := list "osfn-dist" "train" "--config" (include "osfn-dist.trainConfigPath" .) "--address" "auto" "--no-progress" }}
{{- range .Values.train.extraArgs }}{{ $args = append $args (squote .) }}{{ end }}
{{- join " " $args }}
{{- end }}

{{/* Environment shared by every Ray container. */}}
{{- define "osfn-dist.rayEnv" -}}
{{- if eq .Values.ray.auth.mode "disabled" }}
- name: RAY_AUTH_MODE
  value: disabled
{{- end }}
- name: RAY_USAGE_STATS_ENABLED
  value: {{ ternary "1" "0" .Values.ray.usageStats | quote }}
{{- if not (kindIs "invalid" .Values.ray.trainHealthCheckIntervalS) }}
- name: RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
  value: {{ .Values.ray.trainHealthCheckIntervalS | toString | quote }}
{{- end }}
{{- with .Values.ray.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Metrics container ports of a Ray pod; argument: (list $ <ranks>). Port names are at most 15
characters. "metrics" (8080) is Ray's own exporter, declared under the name KubeRay uses so that
it does not add a second one.
*/}}
{{- define "osfn-dist.rayMetricsPorts" -}}
{{- $ := index . 0 }}
{{- if $.Values.metrics.enabled }}
{{- range $rank := until (int (index . 1)) }}
- name: osfn-train-{{ $rank }}
  containerPort: {{ add (int (include "osfn-dist.trainMetricsPort" $)) $rank }}
  protocol: TCP
{{- end }}
- name: metrics
  containerPort: 8080
  protocol: TCP
{{- end }}
{{- end }}

{{/* Volumes shared by head and workers: in-memory /dev/shm and the optional run storage. */}}
{{- define "osfn-dist.rayVolumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.ray.sharedMemorySize }}
{{- with .Values.train.storage.existingClaim }}
- name: runs
  persistentVolumeClaim:
    claimName: {{ . }}
{{- end }}
{{- end }}

{{- define "osfn-dist.rayVolumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- if .Values.train.storage.existingClaim }}
- name: runs
  mountPath: {{ .Values.train.runDir }}
{{- end }}
{{- end }}

{{/* Configuration mistakes the schema cannot express (they span several keys). */}}
{{- define "osfn-dist.validate" -}}
{{- if and (or .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled) (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled / metrics.podMonitor.enabled need metrics.enabled=true (no metrics ports are exposed otherwise)" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.curvatureService.enabled) }}
{{- fail "metrics.serviceMonitor.enabled scrapes the curvature service: set curvatureService.enabled=true, or use metrics.podMonitor for the training pods" }}
{{- end }}
{{- if and .Values.curvatureService.tls.enabled (not .Values.curvatureService.tls.secretName) }}
{{- fail "curvatureService.tls.enabled=true needs curvatureService.tls.secretName (a kubernetes.io/tls Secret with tls.crt and tls.key)" }}
{{- end }}
{{- if and .Values.curvatureService.auth.token .Values.curvatureService.auth.existingSecret }}
{{- fail "set only one of curvatureService.auth.token and curvatureService.auth.existingSecret" }}
{{- end }}
{{- if eq .Values.curvatureService.port .Values.curvatureService.metricsPort }}
{{- fail "curvatureService.port and curvatureService.metricsPort must differ" }}
{{- end }}
{{- end }}

{{/* The curvature service's probe: the gRPC health check (no TLS), else a TCP connect.
     Kubernetes' grpc probe needs a port number, not a port name. Argument: .Values.curvatureService */}}
{{- define "osfn-dist.curvatureProbe" -}}
{{- if .tls.enabled -}}
tcpSocket:
  port: grpc
{{- else -}}
grpc:
  port: {{ .port | int }}
{{- end }}
{{- end }}
