#!/usr/bin/env bash
# The MPICH job (CTest entry `mpich`, label `mpich`): configures a second build tree against MPICH
# (mpicxx.mpich, mpiexec.mpich), builds only the library, the `uaa` command and the test binaries
# it runs, and runs there with ctest: the install + find_package test (the consumer must find
# MPICH, uaa's MPI, not the system default), forward() on 1-4 and 8 ranks (peer reads and messages),
# the error tests, deadlines and transport faults, and the demo (`uaa run --check` on 3 ranks);
# where the Python package's prerequisites are installed, that `import uaa` built against MPICH
# refuses Debian's mpi4py (Open MPI) with a message naming both.
# Skipped (exit 77) where MPICH is not installed (scripts/install-deps.sh installs it).
# Usage: run.sh <source dir> <build dir> [UAA_WERROR: ON|OFF]
set -euo pipefail
src=$1
bin=$2
werror=${3:-ON}
cxx=$(command -v mpicxx.mpich || true)
exe=$(command -v mpiexec.mpich || true)
if [ -z "$cxx" ] || [ -z "$exe" ]; then
  echo "mpich: mpicxx.mpich or mpiexec.mpich not found (scripts/install-deps.sh installs mpich libmpich-dev): skipped"
  exit 77
fi
start=$SECONDS
mkdir -p "$(dirname "$bin")"
cmake -S "$src" -B "$bin" -DCMAKE_BUILD_TYPE=Release -DUAA_WERROR="$werror" -DUAA_MPICH_TESTS=OFF \
  -DUAA_PYTHON_IGNORE_MPI_MISMATCH=ON \
  -DMPI_CXX_COMPILER="$cxx" -DMPIEXEC_EXECUTABLE="$exe" >"$bin.configure.log" 2>&1 ||
  { cat "$bin.configure.log"; exit 1; }
# The tree must really be MPICH's, library and launcher (top-level CMakeLists.txt reports both).
grep -E "^-- uaa: MPI MPICH .*launcher mpich" "$bin.configure.log" ||
  { echo "mpich: $bin is not an MPICH build:"; cat "$bin.configure.log"; exit 1; }
targets="uaa uaa_cli uaa_mpi_forward_test uaa_mpi_backward_test uaa_mpi_documents_test uaa_mpi_error_test uaa_deadline_test uaa_fault_test"
# The Python package, where configured (below; `cmake --install` of the install test needs it too).
if [ -x "$bin/uaa-python" ]; then targets="$targets uaa_python"; fi
# shellcheck disable=SC2086
cmake --build "$bin" -j2 --target $targets >"$bin.build.log" 2>&1 || { tail -50 "$bin.build.log"; exit 1; }
echo "mpich: configured and built in $((SECONDS - start)) s"
tests='^(install_and_find_package|uaa_mpi_forward_test_np[12348]|uaa_mpi_forward_test_messages_np3|uaa_mpi_backward_test_np[35]|uaa_mpi_documents_test_np[34]|uaa_mpi_error_test_np[23]|uaa_deadline_test_np[23]|uaa_fault_test_np[234]|cli_run_check_np3)$'
ctest --test-dir "$bin" --output-on-failure -R "$tests"
# All of them ran (a renamed test would otherwise drop out of the job silently).
count=$(ctest --test-dir "$bin" -N -R "$tests" | sed -n 's/^Total Tests: //p')
if [ "$count" != 19 ]; then
  echo "mpich: expected 19 tests, ctest selects $count"
  exit 1
fi
# The Python package against MPICH, where its prerequisites are installed (Debian's mpi4py uses
# Open MPI): `import uaa` must refuse it, naming both MPIs, instead of mixing two MPI libraries in
# one process (python/CMakeLists.txt builds it here only for this check).
if [ -x "$bin/uaa-python" ]; then
  if out=$("$bin/uaa-python" -c "import uaa" 2>&1); then
    echo "mpich: import uaa built against MPICH succeeded beside mpi4py's MPI:"; echo "$out"; exit 1
  fi
  echo "$out" | grep -E "ImportError: uaa was built (against|with) .*MPICH.* but mpi4py" ||
    { echo "mpich: import uaa failed without naming the MPI mismatch:"; echo "$out"; exit 1; }
  echo "mpich: the Python package built against MPICH refuses mpi4py's other MPI, as it should"
else
  echo "mpich: Python package prerequisites missing: its MPI check skipped"
fi
echo "mpich: passed in $((SECONDS - start)) s"
