#ifndef GRANARY_CPMEM_SHIM_H
#define GRANARY_CPMEM_SHIM_H
// libpmem (PMDK). Only the public header: libpmem's API has no macros Swift trips over.
#include <libpmem.h>

// Not libpmem: the CPU's prefetch hint for a line of mapped region memory, which Swift cannot
// emit itself. A hint only: it never faults and changes no value; the line is fetched while the
// caller goes on. GranaryMemory wraps it as `CacheLines.prefetch`.
static inline void granary_prefetch(const void *address) { __builtin_prefetch(address, 0, 3); }

// Not libpmem: memfd_create(2) through syscall(2), which Swift cannot call (it is variadic), for
// the memory of a node's lease page: a file of no file system, which a peer process on the host
// opens through /proc/<pid>/fd/<fd>. Returns -1 with errno set on failure. Linux only.
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
static inline int granary_memfd_create(const char *name) {
    return (int)syscall(SYS_memfd_create, name, 1U /* MFD_CLOEXEC */);
}

// Not libpmem: the file-system type of a directory (statfs(2)'s f_type), to tell memory file
// systems (tmpfs, ramfs) from disk ones; -1 if it cannot be read. Linux only.
#include <sys/vfs.h>
static inline long granary_file_system_type(const char *path) {
    struct statfs info;
    if (statfs(path, &info) != 0) return -1;
    return (long)info.f_type;
}

// Not libpmem: the CPUs this process may run on (sched_getaffinity(2), through syscall(2) since
// glibc declares it only with _GNU_SOURCE), as a bit mask of `bytes` bytes; the number of bytes
// the kernel wrote, or -1 with errno set.
static inline int granary_allowed_cpus(unsigned char *mask, int bytes) {
    return (int)syscall(SYS_sched_getaffinity, 0, (unsigned long)bytes, mask);
}

// Not libpmem: the kernel's id of the calling thread (gettid(2), declared by glibc only with
// _GNU_SOURCE).
static inline int granary_thread_id(void) { return (int)syscall(SYS_gettid); }

// Not libpmem: pins thread `tid` (0: the caller) to `cpu` (sched_setaffinity(2)). 0, or -1 with
// errno set.
static inline int granary_pin_thread(int tid, int cpu) {
    unsigned long mask[16] = {0};
    if (cpu < 0 || cpu >= (int)(8 * sizeof(mask))) return -1;
    mask[cpu / (8 * sizeof(unsigned long))] = 1UL << (cpu % (8 * sizeof(unsigned long)));
    return (int)syscall(SYS_sched_setaffinity, tid, sizeof(mask), mask);
}
#endif
#endif
