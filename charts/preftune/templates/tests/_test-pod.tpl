{{/*
The `helm test` Pods, one per enabled component, all on the preftune image (no other image is pulled)
under the restricted Pod Security Standard. The HTTP check takes "[auth:]URL=STATUS" arguments
(STATUS "any": any HTTP answer proves the endpoint is reachable); "auth:" sends TEST_USERNAME /
TEST_PASSWORD as basic auth. Each URL gets 60 s to answer.
*/}}
{{- define "preftune.test.httpScript" -}}
import base64, os, sys, time, urllib.error, urllib.request
def get(url, auth):
    req = urllib.request.Request(url)
    if auth:
        pair = f"{os.environ['TEST_USERNAME']}:{os.environ['TEST_PASSWORD']}".encode()
        req.add_header("Authorization", "Basic " + base64.b64encode(pair).decode())
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
for arg in sys.argv[1:]:
    auth = arg.startswith("auth:")
    url, _, want = arg.removeprefix("auth:").rpartition("=")
    for attempt in range(30):
        try:
            got = get(url, auth)
        except OSError as err:
            print(url, "not yet:", err)
            time.sleep(2)
            continue
        print(url, "HTTP", got, "(basic auth)" if auth else "")
        if want != "any" and got != int(want):
            sys.exit(f"{url}: HTTP {got}, expected {want}")
        break
    else:
        sys.exit(f"{url} did not answer")
{{- end }}

{{/* include "preftune.test.pod" (dict "ctx" $ "component" "feedback" "command" (list ...) "env" (list) "volumes" (list) "mounts" (list)) */}}
{{- define "preftune.test.pod" -}}
{{- $ := .ctx }}
apiVersion: v1
kind: Pod
metadata:
  name: {{ printf "%s-test-%s" (include "preftune.fullname" $) .component }}
  labels:
    {{- include "preftune.labels" (dict "ctx" $ "component" "test") | nindent 4 }}
  annotations:
    helm.sh/hook: test
    helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
    {{- with omit $.Values.commonAnnotations "helm.sh/hook" "helm.sh/hook-delete-policy" }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  enableServiceLinks: false
  {{- with $.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  securityContext:
    {{- include "preftune.podSecurityContext" $ | nindent 4 }}
  containers:
    - name: {{ .component }}
      image: {{ include "preftune.image" $ | quote }}
      imagePullPolicy: {{ $.Values.image.pullPolicy }}
      command:
        {{- toYaml .command | nindent 8 }}
      env:
        - name: PREFTUNE_HOME
          value: /var/lib/preftune
        {{- with .env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      resources:
        {{- toYaml $.Values.tests.resources | nindent 8 }}
      securityContext:
        {{- include "preftune.containerSecurityContext" $ | nindent 8 }}
      volumeMounts:
        {{- include "preftune.scratchMounts" $ | nindent 8 }}
        {{- with .mounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    {{- include "preftune.scratchVolumes" $ | nindent 4 }}
    {{- include "preftune.homeEmptyDir" $ | nindent 4 }}
    {{- with .volumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
