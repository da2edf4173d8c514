# Declarative helpers so that each directory's CMakeLists.txt only lists its targets.
#
#   kvrecall_cc_library(NAME name SRCS ... [HDRS ...] DEPS ...)
#   kvrecall_cc_binary(NAME name SRCS ... DEPS ...)
#   kvrecall_cc_test(NAME name SRCS ... DEPS ... [LABELS ...])
#
# Includes are rooted at the repository root ("kvstore/store.h").

set(KVRECALL_WARNINGS -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers)

# The sanitizer trees exist to run the tests: -O1 and line tables only (enough for symbolized
# reports) build them in about 60% of RelWithDebInfo's time, which matters on a 2-core CI machine.
if((KVRECALL_SANITIZE OR KVRECALL_TSAN OR KVRECALL_FUZZ) AND CMAKE_BUILD_TYPE STREQUAL "RelWithDebInfo")
  set(CMAKE_C_FLAGS_RELWITHDEBINFO "-O1 -g1 -DNDEBUG")
  set(CMAKE_CXX_FLAGS_RELWITHDEBINFO "-O1 -g1 -DNDEBUG")
endif()
if(KVRECALL_SANITIZE)
  add_compile_options(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
  add_link_options(-fsanitize=address,undefined)
endif()
# The fuzz tree (tests/fuzz, scripts/test.sh): all code gets libFuzzer's coverage instrumentation
# and ASan + UBSan; only the fuzz targets link libFuzzer itself (kvrecall_fuzz_target), which
# brings its own main().
if(KVRECALL_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
    message(FATAL_ERROR "KVRECALL_FUZZ=ON needs clang (CC=clang CXX=clang++)")
  endif()
  add_compile_options(-fsanitize=fuzzer-no-link,address,undefined -fno-omit-frame-pointer
                      -fno-sanitize-recover=undefined)
  add_link_options(-fsanitize=address,undefined)
endif()
if(KVRECALL_TSAN)
  add_compile_options(-fsanitize=thread -fno-omit-frame-pointer)
  add_link_options(-fsanitize=thread)
  # Debian's Abseil is not built with TSan, so TSan cannot see absl::Mutex, CondVar, Notification
  # etc. Every executable therefore links cmake/tsan/absl_sync_tsan.cc and wraps (GNU ld --wrap)
  # the Abseil functions that file annotates; see the file for how and why. The list of symbols is
  # read from the file (editing it reconfigures), mangled with Abseil's inline namespace from its
  # options.h. scripts/test.sh runs the TSan pass (build-tsan/).
  find_path(KVRECALL_ABSL_INCLUDE_DIR absl/base/options.h REQUIRED)
  file(STRINGS "${KVRECALL_ABSL_INCLUDE_DIR}/absl/base/options.h" _absl_ns_use
       REGEX "^#define ABSL_OPTION_USE_INLINE_NAMESPACE ")
  file(STRINGS "${KVRECALL_ABSL_INCLUDE_DIR}/absl/base/options.h" _absl_ns_name
       REGEX "^#define ABSL_OPTION_INLINE_NAMESPACE_NAME ")
  set(_absl_mangled_ns "4absl")
  if(_absl_ns_use MATCHES " 1$" AND _absl_ns_name MATCHES "NAME ([A-Za-z0-9_]+)$")
    string(LENGTH "${CMAKE_MATCH_1}" _len)
    string(APPEND _absl_mangled_ns "${_len}${CMAKE_MATCH_1}")
  endif()
  set(_shim "${CMAKE_CURRENT_LIST_DIR}/tsan/absl_sync_tsan.cc")
  set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${_shim}")
  file(STRINGS "${_shim}" _wraps REGEX "KVRECALL_TSAN_WRAP\\(\"_ZNK?\", \"[A-Za-z0-9_]+\"\\)")
  set(_wrap_flags "")
  foreach(_line IN LISTS _wraps)
    string(REGEX MATCH "KVRECALL_TSAN_WRAP\\(\"(_ZNK?)\", \"([A-Za-z0-9_]+)\"\\)" _m "${_line}")
    list(APPEND _wrap_flags "LINKER:--wrap=${CMAKE_MATCH_1}${_absl_mangled_ns}${CMAKE_MATCH_2}")
  endforeach()
  list(REMOVE_DUPLICATES _wrap_flags)
  list(LENGTH _wrap_flags _n)
  message(STATUS "kvrecall: TSan build, ${_n} Abseil sync functions wrapped (${_absl_mangled_ns})")
  add_library(kvrecall_tsan_absl_sync OBJECT "${_shim}")
  target_compile_definitions(kvrecall_tsan_absl_sync
    PRIVATE KVRECALL_ABSL_MANGLED_NS="${_absl_mangled_ns}")
  target_compile_options(kvrecall_tsan_absl_sync PRIVATE ${KVRECALL_WARNINGS})
  target_link_libraries(kvrecall_tsan_absl_sync PUBLIC absl::synchronization absl::time)
  target_link_options(kvrecall_tsan_absl_sync INTERFACE ${_wrap_flags})
endif()

# Links the Abseil TSan shim (above) into an executable of a KVRECALL_TSAN build.
function(_kvrecall_tsan_executable target)
  if(KVRECALL_TSAN)
    target_link_libraries(${target} PRIVATE kvrecall_tsan_absl_sync)
  endif()
endfunction()

function(_kvrecall_common target)
  target_include_directories(${target} PUBLIC ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR})
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${KVRECALL_WARNINGS}>)
endfunction()

