#!/usr/bin/env bash
# Installs the Debian packages uaa needs to build, test and benchmark, skipping what is present.
# Run as root (or with sudo available). Safe to run repeatedly.
set -euo pipefail

packages=(
  cmake make g++ pkg-config
  libopenmpi-dev openmpi-bin   # MPI transport and mpirun (the default MPI: highest alternatives priority)
  mpich libmpich-dev           # the second MPI the tests build against (ctest -L mpich)
  libgtest-dev                 # tests
  libhwy-dev                   # SIMD kernels (runtime ISA dispatch)
  libopenblas-dev              # benchmark reference only (sgemm); never linked into libuaa
  gnuplot-nox                  # benchmark plots
  clang libclang-rt-14-dev     # libFuzzer targets and sanitizer runtimes
  # The Python package (python/) for Debian's python3: pybind11 and the headers to build it,
  # NumPy and mpi4py (Open MPI's, like the library's) to use it, PyTorch for uaa.torch, pytest.
  python3-dev pybind11-dev python3-numpy python3-mpi4py python3-torch python3-pytest
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all packages present"
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
echo "install-deps: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
