#ifndef GRANARY_CIBVERBS_SHIM_H
#define GRANARY_CIBVERBS_SHIM_H
#include <infiniband/verbs.h>

// `ibv_query_port` and `ibv_reg_mr` are macros in verbs.h. Called from Swift they bind to
// exported compat/ABI symbols instead (see ../shared/INTEROP.md), so each gets a one-line
// static inline shim that expands the real macro.
static inline int CIBVerbs_ibv_query_port(struct ibv_context *context, uint8_t port_num,
                                          struct ibv_port_attr *port_attr) {
    return ibv_query_port(context, port_num, port_attr);
}

static inline struct ibv_mr *CIBVerbs_ibv_reg_mr(struct ibv_pd *pd, void *addr, size_t length,
                                                 int access) {
    return ibv_reg_mr(pd, addr, length, access);
}
#endif