function(kvrecall_cc_library)
  cmake_parse_arguments(A "" "NAME" "SRCS;HDRS;DEPS" ${ARGN})
  if(A_SRCS)
    add_library(${A_NAME} STATIC ${A_SRCS} ${A_HDRS})
    _kvrecall_common(${A_NAME})
    target_link_libraries(${A_NAME} PUBLIC ${A_DEPS})
  else()
    add_library(${A_NAME} INTERFACE)
    target_include_directories(${A_NAME} INTERFACE ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR})
    target_link_libraries(${A_NAME} INTERFACE ${A_DEPS})
  endif()
endfunction()

function(kvrecall_cc_binary)
  cmake_parse_arguments(A "" "NAME" "SRCS;DEPS" ${ARGN})
  add_executable(${A_NAME} ${A_SRCS})
  _kvrecall_common(${A_NAME})
  _kvrecall_tsan_executable(${A_NAME})
  target_link_libraries(${A_NAME} PRIVATE ${A_DEPS})
  set_target_properties(${A_NAME} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/bin)
endfunction()

function(kvrecall_cc_test)
  cmake_parse_arguments(A "" "NAME" "SRCS;DEPS;LABELS" ${ARGN})
  add_executable(${A_NAME} ${A_SRCS})
  _kvrecall_common(${A_NAME})
  _kvrecall_tsan_executable(${A_NAME})
  target_link_libraries(${A_NAME} PRIVATE ${A_DEPS} kvrecall_testing GTest::gtest GTest::gmock GTest::gtest_main)
  if(A_LABELS)
    set(labels ${A_LABELS})
  else()
    set(labels unit)
  endif()
  # A list value must keep its semicolons escaped, or it breaks the PROPERTIES key/value pairs.
  string(REPLACE ";" "\\;" labels "${labels}")
  # In a TSan tree each test is named after its binary ("kvstore_test.ArenaTest.Foo"), so that
  # scripts/test.sh can run the tests of just the binaries that tree builds (ctest -R).
  set(prefix "")
  if(KVRECALL_TSAN)
    set(prefix "${A_NAME}.")
  endif()
  gtest_discover_tests(${A_NAME}
    PROPERTIES LABELS "${labels}" ENVIRONMENT "KVRECALL_BIN_DIR=${PROJECT_BINARY_DIR}/bin"
    TEST_PREFIX "${prefix}"
    DISCOVERY_TIMEOUT 60)
endfunction()

# kvrecall_fuzz_target(NAME name SRCS ... DEPS ...): a libFuzzer target (KVRECALL_FUZZ trees
# only), built into bin/ like the binaries.
function(kvrecall_fuzz_target)
  cmake_parse_arguments(A "" "NAME" "SRCS;DEPS" ${ARGN})
  add_executable(${A_NAME} ${A_SRCS})
  _kvrecall_common(${A_NAME})
  target_link_libraries(${A_NAME} PRIVATE ${A_DEPS})
  target_link_options(${A_NAME} PRIVATE -fsanitize=fuzzer)
  set_target_properties(${A_NAME} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/bin)
endfunction()

# CUDA: AUTO enables it when nvcc is found (CI has nvcc but no GPU, so kernels build
# there and their gpu-labelled tests skip). The CPU backend never depends on it.
macro(kvrecall_detect_cuda)
  set(KVRECALL_HAVE_CUDA OFF)
  if(NOT KVRECALL_CUDA STREQUAL "OFF")
    if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
      set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
    endif()
    include(CheckLanguage)
    check_language(CUDA)
    if(CMAKE_CUDA_COMPILER)
      if(NOT CMAKE_CUDA_ARCHITECTURES)
        set(CMAKE_CUDA_ARCHITECTURES 90)
      endif()
      enable_language(CUDA)
      find_package(CUDAToolkit REQUIRED)
      set(KVRECALL_HAVE_CUDA ON)
      # NCCL (tensor parallelism) ships with the CUDA toolkit here; without it the worker builds
      # and answers FAILED_PRECONDITION for more than one GPU.
      find_library(KVRECALL_NCCL_LIBRARY nccl HINTS ${CUDAToolkit_LIBRARY_DIR})
      find_path(KVRECALL_NCCL_INCLUDE nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS})
      if(KVRECALL_NCCL_LIBRARY AND KVRECALL_NCCL_INCLUDE)
        set(KVRECALL_HAVE_NCCL ON)
        add_library(kvrecall_nccl INTERFACE IMPORTED)
        target_link_libraries(kvrecall_nccl INTERFACE ${KVRECALL_NCCL_LIBRARY})
        target_include_directories(kvrecall_nccl SYSTEM INTERFACE ${KVRECALL_NCCL_INCLUDE})
      else()
        set(KVRECALL_HAVE_NCCL OFF)
      endif()
      message(STATUS "kvrecall: NCCL ${KVRECALL_HAVE_NCCL}")
    elseif(KVRECALL_CUDA STREQUAL "ON")
      message(FATAL_ERROR "KVRECALL_CUDA=ON but no CUDA compiler was found")
    endif()
  endif()
  message(STATUS "kvrecall: CUDA backend ${KVRECALL_HAVE_CUDA}")
endmacro()
