{{/* Common labels of every object. */}}
{{- define "k8scsi.labels" -}}
app.kubernetes.io/part-of: k8scsi
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{/* A sidecar image reference from .Values.sidecars.<name>. */}}
{{- define "k8scsi.sidecarImage" -}}
{{ .image }}:{{ .tag }}
{{- end -}}

{{/* The projected ServiceAccount token, mounted only into the API-using sidecars. */}}
{{- define "k8scsi.apiAccessVolume" -}}
- name: kube-api-access
  projected:
    defaultMode: 0444
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: 3607
      - configMap:
          name: kube-root-ca.crt
          items:
            - key: ca.crt
              path: ca.crt
      - downwardAPI:
          items:
            - path: namespace
              fieldRef:
                apiVersion: v1
                fieldPath: metadata.namespace
{{- end -}}

{{- define "k8scsi.apiAccessMount" -}}
- name: kube-api-access
  mountPath: /var/run/secrets/kubernetes.io/serviceaccount
  readOnly: true
{{- end -}}

{{- define "k8scsi.validate" -}}
{{- if not (has .Values.mode (list "distributed" "single-node" "shared")) -}}
{{- fail (printf "mode must be distributed, single-node or shared, not %q" .Values.mode) -}}
{{- end -}}
{{- end -}}
