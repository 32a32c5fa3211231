import CIBVerbs
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

/// What one end of a reliable connection tells the other: enough to move its own QP to RTR.
struct QueuePairAddress: Equatable {
    var queuePairNumber: UInt32
    var packetSequenceNumber: UInt32
    var gid: (UInt64, UInt64)  // the raw 16 bytes, as two words in memory order
    var lid: UInt16
    var mtu: UInt32  // enum ibv_mtu's raw value

    static func == (a: QueuePairAddress, b: QueuePairAddress) -> Bool {
        a.queuePairNumber == b.queuePairNumber && a.packetSequenceNumber == b.packetSequenceNumber
            && a.gid == b.gid && a.lid == b.lid && a.mtu == b.mtu
    }
}

/// Access the remote side may use on our regions and on a QP's responder side.
let remoteAccess = Int32(IBV_ACCESS_LOCAL_WRITE.rawValue | IBV_ACCESS_REMOTE_READ.rawValue
                         | IBV_ACCESS_REMOTE_WRITE.rawValue | IBV_ACCESS_REMOTE_ATOMIC.rawValue)

/// Creating and connecting reliable-connected queue pairs (the steps of rdma-core's rc_pingpong).
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

    /// Moves `qp` through INIT, RTR and RTS towards `remote`.
    static func connect(_ qp: UnsafeMutablePointer<ibv_qp>, _ device: VerbsDevice, localPSN: UInt32,
                        remote: QueuePairAddress) throws(VerbsCallFailure) {
        var attributes = ibv_qp_attr()
        attributes.qp_state = IBV_QPS_INIT
        attributes.pkey_index = 0
        attributes.port_num = device.portNumber
        attributes.qp_access_flags = UInt32(remoteAccess)
        try modify(qp, &attributes, [IBV_QP_STATE, IBV_QP_PKEY_INDEX, IBV_QP_PORT, IBV_QP_ACCESS_FLAGS], "INIT")

        attributes = ibv_qp_attr()
        attributes.qp_state = IBV_QPS_RTR
        attributes.path_mtu = ibv_mtu(min(device.activeMTU.rawValue, remote.mtu))
        attributes.dest_qp_num = remote.queuePairNumber
        attributes.rq_psn = remote.packetSequenceNumber
        attributes.max_dest_rd_atomic = UInt8(clamping: min(16, max(1, device.maxResponderReadAtomic)))
        attributes.min_rnr_timer = 12
        attributes.ah_attr.dlid = remote.lid
        attributes.ah_attr.sl = 0
        attributes.ah_attr.src_path_bits = 0
        attributes.ah_attr.port_num = device.portNumber
        if device.isEthernet {
            // RoCE (rxe is RoCE v2 only): every packet carries a global route header.
            attributes.ah_attr.is_global = 1
            withUnsafeMutableBytes(of: &attributes.ah_attr.grh.dgid) { raw in
                raw.storeBytes(of: remote.gid.0, toByteOffset: 0, as: UInt64.self)
                raw.storeBytes(of: remote.gid.1, toByteOffset: 8, as: UInt64.self)
            }
            attributes.ah_attr.grh.sgid_index = device.gidIndex
            attributes.ah_attr.grh.hop_limit = 64
        }
        try modify(qp, &attributes, [IBV_QP_STATE, IBV_QP_AV, IBV_QP_PATH_MTU, IBV_QP_DEST_QPN, IBV_QP_RQ_PSN,
                                     IBV_QP_MAX_DEST_RD_ATOMIC, IBV_QP_MIN_RNR_TIMER], "RTR")

        attributes = ibv_qp_attr()
        attributes.qp_state = IBV_QPS_RTS
        attributes.timeout = retransmitTimeout
        attributes.retry_cnt = retryCount
        attributes.rnr_retry = 7
        attributes.sq_psn = localPSN
        attributes.max_rd_atomic = UInt8(clamping: min(16, max(1, device.maxInitiatorReadAtomic)))
        try modify(qp, &attributes, [IBV_QP_STATE, IBV_QP_TIMEOUT, IBV_QP_RETRY_CNT, IBV_QP_RNR_RETRY,
                                     IBV_QP_SQ_PSN, IBV_QP_MAX_QP_RD_ATOMIC], "RTS")
    }

    private static func modify(_ qp: UnsafeMutablePointer<ibv_qp>, _ attributes: inout ibv_qp_attr,
                               _ mask: [ibv_qp_attr_mask], _ state: String) throws(VerbsCallFailure) {
        let bits = mask.reduce(UInt32(0)) { $0 | $1.rawValue }
        let result = ibv_modify_qp(qp, &attributes, Int32(bitPattern: bits))
        guard result == 0 else {
            throw VerbsCallFailure(call: "ibv_modify_qp to \(state)", detail: errnoText(result))
        }
    }

    /// This end's address for a QP: its number, a fresh random PSN, the device's GID and LID.
    static func address(of qp: UnsafeMutablePointer<ibv_qp>, _ device: VerbsDevice) -> QueuePairAddress {
        var generator = SystemRandomNumberGenerator()
        let gid = withUnsafeBytes(of: device.gid) { raw in
            (raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self), raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        }
        return QueuePairAddress(queuePairNumber: qp.pointee.qp_num,
                                packetSequenceNumber: UInt32.random(in: 0..<(1 << 24), using: &generator),
                                gid: gid, lid: device.lid, mtu: device.activeMTU.rawValue)
    }
}
