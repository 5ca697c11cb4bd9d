{{/*
Names, labels and small shared fragments. Everything component-specific takes a dict
{"root": $, "component": "triton"|"gateway"|...} so that one helper serves every object.
*/}}

{{- define "fashion-tagger.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, truncated to leave room for the longest suffix ("-triton-metrics").
*/}}
{{- define "fashion-tagger.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fashion-tagger.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of a component's objects: <fullname>-<component>. */}}
{{- define "fashion-tagger.componentName" -}}
{{- printf "%s-%s" (include "fashion-tagger.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of a component: stable, never change them on upgrade. */}}
{{- define "fashion-tagger.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fashion-tagger.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Full label set of a component's objects. */}}
{{- define "fashion-tagger.labels" -}}
helm.sh/chart: {{ include "fashion-tagger.chart" .root }}
{{ include "fashion-tagger.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: {{ include "fashion-tagger.name" .root }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* ServiceAccount name of a component ("triton" or "gateway"). */}}
{{- define "fashion-tagger.serviceAccountName" -}}
{{- $sa := (index .root.Values .component).serviceAccount }}
{{- if $sa.create }}
{{- default (include "fashion-tagger.componentName" .) $sa.name }}
{{- else }}
{{- default "default" $sa.name }}
{{- end }}
{{- end }}

{{/* "<repository>:<tag>" with the tag defaulting to the chart's appVersion. */}}
{{- define "fashion-tagger.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion (toString .image.tag)) }}
{{- end }}

{{- define "fashion-tagger.tritonImage" -}}
{{- include "fashion-tagger.image" (dict "root" . "image" .Values.triton.image) }}
{{- end }}

{{- define "fashion-tagger.gatewayImage" -}}
{{- include "fashion-tagger.image" (dict "root" . "image" .Values.gateway.image) }}
{{- end }}

{{- define "fashion-tagger.modelImage" -}}
{{- include "fashion-tagger.image" (dict "root" . "image" .Values.modelRepository.image) }}
{{- end }}

{{/*
Triton's serving profile, "cpu" or "gpu": triton.profile, where "auto" (the default) is gpu when
triton.gpu.enabled, else cpu. The CPU profile serves configs/openvino.pbtxt (--model-config-name=openvino).
*/}}
{{- define "fashion-tagger.tritonProfile" -}}
{{- $profile := default "auto" .Values.triton.profile }}
{{- if eq $profile "auto" }}
{{- ternary "gpu" "cpu" .Values.triton.gpu.enabled }}
{{- else }}
{{- $profile }}
{{- end }}
{{- end }}

{{/* The ONNX model the TensorRT plan is built from (default: the first model Triton loads). */}}
{{- define "fashion-tagger.trtSourceModel" -}}
{{- default (first .Values.triton.models) .Values.tensorrt.sourceModel }}
{{- end }}

{{/* The model the gateway sends requests to: the TensorRT model when it is built, else the first model. */}}
{{- define "fashion-tagger.gatewayModelName" -}}
{{- if .Values.gateway.modelName }}
{{- .Values.gateway.modelName }}
{{- else if .Values.tensorrt.enabled }}
{{- .Values.tensorrt.modelName }}
{{- else }}
{{- first .Values.triton.models }}
{{- end }}
{{- end }}

{{/* FASHION_MODEL_VERSION: gateway.modelVersion, else the version the TensorRT plan is built for when the gateway calls it. */}}
{{- define "fashion-tagger.gatewayModelVersion" -}}
{{- if not (eq (toString .Values.gateway.modelVersion) "") }}
{{- .Values.gateway.modelVersion }}
{{- else if and .Values.tensorrt.enabled (eq (include "fashion-tagger.gatewayModelName" .) .Values.tensorrt.modelName) }}
{{- .Values.tensorrt.modelVersion }}
{{- end }}
{{- end }}

{{/* Where the gateway's model's metadata.json comes from in the model repository. */}}
{{- define "fashion-tagger.metadataSourceModel" -}}
{{- $gw := include "fashion-tagger.gatewayModelName" . }}
{{- if and .Values.tensorrt.enabled (eq $gw .Values.tensorrt.modelName) }}
{{- include "fashion-tagger.trtSourceModel" . }}
{{- else }}
{{- $gw }}
{{- end }}
{{- end }}

{{/* host:port of Triton for the gateway, on the protocol it uses. */}}
{{- define "fashion-tagger.tritonUrl" -}}
{{- $port := ternary .Values.triton.ports.grpc .Values.triton.ports.http (eq .Values.gateway.tritonProtocol "grpc") }}
{{- printf "%s:%v" (include "fashion-tagger.componentName" (dict "root" . "component" "triton")) $port }}
{{- end }}

{{/* Name of the Secret holding the gateway's API keys ("" when none). */}}
{{- define "fashion-tagger.apiKeysSecretName" -}}
{{- if .Values.gateway.apiKeys.existingSecret }}
{{- .Values.gateway.apiKeys.existingSecret }}
{{- else if .Values.gateway.apiKeys.keys }}
{{- printf "%s-api-keys" (include "fashion-tagger.componentName" (dict "root" . "component" "gateway")) }}
{{- end }}
{{- end }}

{{/*
Pod-level security context: non-root with a fixed uid, RuntimeDefault seccomp.
Takes the component's podSecurityContext values (runAsUser, runAsGroup, fsGroup).
*/}}
{{- define "fashion-tagger.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .runAsUser }}
runAsGroup: {{ .runAsGroup }}
{{- with .fsGroup }}
fsGroup: {{ . }}
fsGroupChangePolicy: OnRootMismatch
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level security context shared by every container, init containers included. */}}
{{- define "fashion-tagger.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Topology spread constraints of a component, or nothing when disabled. */}}
{{- define "fashion-tagger.topologySpread" -}}
{{- $ts := (index .root.Values .component).topologySpread }}
{{- if $ts.enabled }}
topologySpreadConstraints:
{{- range $ts.topologyKeys }}
  - maxSkew: {{ $ts.maxSkew }}
    topologyKey: {{ . }}
    whenUnsatisfiable: {{ $ts.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "fashion-tagger.selectorLabels" $ | nindent 8 }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Checks that the schema cannot express (relations between values). Rendered by the Triton
Deployment, so any `helm install/template/lint` stops with one of these messages.
*/}}
{{- define "fashion-tagger.validateValues" -}}
{{- $repo := .Values.modelRepository }}
{{- if and (eq $repo.source "pvc") (not $repo.pvc.claimName) }}
{{- fail "modelRepository.source=pvc needs modelRepository.pvc.claimName (an existing PersistentVolumeClaim holding the model repository)" }}
{{- end }}
{{- if and (eq $repo.source "objectStore") (not $repo.objectStore.url) }}
{{- fail "modelRepository.source=objectStore needs modelRepository.objectStore.url (s3://, gs:// or as://)" }}
{{- end }}
{{- if and (eq $repo.source "image") (not $repo.image.repository) }}
{{- fail "modelRepository.source=image needs modelRepository.image.repository (an image built from docker/triton.Dockerfile)" }}
{{- end }}
{{- if and (eq $repo.source "objectStore") $repo.objectStore.gcsCredentialsKey (not $repo.objectStore.existingSecret) }}
{{- fail "modelRepository.objectStore.gcsCredentialsKey needs modelRepository.objectStore.existingSecret (the Secret holding that key)" }}
{{- end }}
{{- $profile := include "fashion-tagger.tritonProfile" . }}
{{- $declared := default "auto" .Values.triton.profile }}
{{- if and .Values.tensorrt.enabled (eq $declared "cpu") }}
{{- fail "tensorrt.enabled=true cannot run in the CPU profile (triton.profile=cpu): TensorRT is GPU-only (a plan is built on, and tied to, the serving GPU), while the CPU profile serves configs/openvino.pbtxt with OpenVINO. Set tensorrt.enabled=false, or triton.profile=gpu with triton.gpu.enabled=true" }}
{{- end }}
{{- if and .Values.tensorrt.enabled (eq $profile "cpu") }}
{{- fail "tensorrt.enabled=true needs triton.gpu.enabled=true: TensorRT is GPU-only (a plan is built on, and tied to, the serving GPU), and without a GPU triton.profile=auto selects the CPU profile (configs/openvino.pbtxt, OpenVINO). Set triton.gpu.enabled=true, or tensorrt.enabled=false for CPU serving" }}
{{- end }}
{{- if and (eq $declared "gpu") (not .Values.triton.gpu.enabled) }}
{{- fail "triton.profile=gpu needs triton.gpu.enabled=true: the GPU profile serves config.pbtxt (KIND_GPU) on the GPUs that triton.gpu requests. For CPU serving set triton.profile=cpu (or auto)" }}
{{- end }}
{{- if and (eq $declared "cpu") .Values.triton.gpu.enabled }}
{{- fail "triton.profile=cpu runs no GPU (configs/openvino.pbtxt, KIND_CPU): set triton.gpu.enabled=false, or triton.profile=gpu (or auto) for GPU serving" }}
{{- end }}
{{- if eq $profile "cpu" }}
{{- range .Values.triton.extraArgs }}
{{- if hasPrefix "--model-config-name" . }}
{{- fail (printf "triton.extraArgs has %q, but the CPU profile sets --model-config-name=openvino itself: remove it (or use the GPU profile)" .) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.tensorrt.enabled (eq $repo.source "objectStore") }}
{{- fail "tensorrt.enabled=true needs a file-system model repository (modelRepository.source=pvc or image): trtexec cannot read the ONNX model from an object store" }}
{{- end }}
{{- if and .Values.tensorrt.enabled (gt (int .Values.tensorrt.optBatchSize) (int .Values.tensorrt.maxBatchSize)) }}
{{- fail "tensorrt.optBatchSize must not exceed tensorrt.maxBatchSize" }}
{{- end }}
{{- if and .Values.tensorrt.enabled (has .Values.tensorrt.modelName .Values.triton.models) }}
{{- fail "tensorrt.modelName must differ from the models in triton.models: the chart adds it to the load list itself" }}
{{- end }}
{{- if and (eq .Values.gateway.metadata.source "repository") (eq $repo.source "objectStore") }}
{{- fail "the gateway cannot read metadata.json from an object store: set gateway.metadata.source=configMap and gateway.metadata.configMap.name" }}
{{- end }}
{{- if and (eq .Values.gateway.metadata.source "configMap") (not .Values.gateway.metadata.configMap.name) }}
{{- fail "gateway.metadata.source=configMap needs gateway.metadata.configMap.name (a ConfigMap holding the model's metadata.json)" }}
{{- end }}
{{- $startup := .Values.triton.probes.startup }}
{{- if lt (mul (int $startup.periodSeconds) (int $startup.failureThreshold)) 300 }}
{{- fail "triton.probes.startup: periodSeconds * failureThreshold must be at least 300 s, so that Triton has room to load its models" }}
{{- end }}
{{- if and .Values.loadtest.enabled (not .Values.loadtest.locustfile) (not .Values.loadtest.existingConfigMap) }}
{{- fail "loadtest.enabled=true needs the locustfile: helm install ... --set-file loadtest.locustfile=loadtest/locustfile.py (or loadtest.existingConfigMap)" }}
{{- end }}
{{- if and .Values.triton.autoscaling.enabled (lt (int .Values.triton.autoscaling.maxReplicas) (int .Values.triton.autoscaling.minReplicas)) }}
{{- fail "triton.autoscaling.maxReplicas must be >= minReplicas" }}
{{- end }}
{{- if and .Values.gateway.autoscaling.enabled (lt (int .Values.gateway.autoscaling.maxReplicas) (int .Values.gateway.autoscaling.minReplicas)) }}
{{- fail "gateway.autoscaling.maxReplicas must be >= minReplicas" }}
{{- end }}
{{- $g := .Values.gateway }}
{{- /* gunicorn's graceful_timeout (gateway/gunicorn_conf.py): the longest the drain can take after SIGTERM */}}
{{- $drain := maxf 25 (addf (float64 $g.timeoutS) (float64 $g.queueWaitS) 10) | ceil | int }}
{{- if le (int $g.terminationGracePeriodSeconds) (add (int $g.preStopSleepSeconds) $drain) }}
{{- fail (printf "gateway.terminationGracePeriodSeconds (%d) must exceed gateway.preStopSleepSeconds (%d) plus the drain (%d s: gunicorn's graceful_timeout, max(25, timeoutS + queueWaitS + 10)); otherwise Kubernetes kills the pod while it still answers the requests it accepted" (int $g.terminationGracePeriodSeconds) (int $g.preStopSleepSeconds) $drain) }}
{{- end }}
{{- if le (int .Values.triton.terminationGracePeriodSeconds) (int .Values.triton.exitTimeoutSeconds) }}
{{- fail (printf "triton.terminationGracePeriodSeconds (%d) must exceed triton.exitTimeoutSeconds (%d): Kubernetes would kill Triton before it finished its in-flight requests" (int .Values.triton.terminationGracePeriodSeconds) (int .Values.triton.exitTimeoutSeconds)) }}
{{- end }}
{{- if ge (int .Values.gateway.maxInflight) (int .Values.gateway.threads) }}
{{- fail (printf "gateway.maxInflight (%d) must be below gateway.threads (%d): the spare threads answer 429s and probes at once; a limit at or above threads never triggers and excess requests queue inside gunicorn" (int .Values.gateway.maxInflight) (int .Values.gateway.threads)) }}
{{- end }}
{{- end }}
