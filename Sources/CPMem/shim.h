#ifndef GRANARY_CPMEM_SHIM_H
#define GRANARY_CPMEM_SHIM_H
// libpmem (PMDK). Only the public header: libpmem's API has no macros Swift trips over.
#include <libpmem.h>
#endif
