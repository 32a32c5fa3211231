import CIBVerbs
import GranaryMemory
import GranaryTransport
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The regions this node registered with the NIC: what `localPointer` returns and what the
/// endpoint tells peers (address, rkey, size).
///
/// Lookups are one acquire load from a flat table (the shared-memory transport's layout: data
/// regions, then one slot per mailbox owner, then one per lease-page owner).
///
/// `@unchecked Sendable`: a record is written once under `owners`' lock and published with a
/// release store; readers use acquire loads. Records, memory regions and the `Region`s that own the
/// mapped bytes are released only in `deinit`.
final class LocalRegions: @unchecked Sendable {
    struct Record {
        let base: UnsafeMutableRawPointer
        let size: Int
        let rkey: UInt32
    }

    private struct Owner {
        let region: Region
        let memoryRegion: UnsafeMutablePointer<ibv_mr>
        let record: UnsafeMutablePointer<Record>
    }

    /// Data regions, then one slot per mailbox owner, then one per lease-page owner.
    static let slotCount = RegionID.limit + 2 * NodeID.limit

    let device: VerbsDevice
    let node: NodeID
    private let table: UnsafeMutablePointer<Atomic<UInt>>
    private let owners = Mutex<[Owner]>([])

    init(device: VerbsDevice, node: NodeID) {
        self.device = device
        self.node = node
        table = UnsafeMutablePointer<Atomic<UInt>>.allocate(capacity: Self.slotCount)
        for slot in 0..<Self.slotCount { (table + slot).initialize(to: Atomic(0)) }
    }

    deinit {
        owners.withLock { owners in
            for owner in owners {
                ibv_dereg_mr(owner.memoryRegion)
                owner.record.deallocate()
            }
            owners.removeAll()
        }
        table.deinitialize(count: Self.slotCount)
        table.deallocate()
    }

    /// The table slot of `region`, or nil for an id no transport can address.
    @inline(__always)
    static func slot(_ region: RegionID) -> Int? {
        if let owner = region.mailboxOwner { return owner.index < NodeID.limit ? RegionID.limit + owner.index : nil }
        if let owner = region.leasePageOwner { return owner.index < NodeID.limit ? RegionID.limit + NodeID.limit + owner.index : nil }
        return region.index < RegionID.limit ? region.index : nil
    }

    /// Registers `region` (all of its mapping) with `ibv_reg_mr`; a region already registered is
    /// left as it is.
    func register(_ region: Region) throws(TransportError) {
        guard let slot = Self.slot(region.id) else {
            throw .unknownRegion(node: node, region: region.id, reason: "region ids are below \(RegionID.limit)")
        }
        let failure: TransportError? = owners.withLock { owners -> TransportError? in
            if table[slot].load(ordering: .acquiring) != 0 { return nil }
            guard let memoryRegion = CIBVerbs_ibv_reg_mr(device.protectionDomain, region.base, region.size, remoteAccess) else {
                return Self.registrationError(errno, bytes: region.size, what: "region \(region.id) (\(region.path))",
                                              device: device, node: node)
            }
            let record = UnsafeMutablePointer<Record>.allocate(capacity: 1)
            record.initialize(to: Record(base: region.base, size: region.size, rkey: memoryRegion.pointee.rkey))
            owners.append(Owner(region: region, memoryRegion: memoryRegion, record: record))
            table[slot].store(UInt(bitPattern: record), ordering: .releasing)
            return nil
        }
        if let failure { throw failure }
    }

    /// The record of a registered region, or nil.
    @inline(__always)
    func record(_ region: RegionID) -> UnsafePointer<Record>? {
        guard let slot = Self.slot(region) else { return nil }
        return UnsafePointer(bitPattern: table[slot].load(ordering: .acquiring))
    }

    /// The error for a failed `ibv_reg_mr`: ENOMEM means the pinned-memory limit, which is the
    /// usual cause and has a known fix.
    static func registrationError(_ code: Int32, bytes: Int, what: String, device: VerbsDevice, node: NodeID) -> TransportError {
        if code == ENOMEM {
            return .backend(call: "ibv_reg_mr", node: node,
                            detail: "registering \(what), \(bytes) bytes, on \(device.name) failed with ENOMEM: "
                                + "the locked-memory limit (RLIMIT_MEMLOCK, now \(memlockLimitText())) is too low; "
                                + "raise it with `ulimit -l unlimited` (or memlock in /etc/security/limits.conf, "
                                + "LimitMEMLOCK= for a systemd service)")
        }
        return .backend(call: "ibv_reg_mr", node: node,
                        detail: "registering \(what), \(bytes) bytes, on \(device.name) failed: \(errnoText(code))")
    }
}
