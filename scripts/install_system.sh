#!/usr/bin/env bash
# System packages the test suite needs beyond Python: Slurm (slurmctld, slurmd, client: the real
# two-node cluster of tests/test_launch.py) and shellcheck. Installs only what is missing; needs
# root and apt (Debian/Ubuntu). MPI comes from pip (mpich, mpi4py: the [test] extra).
set -euo pipefail
missing=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client shellcheck:shellcheck; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
[ ${#missing[@]} -eq 0 ] && { echo "system packages present (slurm, shellcheck)"; exit 0; }
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_system.sh: please install ${missing[*]} (needs root and apt); the launch tests need them" >&2
  exit 1
fi
echo "installing ${missing[*]} ..."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "installed ${missing[*]}"
