# Script mode (cmake -P): installs the build into PREFIX and imports the package from
# PREFIX/PYDIR with PYTHON (the build tree's package is not on the path), torch part included.
file(REMOVE_RECURSE ${PREFIX})
execute_process(COMMAND ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${PREFIX}
  RESULT_VARIABLE rc OUTPUT_QUIET ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "install failed (${rc}): ${err}")
endif()
set(ENV{PYTHONPATH} "${PREFIX}/${PYDIR}")
execute_process(COMMAND ${PYTHON} -c "
import sys, uaa
assert uaa.__file__.startswith('${PREFIX}/'), uaa.__file__
try:
    import uaa.torch
except ImportError as e:  # torch missing: the NumPy part is the package
    print('uaa.torch not importable:', e)
import numpy as np
plan = uaa.Plan(uaa.Communicator.world(), 5, heads=2, head_dim=8)
x = np.ones((5, 2, 8), np.float32)
assert uaa.attention(x, x, x, plan).shape == (5, 2, 8)
print('installed uaa', uaa.__version__, 'imported from', uaa.__file__)
" RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("${out}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "import of the installed package failed (${rc}): ${err}")
endif()
