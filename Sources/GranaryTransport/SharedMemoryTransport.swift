import GranaryMemory
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The one-sided transport between nodes on one host: every node's regions are files, and a
/// one-sided operation is a copy or an atomic instruction the caller performs on its own mapping of
/// the peer's file. The peer's CPU never runs.
///
/// A peer is known by its *endpoint*, the directory holding its region files. Mappings are opened on
/// first use and kept; the lookup on every operation is one acquire load from a flat table (no lock,
/// no reference counting).
///
/// Works with several nodes in one process (one transport per node) and across processes.
///
/// `@unchecked Sendable`: the mapping table is written only under `mappingLock` and published with
/// release stores; readers use acquire loads. Published entries are never changed or freed before
/// `deinit`, and the `Region`s that own the mapped memory are kept alive in `state`.
public final class SharedMemoryTransport: Transport, @unchecked Sendable {
    public let localNode: NodeID
    /// The cluster whose region files this transport maps: a peer's file of another cluster is refused.
    public let cluster: ClusterID

    /// A published mapping: immutable once its address is in the table.
    @usableFromInline struct Mapping {
        @usableFromInline let base: UnsafeMutableRawPointer
        @usableFromInline let size: Int
    }

    /// Per node: its data regions, then one slot per mailbox owner, then one per lease-page owner.
    @usableFromInline static let slotsPerNode = RegionID.limit + 2 * NodeID.limit
    @usableFromInline let table: UnsafeMutablePointer<Atomic<UInt>>
    private let tableCount = NodeID.limit * SharedMemoryTransport.slotsPerNode

    private struct State {
        var endpoints: [NodeID: RegionDirectory] = [:]
        var regions: [Region] = []
        var mappings: [UnsafeMutablePointer<Mapping>] = []
    }
    private let state = Mutex(State())

    /// Creates the transport for `localNode`, whose own regions live in `directory`.
    public init(localNode: NodeID, cluster: ClusterID, directory: RegionDirectory) {
        self.localNode = localNode
        self.cluster = cluster
        // calloc: the table is large and sparse; zero pages are mapped lazily. An all-zero
        // Atomic<UInt> is a valid "not mapped" entry.
        let raw = calloc(NodeID.limit * Self.slotsPerNode, MemoryLayout<Atomic<UInt>>.stride)!
        self.table = raw.bindMemory(to: Atomic<UInt>.self, capacity: NodeID.limit * Self.slotsPerNode)
        state.withLock { $0.endpoints[localNode] = directory }
    }

    deinit {
        state.withLock { state in
            for mapping in state.mappings { mapping.deallocate() }
        }
        free(table)
    }

    /// Adds (or re-points) the peer `node`, whose region files are in `endpoint`.
    public func addPeer(_ node: NodeID, endpoint: RegionDirectory) {
        state.withLock { $0.endpoints[node] = endpoint }
    }

    /// Forgets the mappings of `node`'s data regions and of its lease page: a node that left the
    /// configuration and joins again is a new process with new region files (its old ones set
    /// aside) and a new lease page, so the next access opens them anew. The old mappings stay
    /// until the transport goes, since a thread may still be reading through one.
    public func forgetRegions(of node: NodeID) {
        guard node != localNode, node.index < NodeID.limit else { return }
        state.withLock { _ in
            for region in 0..<RegionID.limit { table[node.index * Self.slotsPerNode + region].store(0, ordering: .releasing) }
            table[node.index * Self.slotsPerNode + RegionID.limit + NodeID.limit + node.index].store(0, ordering: .releasing)
        }
    }

    /// The nodes this transport can reach.
    public var peers: [NodeID] { state.withLock { $0.endpoints.keys.sorted() } }

    public func register(_ region: Region) throws(TransportError) {
        let slot = try Self.slot(node: localNode, region: region.id)
        state.withLock { state in
            publish(region, at: slot, in: &state)
        }
    }

    /// Uses `region`, already mapped in this process by `node`'s own storage, as this transport's
    /// view of that node's replica (an embedded cluster shares one mapping per file instead of
    /// mapping every file once per node, which saves page faults and TLB reach).
    ///
    /// - Throws: ``TransportError/unknownRegion(node:region:reason:)`` if the region belongs to
    ///   another cluster.
    public func adopt(_ region: Region, of node: NodeID) throws(TransportError) {
        guard region.cluster == cluster else {
            throw .unknownRegion(node: node, region: region.id, reason: "it belongs to \(region.cluster), not \(cluster)")
        }
        let slot = try Self.slot(node: node, region: region.id)
        state.withLock { state in publish(region, at: slot, in: &state) }
    }

