import CIBVerbs
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// How a device's atomic operations (compare-and-swap, fetch-and-add) relate to the CPU's.
///
/// Mirrors `enum ibv_atomic_cap` (`ibv_device_attr.atomic_cap`).
public enum VerbsAtomicCapability: String, Sendable, CustomStringConvertible {
    /// `IBV_ATOMIC_NONE`: the device has no atomic operations.
    case none
    /// `IBV_ATOMIC_HCA`: NIC atomics are atomic only with respect to other NIC atomics on the same
    /// device. A CPU atomic instruction on the same word may interleave with them, so a word must be
    /// updated either only by NIC atomics or only by CPU atomics. (Soft-RoCE reports this: rxe
    /// performs atomics in the kernel under its own lock.)
    case hca
    /// `IBV_ATOMIC_GLOB`: NIC atomics are also atomic with respect to CPU atomics on the same word.
    case global

    /// The verbs constant's name: `IBV_ATOMIC_NONE`, `IBV_ATOMIC_HCA` or `IBV_ATOMIC_GLOB`.
    public var description: String {
        switch self {
        case .none: return "IBV_ATOMIC_NONE"
        case .hca: return "IBV_ATOMIC_HCA"
        case .global: return "IBV_ATOMIC_GLOB"
        }
    }
}

/// An opened RDMA device: its context, the node's one protection domain, and what was learnt about
/// its port (GID, MTU, link layer) and its limits.
///
/// `@unchecked Sendable`: every stored property is immutable after `init`; the verbs objects it
/// points to are thread-safe to use from several threads (libibverbs' contract for a context and a
/// protection domain). Every object created from the protection domain (QPs, MRs) is owned by an
/// object that keeps this device alive, so `deinit` runs after all of them are destroyed.
final class VerbsDevice: @unchecked Sendable {
    let name: String
    let context: UnsafeMutablePointer<ibv_context>
    let protectionDomain: UnsafeMutablePointer<ibv_pd>
    let portNumber: UInt8
    let gidIndex: UInt8
    let gid: ibv_gid
    let lid: UInt16
    let activeMTU: ibv_mtu
    /// RoCE (true) needs a global route header in every address; InfiniBand routes by LID.
    let isEthernet: Bool
    let atomicCapability: VerbsAtomicCapability
    /// `max_qp_init_rd_atom`: READs and atomics one QP may have outstanding as initiator.
    let maxInitiatorReadAtomic: Int
    /// `max_qp_rd_atom`: READs and atomics one QP accepts outstanding as responder.
    let maxResponderReadAtomic: Int
    let maxQueuePairWorkRequests: Int
    /// Whether the device is a software one (soft-RoCE `rxe`, `siw`) whose RDMA READ is a CPU copy
    /// in the kernel rather than a NIC's DMA: such a copy reads a cache line as a unit only by
    /// chance, so ``VerbsTransport`` checks whole-line reads (see `Options.checkedLineReads`).
    /// Told by the vendor id (rxe: 0xFFFFFF, siw: 0x626d74) or by the device having no bus device
    /// behind it in sysfs (`/sys/class/infiniband/NAME/device`), as every hardware NIC has.
    let isSoftware: Bool

    /// The names of the RDMA devices libibverbs sees (empty on a kernel without RDMA).
    static func deviceNames() -> [String] {
        var count: Int32 = 0
        guard let list = ibv_get_device_list(&count) else { return [] }
        defer { ibv_free_device_list(list) }
        return (0..<Int(count)).compactMap { index in
            list[index].map { String(cString: ibv_get_device_name($0)) }
        }
    }

