/*
 * runtime.cu: error recording, device and stream queries, and the shared
 * size checks. No kernels live here.
 *
 * Errors are kept per host thread (a thread_local buffer), because Python
 * may call into the library from several threads and each must read the
 * description of its own failure.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "cuda_internal.h"

/* Long enough for a call's source text, a file:line and CUDA's message. */
#define FA_CUDA_MESSAGE_CAPACITY 512

static thread_local char last_error_message[FA_CUDA_MESSAGE_CAPACITY];

extern "C" const char *fa_cuda_last_error(void) { return last_error_message; }

int fa_cuda_fail(int status, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(last_error_message, sizeof last_error_message, fmt, args);
    va_end(args);
    return status;
}

int fa_cuda_runtime_failure(cudaError_t err, const char *what, const char *file, int line) {
    int status = FA_CUDA_ERR_RUNTIME;
    if (err == cudaErrorMemoryAllocation)
        status = FA_CUDA_ERR_NOMEM;
    else if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver ||
             err == cudaErrorInitializationError || err == cudaErrorCompatNotSupportedOnDevice)
        status = FA_CUDA_ERR_NO_DEVICE;
    return fa_cuda_fail(status, "%s failed at %s:%d: %s (%s)", what, file, line,
                        cudaGetErrorString(err), cudaGetErrorName(err));
}

int fa_cuda_view_ok(const int64_t *dims, const int64_t *strides, int n, int64_t elem_size) {
    int64_t reach = 0;
    for (int i = 0; i < n; ++i) {
        if (dims[i] < 0) return 0;
        if (dims[i] == 0) return 1; /* no element is ever addressed */
    }
    for (int i = 0; i < n; ++i) {
        if (strides[i] == INT64_MIN) return 0;
        const int64_t s = strides[i] < 0 ? -strides[i] : strides[i];
        int64_t term;
        if (!fa_cuda_mul_ok(s, dims[i] - 1, &term)) return 0;
        if (term > INT64_MAX - reach) return 0;
        reach += term;
    }
    int64_t bytes;
    return fa_cuda_mul_ok(reach + 1, elem_size, &bytes);
}

int64_t fa_cuda_dtype_size(int dtype) {
    switch (dtype) {
        case FA_CUDA_F64: case FA_CUDA_I64: case FA_CUDA_U64: return 8;
        case FA_CUDA_F32: case FA_CUDA_I32: case FA_CUDA_U32: return 4;
        case FA_CUDA_F16: case FA_CUDA_I16: case FA_CUDA_U16: return 2;
        case FA_CUDA_BOOL: case FA_CUDA_I8: case FA_CUDA_U8: return 1;
        default: return 0;
    }
}

extern "C" int fa_cuda_device_count(int *count) {
    if (count == NULL) return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_device_count: count is NULL");
    *count = 0;
    FA_CUDA_TRY(cudaGetDeviceCount(count));
    return FA_CUDA_OK;
}

extern "C" int fa_cuda_versions(int *runtime_version, int *driver_version) {
    if (runtime_version == NULL || driver_version == NULL)
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_versions: NULL output");
    *runtime_version = CUDART_VERSION; /* the headers this was compiled with */
    *driver_version = 0;
    /* 0 (not an error) when no driver is installed */
    FA_CUDA_TRY(cudaDriverGetVersion(driver_version));
    return FA_CUDA_OK;
}

extern "C" int fa_cuda_set_device(int device) {
    if (device < 0) return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_set_device: device %d < 0", device);
    FA_CUDA_TRY(cudaSetDevice(device));
    return FA_CUDA_OK;
}

extern "C" int fa_cuda_pointer_device(const void *ptr, int *device) {
    if (device == NULL) return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_pointer_device: device is NULL");
    cudaPointerAttributes attr;
    memset(&attr, 0, sizeof attr);
    FA_CUDA_TRY(cudaPointerGetAttributes(&attr, ptr));
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
        return fa_cuda_fail(FA_CUDA_ERR_INVALID,
                            "pointer %p is not device memory (cudaMemoryType %d)", ptr,
                            (int)attr.type);
    *device = attr.device;
    return FA_CUDA_OK;
}

extern "C" int fa_cuda_stream_wait(void *consumer, void *producer) {
    if (consumer == producer) return FA_CUDA_OK;
    /* Timing off: the event only orders work, and timing events cost more. */
    cudaEvent_t done;
    FA_CUDA_TRY(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    cudaError_t err = cudaEventRecord(done, (cudaStream_t)producer);
    if (err == cudaSuccess) err = cudaStreamWaitEvent((cudaStream_t)consumer, done, 0);
    /* An event may be destroyed while work still waits on it: the wait
     * keeps what it needs. */
    cudaError_t destroy_err = cudaEventDestroy(done);
    if (err != cudaSuccess)
        return fa_cuda_runtime_failure(err, "cudaEventRecord/cudaStreamWaitEvent", __FILE__, __LINE__);
    if (destroy_err != cudaSuccess)
        return fa_cuda_runtime_failure(destroy_err, "cudaEventDestroy", __FILE__, __LINE__);
    return FA_CUDA_OK;
}
