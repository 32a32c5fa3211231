#ifndef GRANARY_CRDMACM_SHIM_H
#define GRANARY_CRDMACM_SHIM_H
#include <rdma/rdma_cma.h>
#include <rdma/rdma_verbs.h>
#endif
