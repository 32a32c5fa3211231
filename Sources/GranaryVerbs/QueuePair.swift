import CIBVerbs
import CRDMACM
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A verbs call that failed: the call's name and what it reported. Turned into a
/// ``TransportError`` (naming the peer) or a ``VerbsError`` (naming the device) by the caller.
struct VerbsCallFailure: Error {
    let call: String
    let detail: String
}

/// Access the remote side may use on our regions and on a QP's responder side.
let remoteAccess = Int32(IBV_ACCESS_LOCAL_WRITE.rawValue | IBV_ACCESS_REMOTE_READ.rawValue
                         | IBV_ACCESS_REMOTE_WRITE.rawValue | IBV_ACCESS_REMOTE_ATOMIC.rawValue)

/// Creating reliable-connected queue pairs and moving them through INIT, RTR and RTS for a
/// connection the RDMA CM set up (see ``EndpointProtocol``).
enum QueuePairSetup {
    /// Retransmission timeout exponent: 4.096 us * 2^16 = 268 ms per try. (14, 67 ms per try,
    /// gave false "retry exceeded" errors under software emulation with four busy node processes
    /// on two CPUs: rxe's packet processing can stall for half a second there.)
    static let retransmitTimeout: UInt8 = 16
    /// Retransmissions before the requester gives up with IBV_WC_RETRY_EXC_ERR: with the timeout
    /// above a dead peer is reported after about 1.6 s. Not 7: rxe treats retry_cnt 7 like
    /// rnr_retry 7, as "retry forever" (measured: with 7 a READ to a destroyed QP never completed
    /// and only the completion timeout ended the wait).
    static let retryCount: UInt8 = 6

    /// A new RC QP in RESET state on `cq`, able to hold `sendDepth` outstanding work requests.
    /// Asks for `inlineBytes` of inline data and falls back to none if the device refuses.
    static func create(_ device: VerbsDevice, cq: UnsafeMutablePointer<ibv_cq>, sendDepth: Int,
                       inlineBytes: Int) throws(VerbsCallFailure) -> (UnsafeMutablePointer<ibv_qp>, inline: Int) {
        for inline in [inlineBytes, 0] {
            var attributes = ibv_qp_init_attr()
            attributes.send_cq = cq
            attributes.recv_cq = cq
            attributes.cap.max_send_wr = UInt32(sendDepth)
            attributes.cap.max_recv_wr = 1
            attributes.cap.max_send_sge = 1
            attributes.cap.max_recv_sge = 1
            attributes.cap.max_inline_data = UInt32(inline)
            attributes.qp_type = IBV_QPT_RC
            attributes.sq_sig_all = 0  // selective signalling: only a chain's last WR asks for a completion
            if let qp = ibv_create_qp(device.protectionDomain, &attributes) {
                return (qp, Int(attributes.cap.max_inline_data))
            }
            if inline == 0 { break }
        }
        throw VerbsCallFailure(call: "ibv_create_qp", detail: errnoText(errno))
    }

    /// Moves `qp` (RESET) to INIT on the device's port, with remote read, write and atomic access.
    static func initialize(_ qp: UnsafeMutablePointer<ibv_qp>, _ device: VerbsDevice) throws(VerbsCallFailure) {
        var attributes = ibv_qp_attr()
        attributes.qp_state = IBV_QPS_INIT
        attributes.pkey_index = 0
        attributes.port_num = device.portNumber
        attributes.qp_access_flags = UInt32(remoteAccess)
        try modify(qp, &attributes, [IBV_QP_STATE, IBV_QP_PKEY_INDEX, IBV_QP_PORT, IBV_QP_ACCESS_FLAGS], "INIT")
    }

    /// Moves `qp` (INIT) to RTR and RTS with the attributes the RDMA CM has for the connection of
    /// `id` (address vector, remote QP number, PSNs, path MTU, read/atomic depths), but this
    /// type's retransmission timeout and retry count.
    static func connect(_ qp: UnsafeMutablePointer<ibv_qp>, id: UnsafeMutablePointer<rdma_cm_id>) throws(VerbsCallFailure) {
        var attributes = ibv_qp_attr()
        var mask: Int32 = 0
        attributes.qp_state = IBV_QPS_RTR
        guard rdma_init_qp_attr(id, &attributes, &mask) == 0 else {
            throw VerbsCallFailure(call: "rdma_init_qp_attr (RTR)", detail: errnoText(errno))
        }
        try modify(qp, &attributes, mask: mask, "RTR")
        attributes = ibv_qp_attr()
        mask = 0
        attributes.qp_state = IBV_QPS_RTS
        guard rdma_init_qp_attr(id, &attributes, &mask) == 0 else {
            throw VerbsCallFailure(call: "rdma_init_qp_attr (RTS)", detail: errnoText(errno))
        }
        attributes.timeout = retransmitTimeout
        attributes.retry_cnt = retryCount
        mask |= Int32(bitPattern: IBV_QP_TIMEOUT.rawValue | IBV_QP_RETRY_CNT.rawValue)
        try modify(qp, &attributes, mask: mask, "RTS")
    }

    private static func modify(_ qp: UnsafeMutablePointer<ibv_qp>, _ attributes: inout ibv_qp_attr,
                               _ mask: [ibv_qp_attr_mask], _ state: String) throws(VerbsCallFailure) {
        try modify(qp, &attributes, mask: Int32(bitPattern: mask.reduce(UInt32(0)) { $0 | $1.rawValue }), state)
    }

    private static func modify(_ qp: UnsafeMutablePointer<ibv_qp>, _ attributes: inout ibv_qp_attr,
                               mask: Int32, _ state: String) throws(VerbsCallFailure) {
        let result = ibv_modify_qp(qp, &attributes, mask)
        guard result == 0 else {
            throw VerbsCallFailure(call: "ibv_modify_qp to \(state)", detail: errnoText(result))
        }
    }
}
