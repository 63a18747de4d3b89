{{/*
Names. Kubernetes names are at most 63 characters; suffixes are added to the full name, so it is
cut to 50.
*/}}
{{- define "preftune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "preftune.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "preftune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: include "preftune.selectorLabels" (dict "ctx" $ "component" "feedback") */}}
{{- define "preftune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "preftune.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The standard labels of every object of one component. */}}
{{- define "preftune.labels" -}}
helm.sh/chart: {{ include "preftune.chart" .ctx }}
{{ include "preftune.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: preftune
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The ServiceAccount of one component (feedback, mlflow, schedule, observe, training):
include "preftune.serviceAccountName" (dict "ctx" $ "component" "feedback").
serviceAccount.<component>.name, else <fullname>-<component> when the chart creates them, else
the namespace's `default`. Each component has its own, so an annotation meant for one (a cloud
role for training) never reaches the pods of another.
*/}}
{{- define "preftune.serviceAccountName" -}}
{{- $sa := get .ctx.Values.serviceAccount .component }}
{{- if $sa.name }}
{{- $sa.name }}
{{- else if .ctx.Values.serviceAccount.create }}
{{- printf "%s-%s" (include "preftune.fullname" .ctx) .component }}
{{- else }}
{{- "default" }}
{{- end }}
{{- end }}

{{/* Components whose ServiceAccount the chart creates (the enabled ones; training with the schedule). */}}
{{- define "preftune.serviceAccountComponents" -}}
{{- $v := .Values }}
{{- $on := dict "feedback" $v.feedback.enabled "mlflow" $v.mlflow.enabled "schedule" $v.schedule.enabled "observe" $v.observe.enabled "training" (or $v.schedule.enabled $v.serviceAccount.training.createWithoutSchedule) }}
{{- range $c := list "feedback" "mlflow" "schedule" "observe" "training" }}
{{- if get $on $c }}{{ $c }} {{ end }}
{{- end }}
{{- end }}

{{/*
Annotations of an object's metadata: commonAnnotations merged with the object's own (the own win):
include "preftune.annotations" (dict "ctx" $ "own" $someDict). Prints nothing when both are empty.
*/}}
{{- define "preftune.annotations" -}}
{{- $all := merge (deepCopy (default (dict) .own)) (deepCopy (default (dict) .ctx.Values.commonAnnotations)) }}
{{- with $all }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The extension points of a component's pod: include "preftune.pod.initContainers" $componentValues etc.
initContainers and sidecars are full containers (the restricted Pod Security Standard applies to them
too: the chart's checks reject one without a securityContext); extraVolumes / extraVolumeMounts mount a
CA bundle or a Secret; extraEnvFrom takes ConfigMap or Secret sources.
*/}}
{{- define "preftune.pod.initContainers" -}}
{{- with .initContainers }}
initContainers:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "preftune.pod.sidecars" -}}
{{- with .sidecars }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{- define "preftune.pod.extraVolumes" -}}
{{- with .extraVolumes }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{- define "preftune.pod.extraVolumeMounts" -}}
{{- with .extraVolumeMounts }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/* envFrom of a component's container: whole Secrets by name (extraEnvFromSecrets) and extraEnvFrom sources. */}}
{{- define "preftune.pod.envFrom" -}}
{{- if or .extraEnvFromSecrets .extraEnvFrom }}
envFrom:
  {{- range .extraEnvFromSecrets }}
  - secretRef:
      name: {{ . }}
  {{- end }}
  {{- with .extraEnvFrom }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
The image reference: registry/repository:tag, or @digest. global.imageRegistry (a mirror for
every chart of an umbrella release) wins over image.registry. The tag defaults to the chart's
appVersion (which follows the package version) and is never `latest`.
*/}}
{{- define "preftune.image" -}}
{{- $img := .Values.image }}
{{- $repo := $img.repository }}
{{- $registry := default $img.registry (.Values.global).imageRegistry }}
{{- if $registry }}{{ $repo = printf "%s/%s" (trimSuffix "/" $registry) $img.repository }}{{ end }}
{{- $tag := default .Chart.AppVersion $img.tag | toString }}
{{- if eq (lower $tag) "latest" }}
{{- fail "image.tag must not be `latest`: pin a version (default: the chart's appVersion)" }}
{{- end }}
{{- if $img.digest }}
{{- printf "%s@%s" $repo $img.digest }}
{{- else }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}
{{- end }}