    @inlinable static func slot(node: NodeID, region: RegionID) throws(TransportError) -> Int {
        guard node.index < NodeID.limit else { throw .unknownNode(node) }
        let regionSlot: Int
        if let owner = region.mailboxOwner, owner.index < NodeID.limit {
            regionSlot = RegionID.limit + owner.index
        } else if let owner = region.leasePageOwner, owner.index < NodeID.limit {
            regionSlot = RegionID.limit + NodeID.limit + owner.index
        } else if region.index < RegionID.limit {
            regionSlot = region.index
        } else {
            throw .unknownRegion(node: node, region: region, reason: "region ids are below \(RegionID.limit)")
        }
        return node.index * slotsPerNode + regionSlot
    }

    private func publish(_ region: Region, at slot: Int, in state: inout State) {
        if table[slot].load(ordering: .acquiring) != 0 { return }
        let mapping = UnsafeMutablePointer<Mapping>.allocate(capacity: 1)
        mapping.initialize(to: Mapping(base: region.base, size: region.size))
        state.regions.append(region)
        state.mappings.append(mapping)
        table[slot].store(UInt(bitPattern: mapping), ordering: .releasing)
    }

    /// This node's own mapping of one of its regions (the memory its CPU works on directly).
    public func localPointer(_ region: RegionID) throws(TransportError) -> UnsafeMutableRawPointer {
        try mapping(localNode, region).pointee.base
    }

    /// The mapping of `region` on `node`, opening the peer's file on first use.
    @inlinable
    func mapping(_ node: NodeID, _ region: RegionID) throws(TransportError) -> UnsafePointer<Mapping> {
        let slot = try Self.slot(node: node, region: region)
        let bits = table[slot].load(ordering: .acquiring)
        if bits != 0 { return UnsafePointer(bitPattern: bits)! }
        return try openMapping(node, region, slot)
    }

    @usableFromInline
    func openMapping(_ node: NodeID, _ region: RegionID, _ slot: Int) throws(TransportError) -> UnsafePointer<Mapping> {
        let result: Result<UnsafePointer<Mapping>, TransportError> = state.withLock { state in
            let bits = table[slot].load(ordering: .acquiring)
            if bits != 0 { return .success(UnsafePointer(bitPattern: bits)!) }
            guard let endpoint = state.endpoints[node] else { return .failure(.unknownNode(node)) }
            do {
                let opened = try endpoint.open(region, cluster: cluster)
                publish(opened, at: slot, in: &state)
                return .success(UnsafePointer(bitPattern: table[slot].load(ordering: .acquiring))!)
            } catch {
                return .failure(.unknownRegion(node: node, region: region, reason: "\(error)"))
            }
        }
        return try result.get()
    }

    public func mappedAddress(of address: GlobalAddress, on node: NodeID, length: Int) -> UnsafeMutableRawPointer? {
        try? resolve(node, address, length)
    }

    /// The incarnation word of `node`'s mailbox (``ChannelFormat/incarnationOffset``): one more
    /// each time a process opens the mailbox file again; 0 while it cannot be mapped.
    public func peerGeneration(of node: NodeID) -> UInt64 {
        guard let word = try? resolve(node, GlobalAddress(region: .mailbox(of: node), offset: UInt32(ChannelFormat.incarnationOffset)), 8) else {
            return 0
        }
        return word.assumingMemoryBound(to: Atomic<UInt64>.self).pointee.load(ordering: .acquiring)
    }

    /// Resolves an access of `length` bytes at `address` on `node` to a local pointer.
    @inlinable
    func resolve(_ node: NodeID, _ address: GlobalAddress, _ length: Int) throws(TransportError) -> UnsafeMutableRawPointer {
        let mapping = try self.mapping(node, address.region)
        let offset = Int(address.offset)
        guard length >= 0, offset <= mapping.pointee.size &- length else {
            throw .outOfBounds(node: node, address: address, length: length, regionSize: mapping.pointee.size)
        }
        return mapping.pointee.base + offset
    }

    @inlinable
    func resolveWord(_ node: NodeID, _ address: GlobalAddress, _ operation: String) throws(TransportError) -> UnsafeMutablePointer<Atomic<UInt64>> {
        guard address.offset & 7 == 0 else { throw .misaligned(node: node, address: address, operation: operation) }
        return try resolve(node, address, 8).assumingMemoryBound(to: Atomic<UInt64>.self)
    }

    @inlinable
    public func read(from node: NodeID, _ address: GlobalAddress, into buffer: UnsafeMutableRawBufferPointer) throws(TransportError) {
        let source = try resolve(node, address, buffer.count)
        guard let destination = buffer.baseAddress else { return }
        Self.copyOut(source, destination, buffer.count)
    }

    /// Starts fetching the lines of the `length` bytes at `address` on `node` into this core's
    /// cache (`CacheLines.prefetch(_:count:)`), without waiting for them. An address outside the
    /// node's regions is ignored.
    @inlinable
    public func prefetch(from node: NodeID, _ address: GlobalAddress, length: Int) {
        guard length > 0, let start = try? resolve(node, address, length) else { return }
        CacheLines.prefetch(start, count: length)
    }

