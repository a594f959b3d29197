#!/usr/bin/env bash
# Writes deploy/monitoring/prometheusrule.yaml, the Prometheus Operator's
# PrometheusRule, from deploy/monitoring/node-agent.rules.yaml, the plain
# rules file: the same groups under `spec:`. Edit the rules file, then run
# this; tests/ops/monitoring/ fails while the two differ.
#
#   scripts/monitoring-rules.sh           rewrite prometheusrule.yaml
#   scripts/monitoring-rules.sh --stdout  print it instead
set -euo pipefail
cd "$(dirname "$0")/../deploy/monitoring"

render() {
  cat <<'HEADER'
# Made from node-agent.rules.yaml by scripts/monitoring-rules.sh: edit that
# file and run the script, not this one. The alerts, what each means and what
# to do: docs/monitoring.md.
#
# The Prometheus Operator loads the PrometheusRules its Prometheus's
# ruleSelector matches: add the label it asks for (kube-prometheus-stack:
# `release: <its release name>`), here or with a kustomize patch.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: node-agent
  labels:
    app.kubernetes.io/name: node-agent
spec:
HEADER
  # From `groups:` on (the file's own header comment stays behind), indented
  # under `spec:`; blank lines stay blank.
  sed -n '/^groups:/,$p' node-agent.rules.yaml | sed 's/^\(.\)/  \1/'
}

case "${1:-}" in
  --stdout) render ;;
  "") render >prometheusrule.yaml ;;
  *) echo "usage: $0 [--stdout]" >&2; exit 2 ;;
esac