{{/* Pod-level security context: the restricted Pod Security Standard. */}}
{{- define "preftune.podSecurityContext" -}}
runAsNonRoot: true
{{- with .Values.podSecurityContext }}
{{- if not (kindIs "invalid" .runAsUser) }}
runAsUser: {{ .runAsUser }}
{{- end }}
{{- if not (kindIs "invalid" .runAsGroup) }}
runAsGroup: {{ .runAsGroup }}
{{- end }}
{{- if not (kindIs "invalid" .fsGroup) }}
fsGroup: {{ .fsGroup }}
fsGroupChangePolicy: OnRootMismatch
{{- end }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level security context: the restricted Pod Security Standard, read-only root. */}}
{{- define "preftune.containerSecurityContext" -}}
runAsNonRoot: true
{{- if not (kindIs "invalid" .Values.podSecurityContext.runAsUser) }}
runAsUser: {{ .Values.podSecurityContext.runAsUser }}
{{- end }}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The writable scratch volumes every pod mounts (the root filesystem is read-only). */}}
{{- define "preftune.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.scratch.tmpSizeLimit }}
{{- end }}

{{- define "preftune.homeEmptyDir" -}}
- name: home
  emptyDir:
    sizeLimit: {{ .Values.scratch.homeSizeLimit }}
{{- end }}

{{- define "preftune.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /var/lib/preftune
{{- end }}

{{/* Env from whole Secrets: include "preftune.envFromSecrets" list-of-names */}}
{{- define "preftune.envFromSecrets" -}}
{{- range . }}
- secretRef:
    name: {{ . }}
{{- end }}
{{- end }}

{{/* Services and URLs */}}
{{- define "preftune.feedback.fullname" -}}
{{- printf "%s-feedback" (include "preftune.fullname" .) }}
{{- end }}

{{- define "preftune.mlflow.fullname" -}}
{{- printf "%s-mlflow" (include "preftune.fullname" .) }}
{{- end }}

{{- define "preftune.schedule.fullname" -}}
{{- printf "%s-schedule" (include "preftune.fullname" .) }}
{{- end }}

{{- define "preftune.mlflow.url" -}}
{{- printf "http://%s.%s.svc:%v" (include "preftune.mlflow.fullname" .) .Release.Namespace .Values.mlflow.port }}
{{- end }}

{{/* The tracking URI pipeline runs use: explicit, else the chart's MLflow, else empty. */}}
{{- define "preftune.trackingUri" -}}
{{- if .Values.tracking.uri }}
{{- .Values.tracking.uri }}
{{- else if .Values.mlflow.enabled }}
{{- include "preftune.mlflow.url" . }}
{{- end }}
{{- end }}

{{/* The run config of the schedule, with tracking.uri and kubernetes.service_account (the training
ServiceAccount) filled in when they are empty. */}}
{{- define "preftune.runConfig" -}}
{{- $cfg := deepCopy (default (dict) .Values.schedule.runConfig) }}
{{- if or .Values.serviceAccount.create .Values.serviceAccount.training.name }}
{{- $kube := default (dict) (get $cfg "kubernetes") }}
{{- if not (get $kube "service_account") }}
{{- /* the pipeline's pods (and its TrainJob's nodes) run as the training ServiceAccount */}}
{{- $_ := set $kube "service_account" (include "preftune.serviceAccountName" (dict "ctx" . "component" "training")) }}
{{- $_ := set $cfg "kubernetes" $kube }}
{{- end }}
{{- end }}
{{- $uri := include "preftune.trackingUri" . }}
{{- if $uri }}
{{- $tracking := default (dict) (get $cfg "tracking") }}
{{- if not (get $tracking "uri") }}
{{- $_ := set $tracking "uri" $uri }}
{{- $_ := set $cfg "tracking" $tracking }}
{{- end }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* Whether the feedback service keeps SQLite on a volume (no external database). */}}
{{- define "preftune.feedback.sqlite" -}}
{{- if not .Values.feedback.database.existingSecret }}true{{ end }}
{{- end }}

{{/* Whether the MLflow server needs its volume (SQLite backend, local artifacts, or basic auth's SQLite user store). */}}
{{- define "preftune.mlflow.needsVolume" -}}
{{- if or (not .Values.mlflow.backendStore.existingSecret) (not .Values.mlflow.artifacts.destination) .Values.mlflow.auth.enabled }}true{{ end }}
{{- end }}

{{/* Checks of value combinations the schema cannot express, failing with what to change. */}}
{{- define "preftune.validate" -}}
{{- if and .Values.feedback.enabled (include "preftune.feedback.sqlite" .) }}
{{- if or (gt (int .Values.feedback.replicaCount) 1) .Values.feedback.autoscaling.enabled }}
{{- fail "feedback: more than one replica (feedback.replicaCount > 1 or feedback.autoscaling.enabled) needs an external database: set feedback.database.existingSecret to a Secret with the PostgreSQL URL" }}
{{- end }}
{{- end }}
{{- if and .Values.feedback.autoscaling.enabled (gt (int .Values.feedback.autoscaling.minReplicas) (int .Values.feedback.autoscaling.maxReplicas)) }}
{{- fail "feedback.autoscaling.minReplicas must not exceed feedback.autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.mlflow.enabled .Values.mlflow.artifacts.s3.existingSecret (not (hasPrefix "s3://" .Values.mlflow.artifacts.destination)) }}
{{- fail "mlflow.artifacts.s3.existingSecret is set but mlflow.artifacts.destination is not an s3:// URI" }}
{{- end }}
{{- if and .Values.schedule.enabled (not .Values.serviceAccount.create) .Values.schedule.rbac.create (not .Values.serviceAccount.schedule.name) }}
{{- fail "schedule.rbac.create binds the schedule Job's ServiceAccount: set serviceAccount.schedule.name or serviceAccount.create=true" }}
{{- end }}
{{- if and .Values.mlflow.enabled .Values.mlflow.auth.enabled (not .Values.mlflow.auth.existingSecret) }}
{{- fail "mlflow.auth.enabled needs mlflow.auth.existingSecret: a Secret with the admin username and password (keys mlflow.auth.usernameKey / passwordKey)" }}
{{- end }}
{{- if and .Values.mlflow.enabled .Values.mlflow.ingress.enabled (not .Values.mlflow.auth.enabled) (not .Values.mlflow.ingress.allowWithoutAuth) }}
{{- fail "mlflow.ingress.enabled exposes MLflow, which has no authentication of its own: set mlflow.auth.enabled (basic auth, credentials from a Secret) or put an auth proxy in front and set mlflow.ingress.allowWithoutAuth" }}
{{- end }}
{{- end }}

{{/* NetworkPolicy pieces: the policy types and, when egress is restricted, DNS plus the extra rules. */}}
{{/* include "preftune.networkPolicy.egress" (dict "ctx" $ "component" "feedback"): DNS + that component's rules only */}}
{{- define "preftune.networkPolicy.egress" -}}
{{- if .ctx.Values.networkPolicy.egress.restrict -}}
egress:
  # DNS, wherever the cluster runs it.
  - ports:
      - port: 53
        protocol: UDP
      - port: 53
        protocol: TCP
  {{- if and .ctx.Values.mlflow.enabled (has .component (list "schedule" "observe" "training")) }}
  # the chart's MLflow (tracking, registry)
  - to:
      - podSelector:
          matchLabels:
            {{- include "preftune.selectorLabels" (dict "ctx" .ctx "component" "mlflow") | nindent 12 }}
    ports:
      - port: {{ .ctx.Values.mlflow.port }}
        protocol: TCP
  {{- end }}
  {{- if and .ctx.Values.feedback.enabled (eq .component "training") }}
  # the feedback service (the collect step exports its judgements)
  - to:
      - podSelector:
          matchLabels:
            {{- include "preftune.selectorLabels" (dict "ctx" .ctx "component" "feedback") | nindent 12 }}
    ports:
      - port: 8080
        protocol: TCP
  {{- end }}
  {{- with get .ctx.Values.networkPolicy.egress.extra .component }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
{{- end }}
{{- define "preftune.networkPolicy.types" -}}
policyTypes:
  - Ingress
  {{- if .Values.networkPolicy.egress.restrict }}
  - Egress
  {{- end }}
{{- end }}
