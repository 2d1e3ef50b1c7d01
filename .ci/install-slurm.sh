#!/usr/bin/env bash
# Install a single-node SLURM (controller + compute daemon + client tools) and MUNGE from
# Debian's packages, for tests/test_slurm.py. Idempotent: does nothing when all are present.
# Needs root. Starts nothing: tests/slurm_cluster.py starts and stops the daemons itself.
set -euo pipefail

need=()
for bin in slurmctld slurmd sbatch srun squeue sinfo scancel scontrol munged; do
    command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
if [ ${#need[@]} -eq 0 ]; then
    echo "install-slurm: already installed (slurm $(dpkg-query -W -f='${Version}' slurmctld 2>/dev/null || echo "?"))"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-slurm: missing ${need[*]} and not root; cannot install" >&2
    exit 1
fi
echo "install-slurm: installing slurmctld slurmd slurm-client munge (missing: ${need[*]})"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# --no-install-recommends keeps it small; the daemons' postinst scripts may try to start
# services through systemd, which is absent here: that is harmless and ignored.
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
# A system-wide key for a munged started by hand (tests/slurm_cluster.py makes its own).
if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
echo "install-slurm: installed slurm $(dpkg-query -W -f='${Version}' slurmctld)"
