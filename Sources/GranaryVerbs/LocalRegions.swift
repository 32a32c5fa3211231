import CIBVerbs
import GranaryMemory
import GranaryTransport
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The regions this node registered with the NIC: what `localPointer` returns, and the region
/// table peers read one-sidedly to look a region up (address, rkey, size).
///
/// Local lookups are one acquire load from a flat table (the shared-memory transport's layout: data
/// regions, then one slot per mailbox owner, then one per lease-page owner). The same slots index
/// the **published table**: registered memory (remote read only) of ``entryBytes`` per slot,
/// whose address and rkey a node's listener sends with every accepted connection. An entry is
/// written once, when its region is registered, and never changes while the transport lives:
/// address, size and rkey, then (after a release fence) a check word derived from the three, so a
/// peer's READ that races the writing sees a check that does not match and takes the region for
/// not registered yet.
///
/// `@unchecked Sendable`: a record is written once under `owners`' lock and published with a
/// release store; readers use acquire loads. Records, memory regions and the `Region`s that own the
/// mapped bytes are released only in `deinit`; the published table is written only under
/// `owners`' lock.
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

    /// Bytes of one published entry: address u64, size u64, rkey u32, 4 unused, check u64.
    static let entryBytes = 32

    let device: VerbsDevice
    let node: NodeID
    private let table: UnsafeMutablePointer<Atomic<UInt>>
    private let owners = Mutex<[Owner]>([])
    /// The published table (``slotCount`` entries) and its registration.
    let published: UnsafeMutableRawPointer
    let publishedRegion: UnsafeMutablePointer<ibv_mr>

    init(device: VerbsDevice, node: NodeID) throws(VerbsError) {
        let bytes = Self.slotCount * Self.entryBytes
        var memory: UnsafeMutableRawPointer? = nil
        let allocated = posix_memalign(&memory, 4096, bytes)
        guard allocated == 0, let memory else {
            throw .call("posix_memalign", device: device.name, detail: "the region table of \(bytes) bytes: \(errnoText(allocated))")
        }
        memset(memory, 0, bytes)
        guard let region = CIBVerbs_ibv_reg_mr(device.protectionDomain, memory, bytes,
                                               Int32(IBV_ACCESS_LOCAL_WRITE.rawValue | IBV_ACCESS_REMOTE_READ.rawValue)) else {
            let code = errno
            free(memory)
            throw .call("ibv_reg_mr", device: device.name,
                        detail: "\(Self.registrationError(code, bytes: bytes, what: "the region table", device: device, node: node))")
        }
        self.device = device
        self.node = node
        published = memory
        publishedRegion = region
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
        ibv_dereg_mr(publishedRegion)
        free(published)
        table.deinitialize(count: Self.slotCount)
        table.deallocate()
    }

    /// What a listener of the transport of incarnation `incarnation` sends with an accepted
    /// connection: where the published table is.
    func acceptance(incarnation: UInt64) -> EndpointProtocol.Acceptance {
        EndpointProtocol.Acceptance(tableAddress: UInt64(UInt(bitPattern: published)), tableRKey: publishedRegion.pointee.rkey,
                                    tableEntries: UInt32(Self.slotCount), incarnation: incarnation)
    }

    /// The check word of a published entry.
    @inline(__always)
    static func check(address: UInt64, size: UInt64, rkey: UInt32) -> UInt64 {
        (address ^ (size &* 0x9E37_79B9_7F4A_7C15) ^ (UInt64(rkey) << 17)) ^ 0x4752_5654_4142_4C45  // "GRVTABLE"
    }

    /// A published entry as a peer read it (`raw`: ``entryBytes`` bytes), or nil if it holds no
    /// region, or one still being written.
    static func decodeEntry(_ raw: UnsafeRawPointer) -> (address: UInt64, size: Int, rkey: UInt32)? {
        let address = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
        let size = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        let rkey = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 16, as: UInt32.self))
        let check = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 24, as: UInt64.self))
        guard size > 0, size <= UInt64(Int.max), check == Self.check(address: address, size: size, rkey: rkey) else { return nil }
        return (address, Int(size), rkey)
    }

    /// The table slot of `region`, or nil for an id no transport can address.
    @inline(__always)
    static func slot(_ region: RegionID) -> Int? {
        if let owner = region.mailboxOwner { return owner.index < NodeID.limit ? RegionID.limit + owner.index : nil }
        if let owner = region.leasePageOwner { return owner.index < NodeID.limit ? RegionID.limit + NodeID.limit + owner.index : nil }
        return region.index < RegionID.limit ? region.index : nil
    }

    /// Registers `region` (all of its mapping) with `ibv_reg_mr`; a region already registered is
    /// left as it is, unless `replacing`: then the new mapping is registered and published in
    /// its place (a node's new incarnation in the same process, whose lease page is new memory).
    /// The former registration stays until the transport closes: peers that still read it with
    /// what they cached reach the former memory, never unmapped memory.
    func register(_ region: Region, replacing: Bool = false) throws(TransportError) {
        guard let slot = Self.slot(region.id) else {
            throw .unknownRegion(node: node, region: region.id, reason: "region ids are below \(RegionID.limit)")
        }
        let failure: TransportError? = owners.withLock { owners -> TransportError? in
            if table[slot].load(ordering: .acquiring) != 0, !replacing { return nil }
            guard let memoryRegion = CIBVerbs_ibv_reg_mr(device.protectionDomain, region.base, region.size, remoteAccess) else {
                return Self.registrationError(errno, bytes: region.size, what: "region \(region.id) (\(region.path))",
                                              device: device, node: node)
            }
            let record = UnsafeMutablePointer<Record>.allocate(capacity: 1)
            record.initialize(to: Record(base: region.base, size: region.size, rkey: memoryRegion.pointee.rkey))
            owners.append(Owner(region: region, memoryRegion: memoryRegion, record: record))
            table[slot].store(UInt(bitPattern: record), ordering: .releasing)
            let entry = published + slot * Self.entryBytes
            if replacing {
                // Readers of the entry while it changes see a check word that fits nothing.
                entry.storeBytes(of: UInt64(0), toByteOffset: 24, as: UInt64.self)
                atomicMemoryFence(ordering: .releasing)
            }
            let address = UInt64(UInt(bitPattern: region.base))
            let size = UInt64(region.size)
            let rkey = memoryRegion.pointee.rkey
            entry.storeBytes(of: address.littleEndian, toByteOffset: 0, as: UInt64.self)
            entry.storeBytes(of: size.littleEndian, toByteOffset: 8, as: UInt64.self)
            entry.storeBytes(of: rkey.littleEndian, toByteOffset: 16, as: UInt32.self)
            atomicMemoryFence(ordering: .releasing)
            entry.storeBytes(of: Self.check(address: address, size: size, rkey: rkey).littleEndian, toByteOffset: 24, as: UInt64.self)
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
