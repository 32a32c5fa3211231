#ifndef GRANARY_CZOOKEEPER_SHIM_H
#define GRANARY_CZOOKEEPER_SHIM_H
// The synchronous API (zoo_create, zoo_get, zoo_set, zoo_multi) is declared only with THREADED,
// and libzookeeper_mt is the library that implements it.
#ifndef THREADED
#define THREADED 1
#endif
#include <zookeeper/zookeeper.h>

// zookeeper.h exports its constants as mutable globals, which Swift 6 refuses to read from
// concurrent code; these return them.
static inline struct ACL_vector *CZooKeeper_open_acl(void) { return &ZOO_OPEN_ACL_UNSAFE; }
static inline int CZooKeeper_created_event(void) { return ZOO_CREATED_EVENT; }
static inline int CZooKeeper_deleted_event(void) { return ZOO_DELETED_EVENT; }
static inline int CZooKeeper_changed_event(void) { return ZOO_CHANGED_EVENT; }
static inline int CZooKeeper_child_event(void) { return ZOO_CHILD_EVENT; }
static inline int CZooKeeper_session_event(void) { return ZOO_SESSION_EVENT; }
static inline int CZooKeeper_connected_state(void) { return ZOO_CONNECTED_STATE; }
static inline int CZooKeeper_expired_session_state(void) { return ZOO_EXPIRED_SESSION_STATE; }
static inline int CZooKeeper_ephemeral(void) { return ZOO_EPHEMERAL; }
static inline int CZooKeeper_sequence(void) { return ZOO_SEQUENCE; }
#endif
