# Script mode (cmake -P): install, configure the consumer against the install prefix, build, run;
# then (where OTHER_MPI_CXX_COMPILER names another MPI implementation) check that a consumer built
# with that one is refused at configure time.
file(REMOVE_RECURSE ${WORK_DIR})
set(prefix ${WORK_DIR}/prefix)
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  message("${out}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${err}")
  endif()
endfunction()
run(${CMAKE_COMMAND} --install ${UAA_BUILD_DIR} --prefix ${prefix})
run(${CMAKE_COMMAND} -S ${UAA_SOURCE_DIR}/examples/hello_uaa -B ${WORK_DIR}/build
    -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_BUILD_TYPE=Release)
# The consumer found uaa's MPI (the package config's hints), not the first one on the PATH.
file(STRINGS ${WORK_DIR}/build/CMakeCache.txt consumer_mpi REGEX "^MPI_CXX_(COMPILER|HEADER_DIR):")
message("consumer (uaa built with ${MPI_VENDOR}): ${consumer_mpi}")
run(${CMAKE_COMMAND} --build ${WORK_DIR}/build)
run(${MPIEXEC} -np 3 ${WORK_DIR}/build/hello_uaa)

if(OTHER_MPI_CXX_COMPILER)
  execute_process(COMMAND ${CMAKE_COMMAND} -S ${CMAKE_CURRENT_LIST_DIR}/mismatch -B ${WORK_DIR}/mismatch
      -DCMAKE_PREFIX_PATH=${prefix} -DMPI_CXX_COMPILER=${OTHER_MPI_CXX_COMPILER}
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  string(REGEX REPLACE "[ \n]+" " " err_flat "${err}")  # CMake wraps messages at 80 columns
  if(rc EQUAL 0 OR NOT err_flat MATCHES "uaa \\(.*\\) was built with ${MPI_VENDOR}.* but this project uses")
    message(FATAL_ERROR "a consumer with ${OTHER_MPI_CXX_COMPILER} (another MPI than uaa's "
      "${MPI_VENDOR}) was not refused with uaa's message (rc ${rc}):\n${out}\n${err}")
  endif()
  string(REGEX MATCH "was built with ${MPI_VENDOR}.* but this project uses [^(]*" said "${err_flat}")
  message("mismatch refused as expected: ${said}")
else()
  message("no other MPI implementation installed: mismatch check skipped")
endif()
