#ifndef GRANARY_CPMEM_SHIM_H
#define GRANARY_CPMEM_SHIM_H
// libpmem (PMDK). Only the public header: libpmem's API has no macros Swift trips over.
#include <libpmem.h>

// Not libpmem: the CPU's prefetch hint for a line of mapped region memory, which Swift cannot
// emit itself. A hint only: it never faults and changes no value; the line is fetched while the
// caller goes on. GranaryMemory wraps it as `CacheLines.prefetch`.
static inline void granary_prefetch(const void *address) { __builtin_prefetch(address, 0, 3); }
#endif
