#!/usr/bin/env bash
# Tools some tests run: promtool (`promtool check rules` / `test rules` on alerts.yaml) and nginx (`nginx -t` on the
# README's rate-limit snippet). Root gets them installed with apt; anyone else gets one line saying how, and those
# tests skip naming the same command. Never fails `make test`, except when an install as root fails.
set -euo pipefail
declare -A PACKAGE=([promtool]=prometheus [nginx]=nginx)
declare -A SERVICE=([promtool]=prometheus [nginx]=nginx)
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }
missing=()
for tool in promtool nginx; do have "$tool" || missing+=("$tool"); done
[ ${#missing[@]} -eq 0 ] && exit 0
packages=(); for tool in "${missing[@]}"; do packages+=("${PACKAGE[$tool]}"); done
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "${missing[*]} not found: installing ${packages[*]} with apt-get (for the alert-rule and nginx tests)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
  # Only the binaries are wanted: on a host run by systemd the packages start their services (nginx on :80,
  # prometheus on :9090). They were not installed before this script, so stopping them takes nothing from anyone.
  if [ -d /run/systemd/system ]; then
    for tool in "${missing[@]}"; do systemctl disable --now "${SERVICE[$tool]}" >/dev/null 2>&1 || true; done
  fi
  for tool in "${missing[@]}"; do have "$tool" || { echo "installing ${PACKAGE[$tool]} did not provide $tool" >&2; exit 1; }; done
  exit 0
fi
echo "tests of alerts.yaml and the nginx snippet will skip: run 'sudo apt-get install -y --no-install-recommends ${packages[*]}'" >&2
exit 0
