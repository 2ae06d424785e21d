{{/* Names and labels ------------------------------------------------------------------------------------- */}}
{{- define "sidecar.name" -}}{{ .Chart.Name | trunc 63 | trimSuffix "-" }}{{- end }}
{{- define "sidecar.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}{{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{ end }}
{{- end }}
{{- define "sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}
{{- define "sidecar.labels" -}}
{{ include "sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}
{{- define "sidecar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}{{ .Values.serviceAccount.name | default (include "sidecar.fullname" .) }}
{{- else }}{{ .Values.serviceAccount.name | default "default" }}{{ end }}
{{- end }}
{{- define "sidecar.image" -}}
"{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
{{- end }}

{{/* The pod securityContext: podSecurityContext replaces the default whole, so OpenShift can drop the UIDs. */}}
{{- define "sidecar.podSecurityContext" -}}
{{- if .Values.podSecurityContext }}{{ toYaml .Values.podSecurityContext }}
{{- else -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}
{{- end }}

{{/* Kubernetes version ---------------------------------------------------------------------------------
Native sidecars (an init container with restartPolicy Always) and the preStop `sleep` action are on by
default from 1.29. Below it the sidecar is a plain container and its preStop sleep is an exec of /bin/sleep
(the image is Debian-based: coreutils is there). */}}
{{- define "sidecar.kube129" -}}
{{- if semverCompare ">=1.29-0" .Capabilities.KubeVersion.Version }}true{{ end }}
{{- end }}

{{/* "true" when the sidecar runs as a native sidecar: mode vllm, and nativeSidecar true, or "auto" on 1.29+. */}}
{{- define "sidecar.native" -}}
{{- $ns := .Values.nativeSidecar | toString }}
{{- if eq .Values.mode "vllm" }}
{{- if and (eq $ns "true") (not (include "sidecar.kube129" .)) }}
{{- fail (printf "nativeSidecar: true needs Kubernetes >= 1.29 (an init container with restartPolicy: Always); this cluster is %s. Use nativeSidecar: auto (or false) to run the sidecar as a plain container." .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- if or (eq $ns "true") (and (eq $ns "auto") (include "sidecar.kube129" .)) }}true{{ end }}
{{- end }}
{{- end }}

{{/* Secrets ------------------------------------------------------------------------------------------- */}}
{{- define "sidecar.secretName" -}}
{{- if .Values.secrets.create }}{{ include "sidecar.fullname" . }}
{{- else }}{{ required "secrets.existingSecret is required when secrets.create is false (a Secret holding at least the key `pepper`; see the chart README)" .Values.secrets.existingSecret }}{{ end }}
{{- end }}

{{/* Which optional secret-backed features are on ("true" or ""). With secrets.create a non-empty value turns
its feature on; with an existing Secret, admin.enabled / upstreamAuth.enabled / staticKeys.enabled say which
keys that Secret holds. The sidecar refuses to start when a *_file it is given cannot be read, so the chart
names a file (and projects its key) only when the feature is on: the other keys are truly optional. */}}
{{- define "sidecar.adminOn" -}}
{{- if .Values.secrets.create }}
{{- if and .Values.admin.enabled (not .Values.secrets.adminToken) }}{{ fail "admin.enabled needs secrets.adminToken (or secrets.create=false and an existingSecret holding admin-token)" }}{{ end }}
{{- if .Values.secrets.adminToken }}true{{ end }}
{{- else if .Values.admin.enabled }}true{{ end }}
{{- end }}
{{- define "sidecar.upstreamAuthOn" -}}
{{- if .Values.secrets.create }}
{{- if and .Values.upstreamAuth.enabled (not .Values.secrets.upstreamApiKey) }}{{ fail "upstreamAuth.enabled needs secrets.upstreamApiKey (or secrets.create=false and an existingSecret holding upstream-api-key)" }}{{ end }}
{{- if .Values.secrets.upstreamApiKey }}true{{ end }}
{{- else if .Values.upstreamAuth.enabled }}true{{ end }}
{{- end }}
{{- define "sidecar.oidcOn" -}}
{{- if .Values.secrets.create }}
{{- if and .Values.oidc.enabled (not .Values.secrets.oidcClientSecret) }}{{ fail "oidc.enabled needs secrets.oidcClientSecret (or secrets.create=false and an existingSecret holding oidc-client-secret)" }}{{ end }}
{{- if .Values.secrets.oidcClientSecret }}true{{ end }}
{{- else if .Values.oidc.enabled }}true{{ end }}
{{- end }}
{{- define "sidecar.exportAuthOn" -}}
{{- if .Values.secrets.create }}
{{- if and .Values.export.auth (not .Values.secrets.exportToken) }}{{ fail "export.auth needs secrets.exportToken (or secrets.create=false and an existingSecret holding export-token)" }}{{ end }}
{{- if .Values.secrets.exportToken }}true{{ end }}
{{- else if .Values.export.auth }}true{{ end }}
{{- end }}
{{- define "sidecar.staticKeysOn" -}}
{{- if .Values.secrets.create }}
{{- if and .Values.staticKeys.enabled (not .Values.secrets.staticKeys) }}{{ fail "staticKeys.enabled needs secrets.staticKeys (or secrets.create=false and an existingSecret holding static-keys.jsonl)" }}{{ end }}
{{- if .Values.secrets.staticKeys }}true{{ end }}
{{- else if .Values.staticKeys.enabled }}true{{ end }}
{{- end }}

{{/* The pepper, never generated: a random one would change at every `helm template` / GitOps render and
invalidate every stored key hash. Explicit value, else the one already in the cluster's Secret, else fail. */}}
{{- define "sidecar.pepper" -}}
{{- $pepper := .Values.secrets.pepper }}
{{- if not $pepper }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "sidecar.fullname" .) }}
{{- if and $existing $existing.data (hasKey $existing.data "pepper") }}{{ $pepper = index $existing.data "pepper" | b64dec }}{{ end }}
{{- end }}
{{- if not $pepper }}
{{- fail "secrets.pepper is empty and no existing Secret holds one. The pepper keys every API key hash and must never change by accident, so the chart does not generate it. Make one and keep it (e.g. in your secret manager): --set secrets.pepper=$(head -c 32 /dev/urandom | base64 | tr -d '=+/'), or set secrets.create=false and secrets.existingSecret to a Secret with the key `pepper`." }}
{{- end }}
{{- if lt (len $pepper) 16 }}{{ fail "secrets.pepper must be at least 16 characters (the sidecar refuses a shorter one)" }}{{ end }}
{{- $pepper }}
{{- end }}

{{/* Store and replicas ------------------------------------------------------------------------------------ */}}
{{- define "sidecar.sqlitePvc" -}}
{{- if and (eq .Values.store.type "sqlite") .Values.store.persistence.enabled }}true{{ end }}
{{- end }}
{{- define "sidecar.dataClaim" -}}
{{- .Values.store.persistence.existingClaim | default (printf "%s-data" (include "sidecar.fullname" .)) }}
{{- end }}
{{- define "sidecar.cacheClaim" -}}
{{- .Values.vllm.cache.persistence.existingClaim | default (printf "%s-model-cache" (include "sidecar.fullname" .)) }}
{{- end }}

{{/* Every cross-field rule, in one place; included by the Deployment so any render checks them. Schema rules
cannot explain themselves, so rules that need a "why" live here. */}}
{{- define "sidecar.validate" -}}
{{- if eq .Values.store.type "sqlite" }}
{{- $why := "SQLite is one file on one pod's volume: keys, leases and usage would exist on one replica only. Set store.type=postgres (and secrets.postgresDsn or an existingSecret with postgres-dsn) to run more than one replica" }}
{{- if gt (int .Values.replicaCount) 1 }}{{ fail (printf "replicaCount %d needs store.type=postgres: %s." (int .Values.replicaCount) $why) }}{{ end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.maxReplicas) 1) }}{{ fail (printf "autoscaling.maxReplicas %d needs store.type=postgres: %s." (int .Values.autoscaling.maxReplicas) $why) }}{{ end }}
{{- end }}
{{- if and (eq .Values.store.type "postgres") .Values.secrets.create (not .Values.secrets.postgresDsn) }}
{{- fail "store.type=postgres needs a DSN: set secrets.postgresDsn (postgresql://user:pass@host:5432/db), or secrets.create=false with an existingSecret holding the key postgres-dsn." }}
{{- end }}
{{- if and (eq .Values.mode "upstream") (not .Values.upstream.url) }}
{{- fail "upstream.url is required in mode upstream (the OpenAI base URL, e.g. http://vllm.models.svc:8000/v1)" }}
{{- end }}
{{- if and (eq .Values.mode "vllm") (not (int .Values.sidecar.opsPort)) }}
{{- fail "mode vllm needs sidecar.opsPort (not 0): vLLM's preStop watches the sidecar's drain on it, and without it /drain would be on the client port, which the drain closes after drainGrace, so vLLM would stop while streams still run" }}
{{- end }}
{{- if and (gt (int .Values.sidecar.workers) 1) (not (int .Values.sidecar.opsPort)) }}
{{- fail "sidecar.workers > 1 needs sidecar.opsPort (not 0): worker 0's operations port shows and drains every worker; on the client port a scrape or a drain would reach whichever worker the kernel picks" }}
{{- end }}
{{- if eq (int .Values.sidecar.opsPort) (int .Values.sidecar.port) }}
{{- fail "sidecar.opsPort must differ from sidecar.port (0 turns the operations port off)" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- end }}

{{- define "sidecar.pdbOn" -}}
{{- $pdb := .Values.pdb.enabled | toString }}
{{- if eq $pdb "true" }}true
{{- else if and (eq $pdb "auto") (or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1)) }}true{{ end }}
{{- end }}

{{/* Drain timing --------------------------------------------------------------------------------------------
vLLM's preStop (files/wait-drain.py) waits at most drainGrace + drainTimeout + 10 s for the sidecar to drain. */}}
{{- define "sidecar.drainBound" -}}
{{- add .Values.sidecar.drainGrace .Values.sidecar.drainTimeout 10 }}
{{- end }}
{{/* The port /drain, /metrics and /admin are served on: the ops port, or the main port when it is off. */}}
{{/* What rolls the pods when it changes: the secrets read at start. Not static-keys.jsonl: the sidecar reloads
     that file when the mounted Secret changes, and a key added must not restart vLLM. */}}
{{- define "sidecar.secretChecksum" -}}
{{- $v := .Values.secrets }}
{{- list (include "sidecar.pepper" .) $v.adminToken $v.upstreamApiKey $v.postgresDsn $v.oidcClientSecret $v.exportToken | toJson | sha256sum }}
{{- end }}
{{- define "sidecar.opsPortNumber" -}}
{{- if .Values.sidecar.opsPort }}{{ .Values.sidecar.opsPort }}{{ else }}{{ .Values.sidecar.port }}{{ end }}
{{- end }}
{{- define "sidecar.opsPortName" -}}
{{- if .Values.sidecar.opsPort }}ops{{ else }}http{{ end }}
{{- end }}
{{/* Grace period: in mode vllm the preStop bound plus 30 s for vLLM's own shutdown; the sidecar's sleep + drain
+ 15 s otherwise (and at least that in mode vllm, where a plain-container sidecar sleeps first). */}}
{{- define "sidecar.gracePeriod" -}}
{{- if .Values.terminationGracePeriodSeconds }}{{ .Values.terminationGracePeriodSeconds }}
{{- else }}
{{- $sidecar := add .Values.sidecar.preStopSleep .Values.sidecar.drainGrace .Values.sidecar.drainTimeout 15 }}
{{- if eq .Values.mode "vllm" }}{{ max $sidecar (add (include "sidecar.drainBound" . | int) 30) }}
{{- else }}{{ $sidecar }}{{ end }}
{{- end }}
{{- end }}

{{/* The sidecar container ---------------------------------------------------------------------------------- */}}
{{- define "sidecar.container" -}}
name: sidecar
image: {{ include "sidecar.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
{{- if include "sidecar.native" . }}
restartPolicy: Always
{{- end }}
args: ["serve", "--config", "/etc/sidecar/sidecar.toml"]
env:
  {{- if eq .Values.store.type "postgres" }}
  - name: SIDECAR_STORE_URL
    valueFrom:
      secretKeyRef:
        name: {{ include "sidecar.secretName" . }}
        key: postgres-dsn
  {{- else }}
  - name: SIDECAR_STORE_URL
    value: sqlite:////data/sidecar.db
  {{- end }}
  {{- with .Values.sidecar.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
ports:
  - name: http
    containerPort: {{ .Values.sidecar.port }}
    protocol: TCP
  {{- if .Values.sidecar.opsPort }}
  - name: ops
    containerPort: {{ .Values.sidecar.opsPort }}
    protocol: TCP
  {{- end }}
# Startup and liveness ask the sidecar only (/healthz never calls vLLM): probing vLLM here would keep a
# native sidecar from ever starting while the model loads, and vLLM from starting after it.
startupProbe:
  httpGet: {path: /healthz, port: http}
  periodSeconds: 2
  failureThreshold: 30
livenessProbe:
  httpGet: {path: /healthz, port: http}
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: http}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
{{- /* A native sidecar gets SIGTERM only after vLLM has exited, and vLLM's preStop has already drained it:
no hook. A plain container gets SIGTERM with everyone else: it sleeps first so endpoints drop the pod. */}}
{{- if and (not (include "sidecar.native" .)) (gt (int .Values.sidecar.preStopSleep) 0) }}
lifecycle:
  preStop:
    {{- if include "sidecar.kube129" . }}
    sleep:
      seconds: {{ .Values.sidecar.preStopSleep }}
    {{- else }}
    exec:
      command: ["sleep", "{{ .Values.sidecar.preStopSleep }}"]
    {{- end }}
{{- end }}
resources: {{- toYaml .Values.sidecar.resources | nindent 2 }}
securityContext: {{- toYaml .Values.sidecar.securityContext | nindent 2 }}
volumeMounts:
  - {name: config, mountPath: /etc/sidecar/sidecar.toml, subPath: sidecar.toml, readOnly: true}
  - {name: secrets, mountPath: /etc/sidecar/secrets, readOnly: true}
  - {name: data, mountPath: /data}
  - {name: tmp, mountPath: /tmp}
  {{- with .Values.sidecar.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* The vLLM container --------------------------------------------------------------------------------------- */}}
{{- define "sidecar.vllmContainer" -}}
name: vllm
image: "{{ .Values.vllm.image.repository }}:{{ .Values.vllm.image.tag }}"
imagePullPolicy: {{ .Values.vllm.image.pullPolicy }}
command: ["vllm", "serve"]
args:
  - {{ .Values.vllm.model | quote }}
  - "--host=127.0.0.1"    # reachable only through the sidecar
  - "--port={{ .Values.vllm.port }}"
  {{- range .Values.vllm.extraArgs }}
  - {{ . | quote }}
  {{- end }}
env:
  - {name: HOME, value: /cache}
  - {name: HF_HOME, value: /cache/huggingface}
  {{- with .Values.vllm.hfToken.secretName }}
  - name: HF_TOKEN
    valueFrom:
      secretKeyRef:
        name: {{ . }}
        key: {{ $.Values.vllm.hfToken.key }}
  {{- end }}
  {{- with .Values.vllm.env }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
startupProbe:
  httpGet: {path: /health, port: {{ .Values.vllm.port }}, host: 127.0.0.1}
  periodSeconds: {{ .Values.vllm.startupProbe.periodSeconds }}
  failureThreshold: {{ .Values.vllm.startupProbe.failureThreshold }}
livenessProbe:
  httpGet: {path: /health, port: {{ .Values.vllm.port }}, host: 127.0.0.1}
  periodSeconds: 15
  timeoutSeconds: 5
  failureThreshold: 4
# Drain order: ask the sidecar to drain (POST /drain on its loopback ops port) and wait until its in-flight
# streams are done, so vLLM gets SIGTERM only after the requests it serves have ended. A native sidecar
# would otherwise get SIGTERM only after vLLM exits, cutting every stream. Bounded by argv[2] seconds.
lifecycle:
  preStop:
    exec:
      command:
        - python3
        - -c
        - {{ .Files.Get "files/wait-drain.py" | quote }}
        - {{ include "sidecar.opsPortNumber" . | quote }}
        - {{ include "sidecar.drainBound" . | quote }}
resources: {{- toYaml .Values.vllm.resources | nindent 2 }}
securityContext: {{- toYaml .Values.vllm.securityContext | nindent 2 }}
volumeMounts:
  - {name: cache, mountPath: /cache}
  - {name: shm, mountPath: /dev/shm}
  {{- with .Values.vllm.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* sidecar.toml as a dict: the chart's settings, then sidecar.config merged over them (so a user section
such as [auth] extends the chart's instead of repeating the TOML table, which TOML forbids). */}}
{{- define "sidecar.configToml" -}}
{{- $server := dict "host" "0.0.0.0" "port" (int .Values.sidecar.port) "ops_port" (int .Values.sidecar.opsPort) "data_dir" "/data" "log_level" .Values.sidecar.logLevel "drain_grace" .Values.sidecar.drainGrace "drain_timeout" .Values.sidecar.drainTimeout "workers" (int .Values.sidecar.workers) }}
{{- if include "sidecar.adminOn" . }}{{ $_ := set $server "admin_token_file" "/etc/sidecar/secrets/admin-token" }}{{ end }}
{{- $upstream := dict }}
{{- if eq .Values.mode "vllm" }}{{ $_ := set $upstream "url" (printf "http://127.0.0.1:%d/v1" (int .Values.vllm.port)) }}
{{- else }}{{ $_ := set $upstream "url" .Values.upstream.url }}{{ end }}
{{- if include "sidecar.upstreamAuthOn" . }}{{ $_ := set $upstream "api_key_file" "/etc/sidecar/secrets/upstream-api-key" }}{{ end }}
{{- $auth := dict "pepper_file" "/etc/sidecar/secrets/pepper" }}
{{- if include "sidecar.staticKeysOn" . }}{{ $_ := set $auth "static_keys_file" "/etc/sidecar/secrets/static-keys.jsonl" }}{{ end }}
{{- if .Values.sidecar.pepperRotate }}{{ $_ := set $auth "pepper_rotate" true }}{{ end }}
{{- $config := dict "server" $server "upstream" $upstream "auth" $auth "audit" (dict "capture" .Values.sidecar.auditCapture) }}
{{- if include "sidecar.oidcOn" . }}{{ $_ := set $config "console" (dict "oidc_client_secret_file" "/etc/sidecar/secrets/oidc-client-secret") }}{{ end }}
{{- if .Values.export.url }}
{{- $export := dict "url" .Values.export.url }}
{{- if include "sidecar.exportAuthOn" . }}{{ $_ := set $export "token_file" "/etc/sidecar/secrets/export-token" }}{{ end }}
{{- $_ := set $config "export" $export }}
{{- end }}
{{- $config = mergeOverwrite $config (deepCopy .Values.sidecar.config) }}
{{- $sections := list "server" "upstream" "auth" "audit" }}
{{- range $section := keys $config | sortAlpha }}{{ if not (has $section $sections) }}{{ $sections = append $sections $section }}{{ end }}{{ end }}
{{- range $section := $sections }}
{{- $options := index $config $section }}
[{{ $section }}]
{{- range $option, $value := $options }}
{{ $option }} = {{ toJson $value }}
{{- end }}
{{ end }}
{{- end }}