    /// Opens `requested` (or `GRANARY_RDMA_DEVICE`, or the first device) on port `port`.
    ///
    /// - Parameter gidIndex: the source GID index (or `GRANARY_RDMA_GID_INDEX`); if neither is
    ///   given, the first RoCE v2 GID that holds an IPv4-mapped address, else the first RoCE v2 GID.
    init(requested: String?, port: UInt8, gidIndex requestedGidIndex: Int?) throws(VerbsError) {
        let wanted = requested ?? environment("GRANARY_RDMA_DEVICE")
        var count: Int32 = 0
        let list = ibv_get_device_list(&count)
        defer { if let list { ibv_free_device_list(list) } }
        var names: [String] = []
        var chosen: OpaquePointer? = nil
        for index in 0..<Int(list == nil ? 0 : count) {
            guard let device = list![index] else { continue }
            let deviceName = String(cString: ibv_get_device_name(device))
            names.append(deviceName)
            if chosen == nil, wanted == nil || wanted == deviceName { chosen = OpaquePointer(device) }
        }
        guard let chosen else { throw .noDevice(requested: wanted, available: names) }
        let device = UnsafeMutablePointer<ibv_device>(chosen)
        let name = String(cString: ibv_get_device_name(device))
        guard let context = ibv_open_device(device) else {
            throw .call("ibv_open_device", device: name, detail: errnoText(errno))
        }
        // From here on every failure closes what was opened.
        func fail(_ call: String, _ detail: String, pd: UnsafeMutablePointer<ibv_pd>? = nil) -> VerbsError {
            if let pd { ibv_dealloc_pd(pd) }
            ibv_close_device(context)
            return .call(call, device: name, detail: detail)
        }
        var deviceAttributes = ibv_device_attr()
        let queried = ibv_query_device(context, &deviceAttributes)
        guard queried == 0 else { throw fail("ibv_query_device", errnoText(queried)) }
        var portAttributes = ibv_port_attr()
        let portQueried = CIBVerbs_ibv_query_port(context, port, &portAttributes)
        guard portQueried == 0 else { throw fail("ibv_query_port (port \(port))", errnoText(portQueried)) }
        guard portAttributes.state == IBV_PORT_ACTIVE else {
            let state = String(cString: ibv_port_state_str(portAttributes.state))
            throw fail("ibv_query_port", "port \(port) is \(state), not ACTIVE (is the network interface under the device up?)")
        }
        let isEthernet = portAttributes.link_layer == UInt8(IBV_LINK_LAYER_ETHERNET)

        let gidIndex: Int
        if let index = requestedGidIndex ?? environment("GRANARY_RDMA_GID_INDEX").flatMap({ Int($0) }) {
            gidIndex = index
        } else if isEthernet {
            guard let found = Self.discoverRoCEv2GidIndex(context, port: port, tableLength: Int(portAttributes.gid_tbl_len)) else {
                throw fail("ibv_query_gid_ex", "port \(port) has no RoCE v2 GID (does the device's network interface have an IP address?); "
                           + "set GRANARY_RDMA_GID_INDEX to choose one")
            }
            gidIndex = found
        } else {
            gidIndex = 0
        }
        guard gidIndex >= 0, gidIndex < Int(portAttributes.gid_tbl_len), gidIndex <= Int(UInt8.max) else {
            throw fail("ibv_query_gid", "GID index \(gidIndex) is outside port \(port)'s table of \(portAttributes.gid_tbl_len) entries")
        }
        var gid = ibv_gid()
        let gidQueried = ibv_query_gid(context, port, Int32(gidIndex), &gid)
        guard gidQueried == 0 else { throw fail("ibv_query_gid (index \(gidIndex))", errnoText(errno)) }
        if isEthernet, gid.global.subnet_prefix == 0, gid.global.interface_id == 0 {
            throw fail("ibv_query_gid", "GID index \(gidIndex) of port \(port) is empty (RoCE needs a GID with an address; "
                       + "check GRANARY_RDMA_GID_INDEX)")
        }
        guard let pd = ibv_alloc_pd(context) else { throw fail("ibv_alloc_pd", errnoText(errno)) }

        self.name = name
        self.context = context
        self.protectionDomain = pd
        self.portNumber = port
        self.gidIndex = UInt8(gidIndex)
        self.gid = gid
        self.lid = portAttributes.lid
        self.activeMTU = portAttributes.active_mtu
        self.isEthernet = isEthernet
        switch deviceAttributes.atomic_cap {
        case IBV_ATOMIC_GLOB: self.atomicCapability = .global
        case IBV_ATOMIC_HCA: self.atomicCapability = .hca
        default: self.atomicCapability = .none
        }
        self.maxInitiatorReadAtomic = Int(deviceAttributes.max_qp_init_rd_atom)
        self.maxResponderReadAtomic = Int(deviceAttributes.max_qp_rd_atom)
        self.maxQueuePairWorkRequests = Int(deviceAttributes.max_qp_wr)
        let softwareVendors: Set<UInt32> = [0xFFFFFF, 0x626d74]
        self.isSoftware = softwareVendors.contains(deviceAttributes.vendor_id)
            || access("/sys/class/infiniband/\(name)/device", F_OK) != 0
    }

    deinit {
        ibv_dealloc_pd(protectionDomain)
        ibv_close_device(context)
    }

    /// The first RoCE v2 GID holding an IPv4-mapped address (`::ffff:a.b.c.d`), else the first
    /// RoCE v2 GID. The table has many empty slots; entries that do not answer are skipped.
    private static func discoverRoCEv2GidIndex(_ context: UnsafeMutablePointer<ibv_context>, port: UInt8,
                                               tableLength: Int) -> Int? {
        var firstV2: Int? = nil
        for index in 0..<min(tableLength, 256) {
            var entry = ibv_gid_entry()
            guard ibv_query_gid_ex(context, UInt32(port), UInt32(index), &entry, 0) == 0,
                  entry.gid_type == IBV_GID_TYPE_ROCE_V2.rawValue else { continue }
            let raw = withUnsafeBytes(of: entry.gid.raw) { Array($0) }
            guard raw.contains(where: { $0 != 0 }) else { continue }
            if raw[0..<10].allSatisfy({ $0 == 0 }), raw[10] == 0xFF, raw[11] == 0xFF { return index }
            if firstV2 == nil { firstV2 = index }
        }
        return firstV2
    }

    /// The IPv4 address in the source GID (`::ffff:a.b.c.d`, RoCE), or nil (InfiniBand, an IPv6 GID).
    var ipv4Address: in_addr? {
        withUnsafeBytes(of: gid.raw) { raw -> in_addr? in
            guard raw[0..<10].allSatisfy({ $0 == 0 }), raw[10] == 0xFF, raw[11] == 0xFF else { return nil }
            return in_addr(s_addr: raw.loadUnaligned(fromByteOffset: 12, as: UInt32.self))
        }
    }

    var gidText: String {
        withUnsafeBytes(of: gid.raw) { raw in
            stride(from: 0, to: 16, by: 2).map { String(UInt16(raw[$0]) << 8 | UInt16(raw[$0 + 1]), radix: 16) }
                .joined(separator: ":")
        }
    }
}

func environment(_ name: String) -> String? {
    guard let value = getenv(name), value.pointee != 0 else { return nil }
    return String(cString: value)
}
