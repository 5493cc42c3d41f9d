#!/usr/bin/env bash
# Type-check dasktrain under its installed names. mypy finds packages by folder, and the
# installed package ``dasktrain`` is three folders (pipeline/, flows/ as dasktrain.flows,
# cluster/ as dasktrain.cluster; see pyproject.toml), so this lays them out as installed, with
# links in .typecheck/, and runs mypy there. Errors name the linked paths (.typecheck/dasktrain/...).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .typecheck
mkdir -p .typecheck/dasktrain
for entry in pipeline/*; do
  ln -s "../../$entry" ".typecheck/dasktrain/$(basename "$entry")"
done
ln -s ../../flows .typecheck/dasktrain/flows
ln -s ../../cluster .typecheck/dasktrain/cluster
mypy "$@"
