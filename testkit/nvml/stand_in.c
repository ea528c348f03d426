/*
 * A stand-in libnvidia-ml.so for machines without a GPU: it exports the NVML
 * functions Proctor's sampler calls (through nvml-wrapper, exactly as with
 * the real driver) and answers from a text file the test writes, re-read on
 * every call so a test can change what the "GPU" shows while the agent runs:
 *
 *   device INDEX NAME UUID USED_BYTES TOTAL_BYTES UTIL_PERCENT TEMP_C POWER_MW
 *   process DEVICE_INDEX PID USED_BYTES
 *
 * Built by testkit with the system C compiler; SPEC_PATH is compiled in.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#ifndef SPEC_PATH
#error "build with -DSPEC_PATH=\"/path/to/spec\""
#endif

typedef int nvmlReturn_t;
typedef void *nvmlDevice_t;
enum { OK = 0, INVALID_ARGUMENT = 2, NOT_FOUND = 6, INSUFFICIENT_SIZE = 7 };

typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct { unsigned int pid; unsigned long long usedGpuMemory; unsigned int gpuInstanceId, computeInstanceId; } nvmlProcessInfo_t;

#define MAX_DEVICES 16
#define MAX_PROCS 256

struct device { char name[96], uuid[96]; unsigned long long used, total; unsigned int util, temp, power; };
struct proc { unsigned int device, pid; unsigned long long used; };

static struct device devices[MAX_DEVICES];
static struct proc procs[MAX_PROCS];
static unsigned int n_devices, n_procs;

static void load(void) {
    n_devices = n_procs = 0;
    FILE *f = fopen(SPEC_PATH, "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        struct device d; struct proc p; unsigned int i;
        if (sscanf(line, "device %u %95s %95s %llu %llu %u %u %u", &i, d.name, d.uuid, &d.used, &d.total,
                   &d.util, &d.temp, &d.power) == 8 && i < MAX_DEVICES) {
            devices[i] = d;
            if (i + 1 > n_devices) n_devices = i + 1;
        } else if (sscanf(line, "process %u %u %llu", &p.device, &p.pid, &p.used) == 3 && n_procs < MAX_PROCS) {
            procs[n_procs++] = p;
        }
    }
    fclose(f);
}

static int index_of(nvmlDevice_t d) {
    uintptr_t i = (uintptr_t)d;
    return (i >= 1 && i <= n_devices) ? (int)(i - 1) : -1;
}

nvmlReturn_t nvmlInit_v2(void) { load(); return OK; }
nvmlReturn_t nvmlInitWithFlags(unsigned int flags) { (void)flags; load(); return OK; }
nvmlReturn_t nvmlShutdown(void) { return OK; }
const char *nvmlErrorString(nvmlReturn_t r) { (void)r; return "stand-in NVML error"; }

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    load();
    *count = n_devices;
    return OK;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int i, nvmlDevice_t *d) {
    if (i >= n_devices) return INVALID_ARGUMENT;
    *d = (nvmlDevice_t)(uintptr_t)(i + 1);
    return OK;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, nvmlMemory_v2_t *m) {
    int i = index_of(d);
    if (i < 0) return INVALID_ARGUMENT;
    m->total = devices[i].total;
    m->used = devices[i].used;
    m->reserved = 0;
    m->free = devices[i].total - devices[i].used;
    return OK;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *u) {
    int i = index_of(d);
    if (i < 0) return INVALID_ARGUMENT;
    u->gpu = devices[i].util;
    u->memory = 0;
    return OK;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t d, int sensor, unsigned int *t) {
    int i = index_of(d);
    (void)sensor;
    if (i < 0) return INVALID_ARGUMENT;
    *t = devices[i].temp;
    return OK;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t d, unsigned int *mw) {
    int i = index_of(d);
    if (i < 0) return INVALID_ARGUMENT;
    *mw = devices[i].power;
    return OK;
}

static nvmlReturn_t copy_text(const char *from, char *to, unsigned int length) {
    if (strlen(from) + 1 > length) return INSUFFICIENT_SIZE;
    strcpy(to, from);
    return OK;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *name, unsigned int length) {
    int i = index_of(d);
    return i < 0 ? INVALID_ARGUMENT : copy_text(devices[i].name, name, length);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *uuid, unsigned int length) {
    int i = index_of(d);
    return i < 0 ? INVALID_ARGUMENT : copy_text(devices[i].uuid, uuid, length);
}

static nvmlReturn_t processes(nvmlDevice_t d, unsigned int *count, nvmlProcessInfo_t *out) {
    int i = index_of(d);
    if (i < 0) return INVALID_ARGUMENT;
    unsigned int n = 0;
    for (unsigned int k = 0; k < n_procs; k++) if (procs[k].device == (unsigned int)i) n++;
    if (out == NULL || *count < n) { *count = n; return n == 0 && out == NULL ? OK : INSUFFICIENT_SIZE; }
    unsigned int j = 0;
    for (unsigned int k = 0; k < n_procs; k++) {
        if (procs[k].device != (unsigned int)i) continue;
        out[j].pid = procs[k].pid;
        out[j].usedGpuMemory = procs[k].used;
        out[j].gpuInstanceId = 0xFFFFFFFF;
        out[j].computeInstanceId = 0xFFFFFFFF;
        j++;
    }
    *count = n;
    return OK;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t d, unsigned int *c, nvmlProcessInfo_t *p) {
    return processes(d, c, p);
}

/* Graphics contexts: none here (the same process would be counted twice). */
nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t d, unsigned int *c, nvmlProcessInfo_t *p) {
    (void)p;
    if (index_of(d) < 0) return INVALID_ARGUMENT;
    *c = 0;
    return OK;
}
