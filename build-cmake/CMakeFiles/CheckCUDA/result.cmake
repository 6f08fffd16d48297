set(CMAKE_CUDA_COMPILER "/usr/local/cuda-13.0/bin/nvcc")
set(CMAKE_CUDA_HOST_COMPILER "")
