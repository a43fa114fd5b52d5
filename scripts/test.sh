#!/usr/bin/env bash
# `make test`: ruff, then two pytest runs side by side.
#   - tests/ansible/test_molecule.py: the molecule scenarios (QEMU VMs converged through Ansible);
#     Ansible's controller waits on the guest most of the time, so the run keeps about one core busy;
#   - everything else (units, integration, labd with PostgreSQL, the QEMU e2e lab).
# On this 2-core machine the two take about as long side by side as the longer one alone. The caches
# they share (the VM image, its warm-start snapshot, the wheelhouse) are built under file locks or
# written to a temporary name and renamed. The molecule run's output is kept in artifacts/ and shown
# after the other run's; the exit status is the worse of the two.
# Usage: scripts/test.sh PYTHON [PYTEST_ARGS...]
set -uo pipefail
cd "$(dirname "$0")/.."
py=$1
shift
# Paths among the arguments (`make test PYTEST_ARGS=tests/unit`): one run of those, nothing beside it.
for arg in "$@"; do
    if [[ $arg != -* && -e ${arg%%::*} ]]; then
        exec "$py" -m pytest "$@"
    fi
done

mkdir -p artifacts
log=artifacts/pytest-molecule.log

"$py" -m pytest -p no:cacheprovider tests/ansible/test_molecule.py "$@" >"$log" 2>&1 &
molecule=$!
trap 'kill -INT "$molecule" 2>/dev/null' INT TERM

"$py" -m pytest --ignore=tests/ansible/test_molecule.py "$@"
rc=$?
wait "$molecule"
mrc=$?

echo
echo "==== tests/ansible/test_molecule.py, run beside the tests above (exit status $mrc; $log) ===="
cat "$log"
# 5: no test selected (PYTEST_ARGS chose others), not a failure of its own
if [ "$mrc" -eq 5 ] && [ "$rc" -ne 5 ]; then mrc=0; fi
if [ "$rc" -eq 5 ] && [ "$mrc" -ne 5 ]; then rc=0; fi
if [ "$rc" -ne 0 ]; then exit "$rc"; fi
exit "$mrc"