    /// An object read: whole lines of one object are copied under its header
    /// (`ObjectLayout.copyObject(from:to:lines:)`); anything else as ``read(from:_:into:)``.
    @inlinable
    public func readObject(from node: NodeID, _ address: GlobalAddress, into buffer: UnsafeMutableRawBufferPointer) throws(TransportError) {
        let source = try resolve(node, address, buffer.count)
        guard let destination = buffer.baseAddress else { return }
        let count = buffer.count
        if count > 0, (UInt(bitPattern: source) | UInt(bitPattern: count)) & UInt(ObjectLayout.lineSize - 1) == 0,
           UInt(bitPattern: destination) & 7 == 0 {
            ObjectLayout.copyObject(from: source, to: destination, lines: count / ObjectLayout.lineSize)
        } else {
            Self.copyOut(source, destination, count)
        }
    }

    @inlinable
    public func write(to node: NodeID, _ address: GlobalAddress, from buffer: UnsafeRawBufferPointer) throws(TransportError) {
        let destination = try resolve(node, address, buffer.count)
        guard let source = buffer.baseAddress else { return }
        Self.copyIn(source, destination, buffer.count)
    }

    @inlinable
    public func compareAndSwap(at node: NodeID, _ address: GlobalAddress, expected: UInt64, desired: UInt64) throws(TransportError) -> UInt64 {
        let word = try resolveWord(node, address, "compare-and-swap")
        return word.pointee.compareExchange(expected: expected, desired: desired,
                                            successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring).original
    }

    @inlinable
    public func fetchAndAdd(at node: NodeID, _ address: GlobalAddress, _ delta: UInt64) throws(TransportError) -> UInt64 {
        let word = try resolveWord(node, address, "fetch-and-add")
        return word.pointee.wrappingAdd(delta, ordering: .acquiringAndReleasing).oldValue
    }

    public func execute(_ batch: inout OperationBatch) throws(TransportError) {
        // Shared memory completes each operation as it is issued; the batch still resolves every
        // address before touching memory, so a bad address fails the batch before any side effect.
        for index in 0..<batch.count {
            let op = batch[index]
            switch op.kind {
            case .compareAndSwap: _ = try resolveWord(op.node, op.address, "compare-and-swap")
            case .fetchAndAdd: _ = try resolveWord(op.node, op.address, "fetch-and-add")
            case .read, .write: _ = try resolve(op.node, op.address, op.length)
            }
        }
        for index in 0..<batch.count {
            let op = batch[index]
            switch op.kind {
            case .read:
                if let buffer = op.buffer { Self.copyOut(try resolve(op.node, op.address, op.length), buffer, op.length) }
            case .write:
                if let buffer = op.buffer { Self.copyIn(buffer, try resolve(op.node, op.address, op.length), op.length) }
            case .compareAndSwap:
                batch[index].result = try compareAndSwap(at: op.node, op.address, expected: op.operand, desired: op.desired)
            case .fetchAndAdd:
                batch[index].result = try fetchAndAdd(at: op.node, op.address, op.operand)
            }
        }
    }

    /// A read: whole aligned cache lines line by line (each line whole), anything else by memcpy;
    /// then an acquire fence, so what the caller does next is ordered after the read.
    @inlinable
    static func copyOut(_ source: UnsafeRawPointer, _ destination: UnsafeMutableRawPointer, _ count: Int) {
        let lineMask = ObjectLayout.lineSize - 1
        if (UInt(bitPattern: source) | UInt(bitPattern: count)) & UInt(lineMask) == 0,
           UInt(bitPattern: destination) & 7 == 0 {
            ObjectLayout.copyLines(from: source, to: destination, lines: count / ObjectLayout.lineSize)
        } else if count == 8, (UInt(bitPattern: source) | UInt(bitPattern: destination)) & 7 == 0 {
            destination.storeBytes(
                of: source.assumingMemoryBound(to: Atomic<UInt64>.self).pointee.load(ordering: .acquiring),
                as: UInt64.self)
        } else {
            memcpy(destination, source, count)
        }
        atomicMemoryFence(ordering: .acquiring)
    }

    /// A write: the last 8-byte word of an aligned write is stored last, with release ordering, as
    /// the final bytes of an RDMA WRITE land last.
    @inlinable
    static func copyIn(_ source: UnsafeRawPointer, _ destination: UnsafeMutableRawPointer, _ count: Int) {
        if count >= 8, (UInt(bitPattern: destination) | UInt(bitPattern: count)) & 7 == 0 {
            if count > 8 { memcpy(destination, source, count - 8) }
            let last = (source + count - 8).loadUnaligned(as: UInt64.self)
            (destination + count - 8).assumingMemoryBound(to: Atomic<UInt64>.self).pointee.store(last, ordering: .releasing)
        } else {
            atomicMemoryFence(ordering: .releasing)
            memcpy(destination, source, count)
            atomicMemoryFence(ordering: .releasing)
        }
    }
}
