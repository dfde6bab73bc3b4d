/* A libcuda.so.1 for launch-only mode (fura_kernels/triton/launch_only.py): every driver call
 * Triton's C utilities and launchers make returns at once, as an H100 (sm_90) would answer it.
 *
 * Triton's own C code (its utilities module and, before Triton 3.7, one generated launcher per
 * kernel) is compiled and linked against this library, so a launch runs Triton's whole path,
 * Python and C, up to cuLaunchKernelEx, which records the launch and does nothing else. Kernel
 * outputs are therefore never written: only the host side of a launch runs.
 *
 * Built from the cuda.h that Triton ships, so every signature is the driver's own.
 */
#include <stdint.h>
#include <string.h>

#include "cuda.h"

/* The last LOG_CAPACITY launches. Each record: the function handle, the grid, the block, the
 * dynamic shared memory, and the kernel's first arguments as they reach the driver: the first
 * four as 64-bit values (every fura-kernels kernel begins with four pointers) and the next four as
 * 32-bit values (pointers or integers: the low half either way). Enough to tell that two ways of
 * launching a kernel hand the driver the same launch. */
#define LOG_CAPACITY 16384
#define RECORD_WORDS 16
static uint64_t launch_count = 0;
static uint64_t records[LOG_CAPACITY][RECORD_WORDS];
static uint64_t next_handle = 0;

/* Handles are distinct small integers, so a log entry names one loaded kernel. */
static void *new_handle(void) { return (void *)(uintptr_t)__atomic_add_fetch(&next_handle, 1, __ATOMIC_RELAXED); }

CUresult CUDAAPI cuInit(unsigned int flags) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuDriverGetVersion(int *version) {
  *version = 12080;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuDeviceGet(CUdevice *device, int ordinal) {
  *device = ordinal;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuDeviceGetCount(int *count) {
  *count = 1;
  return CUDA_SUCCESS;
}

/* An H100 SXM's figures, for the attributes Triton asks about. */
CUresult CUDAAPI cuDeviceGetAttribute(int *value, CUdevice_attribute attribute, CUdevice device) {
  switch (attribute) {
  case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *value = 9; break;
  case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *value = 0; break;
  case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *value = 227 * 1024; break;
  case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: *value = 228 * 1024; break;
  case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: *value = 65536; break;
  case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *value = 132; break;
  case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *value = 32; break;
  case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: *value = 1980000; break;
  case CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE: *value = 2619000; break;
  case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: *value = 5120; break;
  case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *value = 1024; break;
  default: *value = 0;
  }
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDevicePrimaryCtxRetain(CUcontext *context, CUdevice device) {
  *context = (CUcontext)(uintptr_t)1;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuCtxGetCurrent(CUcontext *context) {
  *context = (CUcontext)(uintptr_t)1;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuCtxSetCurrent(CUcontext context) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxGetDevice(CUdevice *device) {
  *device = 0;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuCtxGetLimit(size_t *value, CUlimit limit) {
  *value = 0;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuCtxSetLimit(CUlimit limit, size_t value) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuMemGetInfo(size_t *free_bytes, size_t *total_bytes) {
  *free_bytes = *total_bytes = (size_t)80 << 30;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuGetErrorString(CUresult error, const char **text) {
  *text = "launch-only stub driver";
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuModuleLoadData(CUmodule *module, const void *image) {
  *module = (CUmodule)new_handle();
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuModuleUnload(CUmodule module) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuModuleGetFunction(CUfunction *function, CUmodule module, const char *name) {
  *function = (CUfunction)new_handle();
  return CUDA_SUCCESS;
}
/* Registers and spills are not known without loading the cubin; Triton only reports them. */
CUresult CUDAAPI cuFuncGetAttribute(int *value, CUfunction_attribute attribute, CUfunction function) {
  *value = attribute == CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK ? 1024 : 0;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuFuncSetAttribute(CUfunction function, CUfunction_attribute attribute, int value) {
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuFuncSetCacheConfig(CUfunction function, CUfunc_cache config) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuOccupancyMaxActiveClusters(int *clusters, CUfunction function, const CUlaunchConfig *config) {
  *clusters = 1;
  return CUDA_SUCCESS;
}

/* Host memory stands in for device memory: a pointer is its own device pointer. */
CUresult CUDAAPI cuPointerGetAttribute(void *data, CUpointer_attribute attribute, CUdeviceptr pointer) {
  if (attribute == CU_POINTER_ATTRIBUTE_DEVICE_POINTER)
    *(CUdeviceptr *)data = pointer;
  else
    *(unsigned int *)data = 0;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuPointerGetAttributes(unsigned int count, CUpointer_attribute *attributes, void **data,
                                        CUdeviceptr pointer) {
  for (unsigned int i = 0; i < count; i++)
    cuPointerGetAttribute(data[i], attributes[i], pointer);
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuStreamIsCapturing(CUstream stream, CUstreamCaptureStatus *status) {
  *status = CU_STREAM_CAPTURE_STATUS_NONE;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuTensorMapEncodeTiled(CUtensorMap *map, CUtensorMapDataType type, cuuint32_t rank, void *address,
                                        const cuuint64_t *dims, const cuuint64_t *strides, const cuuint32_t *box,
                                        const cuuint32_t *element_strides, CUtensorMapInterleave interleave,
                                        CUtensorMapSwizzle swizzle, CUtensorMapL2promotion promotion,
                                        CUtensorMapFloatOOBfill fill) {
  memset(map, 0, sizeof(*map));
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuTensorMapEncodeIm2col(CUtensorMap *map, CUtensorMapDataType type, cuuint32_t rank, void *address,
                                         const cuuint64_t *dims, const cuuint64_t *strides, const int *lower,
                                         const int *upper, cuuint32_t channels, cuuint32_t pixels,
                                         const cuuint32_t *element_strides, CUtensorMapInterleave interleave,
                                         CUtensorMapSwizzle swizzle, CUtensorMapL2promotion promotion,
                                         CUtensorMapFloatOOBfill fill) {
  memset(map, 0, sizeof(*map));
  return CUDA_SUCCESS;
}

/* The driver's launch call: recorded, not run. */
CUresult CUDAAPI cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction function, void **params, void **extra) {
  uint64_t slot = __atomic_fetch_add(&launch_count, 1, __ATOMIC_RELAXED) % LOG_CAPACITY;
  uint64_t *record = records[slot];
  record[0] = (uint64_t)(uintptr_t)function;
  record[1] = config->gridDimX;
  record[2] = config->gridDimY;
  record[3] = config->gridDimZ;
  record[4] = config->blockDimX;
  record[5] = config->blockDimY;
  record[6] = config->blockDimZ;
  record[7] = config->sharedMemBytes;
  for (int i = 0; i < 4; i++)
    record[8 + i] = params ? *(uint64_t *)params[i] : 0;
  for (int i = 0; i < 4; i++)
    record[12 + i] = params ? *(uint32_t *)params[4 + i] : 0;
  return CUDA_SUCCESS;
}

/* Read by fura_kernels.triton.launch_only through ctypes. */
uint64_t fura_launch_only_count(void) { return __atomic_load_n(&launch_count, __ATOMIC_RELAXED); }

/* Launch number `index` (counting from 0) into `out` (RECORD_WORDS words); 0 if it has left the
 * log, else 1. */
int fura_launch_only_entry(uint64_t index, uint64_t *out) {
  uint64_t count = fura_launch_only_count();
  if (index >= count || count - index > LOG_CAPACITY)
    return 0;
  memcpy(out, records[index % LOG_CAPACITY], sizeof(records[0]));
  return 1;
}
