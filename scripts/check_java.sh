#!/usr/bin/env bash
# TorchServe's frontend needs Java 17. Root gets it installed with apt; anyone else gets one line saying how.
set -euo pipefail
java_major() {
  local java="${JAVA_HOME:+$JAVA_HOME/bin/}java"
  command -v "$java" >/dev/null 2>&1 || { echo 0; return; }
  "$java" -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1
}
major=$(java_major)
if [ "${major:-0}" -ge 17 ]; then exit 0; fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Java 17 not found: installing openjdk-17-jre-headless with apt-get" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null
  major=$(java_major)
  [ "${major:-0}" -ge 17 ] && exit 0
fi
echo "tspack needs Java 17 for TorchServe: run 'sudo apt-get install -y openjdk-17-jre-headless' (or set JAVA_HOME to a JDK 17)" >&2
exit 1
