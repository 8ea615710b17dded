#!/usr/bin/env bash
# Offline terraform checks (CI): formatting everywhere; init, validate and
# test of the provider-free region logic. The root module and the Vultr
# module need the provider from the registry, which CI cannot reach, so
# they get `fmt -check` only.
set -euo pipefail
cd "$(dirname "$0")"
export TF_IN_AUTOMATION=1 TF_CLI_CONFIG_FILE=/dev/null CHECKPOINT_DISABLE=1
terraform fmt -check -recursive -diff .
for dir in modules/region_plan tests/plan; do
  (cd "$dir" && terraform init -backend=false -input=false -no-color >/dev/null && terraform validate -no-color)
done
(cd tests/plan && terraform test -no-color)
