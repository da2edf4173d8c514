# Declarative helpers so that each directory's CMakeLists.txt only lists its targets.
#
#   kvrecall_cc_library(NAME name SRCS ... [HDRS ...] DEPS ...)
#   kvrecall_cc_binary(NAME name SRCS ... DEPS ...)
#   kvrecall_cc_test(NAME name SRCS ... DEPS ... [LABELS ...])
#
# Includes are rooted at the repository root ("kvstore/store.h").

set(KVRECALL_WARNINGS -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers)

if(KVRECALL_SANITIZE)
  add_compile_options(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
  add_link_options(-fsanitize=address,undefined)
endif()
if(KVRECALL_TSAN)
  add_compile_options(-fsanitize=thread -fno-omit-frame-pointer)
  add_link_options(-fsanitize=thread)
endif()

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
  target_link_libraries(${A_NAME} PRIVATE ${A_DEPS})
  set_target_properties(${A_NAME} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/bin)
endfunction()

function(kvrecall_cc_test)
  cmake_parse_arguments(A "" "NAME" "SRCS;DEPS;LABELS" ${ARGN})
  add_executable(${A_NAME} ${A_SRCS})
  _kvrecall_common(${A_NAME})
  target_link_libraries(${A_NAME} PRIVATE ${A_DEPS} kvrecall_testing GTest::gtest GTest::gmock GTest::gtest_main)
  set(labels unit ${A_LABELS})
  gtest_discover_tests(${A_NAME}
    PROPERTIES LABELS "${labels}" ENVIRONMENT "KVRECALL_BIN_DIR=${PROJECT_BINARY_DIR}/bin"
    DISCOVERY_TIMEOUT 60)
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
    elseif(KVRECALL_CUDA STREQUAL "ON")
      message(FATAL_ERROR "KVRECALL_CUDA=ON but no CUDA compiler was found")
    endif()
  endif()
  message(STATUS "kvrecall: CUDA backend ${KVRECALL_HAVE_CUDA}")
endmacro()
