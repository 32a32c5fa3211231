import GranaryConfiguration
import GranaryMemory
import GranaryTransport

/// A transaction in its execute phase: reads go to the primaries with one-sided reads, writes,
/// allocations and frees are buffered until commit.
///
/// A `Transaction` is handed to the body of `Node.transaction` (or the engine's `run(_:)`) and must
/// not escape it. Its methods throw ``TransactionError`` for bad input, or an internal abort signal
/// that the engine turns into a retry: a body should let errors from these methods propagate.
public final class Transaction {
    /// The engine, unretained: it creates its transactions and outlives them (a transaction is
    /// used only inside a run of the engine, or by a harness that holds the cluster).
    let engineRef: Unmanaged<Engine>
    /// The engine, retained once for the transaction's lifetime: a `Transaction` kept past its
    /// cluster's shutdown (or its end) still reaches a live engine, which refuses new work with
    /// ``TransactionError/shutDown(_:)`` instead of touching freed memory.
    private let engineOwner: Engine
    /// The engine, for paths off the commit's hot loop. A call through this reference still
    /// retains and releases it, an atomic on a line every thread of the node touches: the commit
    /// phases use ``withEngine(_:)`` instead.
    var engine: Engine { engineRef.takeUnretainedValue() }

    struct ReadEntry {
        let address: GlobalAddress
        let primary: NodeID
        let header: ObjectHeader
        /// Where this attempt's copy of the object's first `lines` lines is, in the read arena.
        var offset: Int
        var lines: Int
    }

    struct WriteEntry {
        let address: GlobalAddress
        let primary: NodeID
        let expected: ObjectHeader
        var new: ObjectHeader
        var operation: EntryOperation
        let lines: Int
        var payloadOffset: Int
        var length: Int
    }

    /// The attempt's mutable state. It lives behind a pointer the transaction owns, because stored
    /// properties of a class pay a dynamic exclusivity check on every access, and these are
    /// touched several times per read and write. A transaction is used by one thread at a time.
    struct State {
        var reads: [ReadEntry] = []
        var readIndex = AddressIndex()
        var writes: [WriteEntry] = []
        var writeIndex = AddressIndex()
        var payloads: [UInt8] = []
        var reservations: [(RegionID, ObjectSlot)] = []
        /// Slots other nodes' primaries reserved for this attempt (this node leads no region).
        var remoteReservations: [RemoteReservation] = []
        /// The primaries of the written objects, as a bit per node (set at LOCK).
        var primaryMask: UInt64 = 0
        /// The backups of the written objects' regions, as a bit per node (set at LOCK).
        var backupMask: UInt64 = 0
        /// The nodes whose logs promised this commit space (``Transaction/promiseLogSpace(engine:waitForRoom:)``),
        /// a bit per node; `promises[n]` is what node n's log promised.
        var promisedMask: UInt64 = 0
        /// `NodeID.limit` words: the bytes each node's log is asked to promise; then twice as many
        /// for sizing the records.
        let promises: UnsafeMutablePointer<Int>
        /// The read arena: every object this attempt read, one copy each (a later read of the
        /// same object, for the same or fewer lines, is served from it: repeatable reads without
        /// another round trip). `snapshot` points at the copy the last read returned.
        var arena: UnsafeMutableRawPointer
        var arenaCapacity: Int
        var arenaUsed: Int = 0
        var snapshot: UnsafeMutableRawPointer
        var recordBuffer: UnsafeMutableRawPointer
        var recordCapacity: Int
        /// A commit that gave up its thread while waiting for LOCK replies (see
        /// ``Transaction/resumeCommit(spinNanoseconds:)``); nil otherwise.
        var waitingLock: WaitingLock?
        /// When this attempt's execute phase began, if its phases are timed (else 0).
        var executeStart: UInt64 = 0
        var attemptCount: UInt64 = 0
        /// The configuration this attempt's records are stamped with: its view's, or, for a
        /// commit admitted while a recovery blocked only the recovering regions, the
        /// configuration being recovered into (every member takes such records for the regions it
        /// does not block; see `CommitGate`). Set when the commit passes the gate.
        var stamp = ConfigurationID(rawValue: 0)
        /// The configuration the attempt runs in (taken when it starts).
        var view: ConfigurationView {
            didSet { viewRef = Unmanaged.passUnretained(view) }
        }
        /// `view`, unretained (it holds the reference).
        var viewRef: Unmanaged<ConfigurationView>

        init(arena: UnsafeMutableRawPointer, recordBuffer: UnsafeMutableRawPointer, capacity: Int, view: ConfigurationView) {
            self.promises = .allocate(capacity: 3 * NodeID.limit)
            self.promises.initialize(repeating: 0, count: 3 * NodeID.limit)
            self.arena = arena
            self.arenaCapacity = capacity
            self.snapshot = arena
            self.recordBuffer = recordBuffer
            self.recordCapacity = capacity
            self.view = view
            self.viewRef = Unmanaged.passUnretained(view)
        }
    }
    let state: UnsafeMutablePointer<State>

    var reads: [ReadEntry] { _read { yield state.pointee.reads } _modify { yield &state.pointee.reads } }
    var readIndex: AddressIndex { _read { yield state.pointee.readIndex } _modify { yield &state.pointee.readIndex } }
    var writes: [WriteEntry] { _read { yield state.pointee.writes } _modify { yield &state.pointee.writes } }
    var writeIndex: AddressIndex { _read { yield state.pointee.writeIndex } _modify { yield &state.pointee.writeIndex } }
    var payloads: [UInt8] { _read { yield state.pointee.payloads } _modify { yield &state.pointee.payloads } }
    var reservations: [(RegionID, ObjectSlot)] { _read { yield state.pointee.reservations } _modify { yield &state.pointee.reservations } }
    var remoteReservations: [RemoteReservation] {
        _read { yield state.pointee.remoteReservations } _modify { yield &state.pointee.remoteReservations }
    }
    var primaryMask: UInt64 { get { state.pointee.primaryMask } set { state.pointee.primaryMask = newValue } }
    var backupMask: UInt64 { get { state.pointee.backupMask } set { state.pointee.backupMask = newValue } }
    var snapshot: UnsafeMutableRawPointer { get { state.pointee.snapshot } set { state.pointee.snapshot = newValue } }
    var recordBuffer: UnsafeMutableRawPointer { get { state.pointee.recordBuffer } set { state.pointee.recordBuffer = newValue } }
    var recordCapacity: Int { get { state.pointee.recordCapacity } set { state.pointee.recordCapacity = newValue } }
    var attemptCount: UInt64 { get { state.pointee.attemptCount } set { state.pointee.attemptCount = newValue } }
    var executeStart: UInt64 { get { state.pointee.executeStart } set { state.pointee.executeStart = newValue } }
    var view: ConfigurationView { _read { yield state.pointee.view } }

    /// Runs `body` with the engine, without reference counting.
    @inline(__always) func withEngine<R>(_ body: (Engine) throws -> R) rethrows -> R {
        try engineRef._withUnsafeGuaranteedRef(body)
    }

    /// Runs `body` with the attempt's configuration view, without reference counting.
    @inline(__always) func withView<R>(_ body: (ConfigurationView) throws -> R) rethrows -> R {
        try state.pointee.viewRef._withUnsafeGuaranteedRef(body)
    }
    /// Engines of this process this coordinator may help while it waits (by node index): held
    /// here so that the unretained references below stay valid for the transaction's lifetime.
    let neighbours: [Engine?]
    /// The same engines, densely and unretained (no reference counting while waiting).
    let neighbourList: UnsafeMutableBufferPointer<Unmanaged<Engine>>
    /// The same engines by node index, unretained.
    let unmanagedNeighbours: UnsafeMutablePointer<Unmanaged<Engine>?>

    init(engine: Engine) {
        self.engineRef = Unmanaged.passUnretained(engine)
        self.engineOwner = engine
        var neighbours = [Engine?](repeating: nil, count: NodeID.limit)
        for (node, peer) in engine.neighbours.withLock({ $0 }) { neighbours[node.index] = peer.engine }
        self.neighbours = neighbours
        // Pointers, not arrays: copying an array out of a class property costs a retain and release.
        let list = neighbours.compactMap { $0.map { Unmanaged.passUnretained($0) } }
        self.neighbourList = .allocate(capacity: list.count)
        _ = self.neighbourList.initialize(from: list)
        self.unmanagedNeighbours = .allocate(capacity: NodeID.limit)
        self.unmanagedNeighbours.initialize(from: neighbours.map { $0.map { Unmanaged.passUnretained($0) } }, count: NodeID.limit)
        state = .allocate(capacity: 1)
        let arena = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 64)
        state.initialize(to: State(arena: arena, recordBuffer: .allocate(byteCount: 4096, alignment: 8), capacity: 4096,
                                   view: engine.view))
    }

    deinit {
        endPromises()
        state.pointee.promises.deallocate()
        neighbourList.deallocate()
        unmanagedNeighbours.deallocate()
        state.pointee.arena.deallocate()
        state.pointee.recordBuffer.deallocate()
        state.deinitialize(count: 1)
        state.deallocate()
    }

    /// Forgets the previous attempt (reservations must already be returned).
    func reset() {
        endPromises()  // (a commit gives back its promises when it ends: nothing is left here)
        // Retained only when the configuration changed (a store retains and releases).
        if !engine.isCurrentView(state.pointee.viewRef) { state.pointee.view = engine.view }
        reads.removeAll(keepingCapacity: true)
        readIndex.removeAll()
        state.pointee.arenaUsed = 0
        writes.removeAll(keepingCapacity: true)
        writeIndex.removeAll()
        payloads.removeAll(keepingCapacity: true)
        reservations.removeAll(keepingCapacity: true)
        remoteReservations.removeAll(keepingCapacity: true)
    }

    /// Whether the attempt has written, allocated or freed anything.
    public var isReadOnly: Bool { writes.isEmpty }

    // MARK: Reads

    /// Reads the object at `address` as a `T`.
    ///
    /// Cost: one one-sided read of the object from its primary (none if this transaction wrote it),
    /// retried while the object is locked by a committing transaction or the read was torn.
    /// - Throws: ``TransactionError/invalidAddress(_:reason:)``, ``TransactionError/notAllocated(_:)``,
    ///   or a conflict that aborts the attempt.
    @inlinable
    public func read<T: BitwiseCopyable>(_ address: GlobalAddress, as type: T.Type = T.self) throws -> T {
        // Inlinable over the raw read, so that callers in other modules get a specialised copy
        // (an unspecialised generic looks up type metadata on every call).
        try withUnsafeTemporaryAllocation(byteCount: max(MemoryLayout<T>.size, 1), alignment: MemoryLayout<T>.alignment) { buffer in
            try read(address, into: UnsafeMutableRawBufferPointer(rebasing: buffer[..<MemoryLayout<T>.size]))
            return buffer.load(as: T.self)
        }
    }

    /// A hint that this transaction will read the first `payloadBytes` payload bytes of the object
    /// at `address` soon: the transport may start fetching its lines without waiting (on shared
    /// memory their cache misses then overlap with those of other prefetched objects). Reads,
    /// validation and commit are unchanged; a bad address is reported by the read, not here.
    ///
    /// Call it for every object a transaction knows it will read before reading the first of them.
    public func prefetch(_ address: GlobalAddress, payloadBytes: Int) {
        guard let primary = view.primary(of: address.region) else { return }
        engine.transport.prefetch(from: primary, address,
                                  length: ObjectLayout.lines(forPayload: payloadBytes) * ObjectLayout.lineSize)
    }

    /// Reads the first `destination.count` payload bytes of the object at `address` (raw: no length
    /// prefix), for fixed-size records that are not Swift types, such as hash-table buckets.
    ///
    /// Cost: as ``read(_:as:)``.
    public func read(_ address: GlobalAddress, into destination: UnsafeMutableRawBufferPointer) throws {
        let count = destination.count
        guard let target = destination.baseAddress else { return }
        if let index = writeIndex[address] {
            let entry = writes[index]
            guard entry.operation != .free else { throw TransactionError.notAllocated(address) }
            target.initializeMemory(as: UInt8.self, repeating: 0, count: count)
            payloads.withUnsafeBytes { source in
                target.copyMemory(from: source.baseAddress! + entry.payloadOffset, byteCount: min(count, entry.length))
            }
            return
        }
        try fetch(address, payloadBytes: count)
        ObjectLayout.gatherPayload(from: snapshot, into: target, count: count)
    }

    /// Buffers a write of raw bytes (no length prefix) to the object at `address`.
    ///
    /// Cost: as ``write(_:_:)``.
    public func write(_ address: GlobalAddress, raw bytes: UnsafeRawBufferPointer) throws {
        try buffer(address, bytes)
    }

    /// Reads a variable-size object written with ``write(_:bytes:)`` or ``allocate(bytes:)``.
    ///
    /// Cost: one one-sided read for objects up to 52 bytes, two for larger ones.
    public func read(_ address: GlobalAddress) throws -> [UInt8] {
        if let index = writeIndex[address] {
            let entry = writes[index]
            guard entry.operation != .free else { throw TransactionError.notAllocated(address) }
            let length = Int(payloads.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: entry.payloadOffset, as: UInt32.self) })
            return Array(payloads[(entry.payloadOffset + 4)..<(entry.payloadOffset + 4 + length)])
        }
        try fetch(address, payloadBytes: ObjectLayout.payloadPerLine)
        var length = Int(snapshot.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
        if 4 + length > ObjectLayout.payloadPerLine {
            // The first line told the length; read the whole object (its version must not change).
            try fetch(address, payloadBytes: 4 + length)
            length = Int(snapshot.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
        }
        var bytes = [UInt8](repeating: 0, count: 4 + length)
        bytes.withUnsafeMutableBytes { ObjectLayout.gatherPayload(from: snapshot, into: $0.baseAddress!, count: 4 + length) }
        return Array(bytes[4...])
    }

    /// One-sided read of the first lines of the object at `address` into `snapshot`, checked.
    @discardableResult
    func fetch(_ address: GlobalAddress, payloadBytes: Int) throws -> ObjectHeader {
        guard let primary = view.primary(of: address.region) else {
            throw TransactionError.invalidAddress(address, reason: "region \(address.region) is not in \(view.configuration.id)")
        }
        guard address.offset % UInt32(ObjectLayout.lineSize) == 0 else {
            throw TransactionError.invalidAddress(address, reason: "objects start on a 64-byte boundary")
        }
        let lines = ObjectLayout.lines(forPayload: payloadBytes)
        let bytes = lines * ObjectLayout.lineSize
        if lines > 1, let replica = view.replica(address.region), Int(address.offset) < replica.size {
            // A replica here knows the slab's size class (final once set): a read longer than the
            // object is refused before anything past it is read. One load from the slab table.
            let slabClass = Int(replica.base.load(
                fromByteOffset: SlabLayout.tableOffset + (Int(address.offset) >> replica.layout.slabShift) * 2, as: UInt16.self))
            if slabClass != 0 && slabClass < lines {
                try checkSlot(address, holds: lines, payloadBytes: payloadBytes, slotLines: slabClass)
            }
        }
        let known = readIndex[address]
        if let known, reads[known].lines >= lines {
            // Read before in this attempt: the same bytes again (its version is checked at commit).
            snapshot = state.pointee.arena + reads[known].offset
            guard Self.isLive(reads[known].header, at: address) else { throw TransactionError.notAllocated(address) }
            return reads[known].header
        }
        let offset = state.pointee.arenaUsed
        if offset + bytes > state.pointee.arenaCapacity {
            // Grow; copies are found by offset, so they move along.
            let capacity = max(offset + bytes, state.pointee.arenaCapacity * 2)
            let grown = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 64)
            grown.copyMemory(from: state.pointee.arena, byteCount: offset)
            state.pointee.arena.deallocate()
            state.pointee.arena = grown
            state.pointee.arenaCapacity = capacity
        }
        snapshot = state.pointee.arena + offset
        var backoff = Backoff(maximumSleepMicroseconds: 20)
        var checkedSlot = false
        for _ in 0..<engine.readAttempts {
            do {
                try engine.transport.readObject(from: primary, address, into: UnsafeMutableRawBufferPointer(start: snapshot, count: bytes))
            } catch {
                if case .outOfBounds = error {
                    throw TransactionError.invalidAddress(address, reason: "beyond the end of region \(address.region)")
                }
                throw TransactionError.transport(error)
            }
            switch ObjectLayout.check(snapshot: snapshot, lines: lines) {
            case .consistent(let header):
                // An absence is a read too: it enters the read set at the header seen, so that
                // commit (or the error's validation, see Engine.attempt) checks it still holds.
                if let known {
                    guard reads[known].header == header else { throw AbortSignal(cause: .inconsistentRead) }
                    reads[known].offset = offset
                    reads[known].lines = lines
                } else {
                    readIndex.append(address)
                    reads.append(ReadEntry(address: address, primary: primary, header: header, offset: offset, lines: lines))
                }
                state.pointee.arenaUsed = offset + bytes
                guard Self.isLive(header, at: address) else { throw TransactionError.notAllocated(address) }
                return header
            case .torn where lines > 1 && !checkedSlot:
                // Torn, or longer than the object (its next lines are another slot's): ask the
                // primary's slab table once.
                checkedSlot = true
                try checkSlot(address, holds: lines, payloadBytes: payloadBytes, slotLines: remoteSlotLines(address, primary: primary))
                backoff.pause()
            case .locked, .torn:
                backoff.pause()
            }
        }
        throw AbortSignal(cause: .readLocked)
    }

    /// Throws ``TransactionError/invalidAddress(_:reason:)`` if a slot of `slotLines` lines (when
    /// known) is shorter than a read of `lines` lines.
    private func checkSlot(_ address: GlobalAddress, holds lines: Int, payloadBytes: Int, slotLines: Int?) throws {
        guard let slotLines, slotLines < lines else { return }
        throw TransactionError.invalidAddress(
            address, reason: "a read of \(payloadBytes) bytes is longer than the object (at most \(ObjectLayout.payloadCapacity(lines: slotLines)) bytes)")
    }

    /// The lines of the slot at `address` by its primary's slab table (two small one-sided
    /// reads: the region's slab size from its header, then the table entry); nil if unknown.
    private func remoteSlotLines(_ address: GlobalAddress, primary: NodeID) -> Int? {
        var shift: UInt32 = 0
        var entry: UInt16 = 0
        do {
            try withUnsafeMutableBytes(of: &shift) { buffer in
                try engine.transport.read(from: primary, GlobalAddress(region: address.region, offset: UInt32(RegionFormat.slabShiftOffset)), into: buffer)
            }
            guard shift >= UInt32(SlabLayout.minimumSlabShift), shift <= UInt32(SlabLayout.maximumSlabShift) else { return nil }
            let table = SlabLayout.tableOffset + (Int(address.offset) >> Int(shift)) * 2
            try withUnsafeMutableBytes(of: &entry) { buffer in
                try engine.transport.read(from: primary, GlobalAddress(region: address.region, offset: UInt32(table)), into: buffer)
            }
        } catch {
            return nil
        }
        return entry == 0 ? nil : Int(entry)
    }

    // MARK: Writes

    /// Buffers a write of `value` to the object at `address`; it reaches the replicas at commit.
    ///
    /// Cost: nothing now if the object was read or written before in this transaction, else one
    /// one-sided read of its first line (to learn the version to lock at).
    @inlinable
    public func write<T: BitwiseCopyable>(_ address: GlobalAddress, _ value: T) throws {
        try withUnsafeBytes(of: value) { try write(address, raw: $0) }
    }

    /// Buffers a write of a variable-size object (stored with a 4-byte length prefix).
    public func write(_ address: GlobalAddress, bytes: [UInt8]) throws {
        try Self.prefixed(bytes).withUnsafeBytes { try buffer(address, $0) }
    }

    static func prefixed(_ bytes: [UInt8]) -> [UInt8] {
        withUnsafeBytes(of: UInt32(bytes.count).littleEndian) { Array($0) } + bytes
    }

    func buffer(_ address: GlobalAddress, _ bytes: UnsafeRawBufferPointer) throws {
        if let index = writeIndex[address] {
            guard writes[index].operation != .free else { throw TransactionError.notAllocated(address) }
            guard bytes.count <= ObjectLayout.payloadCapacity(lines: max(writes[index].lines, ObjectLayout.lines(forPayload: bytes.count))) else {
                throw TransactionError.tooLarge(bytes: bytes.count, maximum: ObjectLayout.payloadCapacity(lines: writes[index].lines))
            }
            writes[index].payloadOffset = payloads.count
            writes[index].length = bytes.count
            payloads.append(contentsOf: bytes)
            return
        }
        let (header, primary) = try versionToLock(address)
        writeIndex.append(address)
        writes.append(WriteEntry(address: address, primary: primary, expected: header, new: header.nextVersion,
                                 operation: .write, lines: 0, payloadOffset: payloads.count, length: bytes.count))
        payloads.append(contentsOf: bytes)
    }

    /// The header a write or free of `address` locks at, and its primary: the version this
    /// transaction read, or one read of the object's first line.
    private func versionToLock(_ address: GlobalAddress) throws -> (ObjectHeader, NodeID) {
        if let index = readIndex[address] {
            guard Self.isLive(reads[index].header, at: address) else { throw TransactionError.notAllocated(address) }
            return (reads[index].header, reads[index].primary)
        }
        let header = try fetch(address, payloadBytes: 1)
        return (header, view.primary(of: address.region)!)
    }

    // MARK: Allocation

    /// Allocates a new object holding `value` in a region whose primary is this node, round-robin.
    /// The object exists for other transactions once this one commits; an abort returns the slot.
    ///
    /// Cost: no round trip (the local primary's allocator reserves the slot).
    /// - Throws: ``TransactionError/tooLarge(bytes:maximum:)``, ``TransactionError/outOfMemory(bytes:reason:)``.
    @inlinable
    public func allocate<T: BitwiseCopyable>(_ value: T) throws -> GlobalAddress {
        try withUnsafeBytes(of: value) { try allocate(raw: $0) }
    }

    /// Allocates a variable-size object (read it back with ``read(_:)``).
    public func allocate(bytes: [UInt8]) throws -> GlobalAddress {
        try Self.prefixed(bytes).withUnsafeBytes { try allocate(raw: $0) }
    }

    /// Allocates a new object holding raw bytes (no length prefix); see ``allocate(_:)``.
    public func allocate(raw bytes: UnsafeRawBufferPointer) throws -> GlobalAddress {
        let regions = view.allocationRegions
        // A node that leads no region (a client, or a node that came back with backups only)
        // allocates at other nodes' primaries; when all are full, a node that can hold regions
        // asks for one of its own (regions on demand), as one whose own regions are full does.
        guard !regions.isEmpty else {
            do {
                return try allocateRemotely(raw: bytes)
            } catch TransactionError.outOfMemory(_, let reason) where !(view.configuration.members.first { $0.node == engine.node }?.client ?? true) {
                try engine.requestRegion(seenIn: view.configurationID, bytes: bytes.count, full: reason)
                throw AbortSignal(cause: .wrongConfiguration)
            }
        }
        let start = engine.allocationCursor.wrappingAdd(1, ordering: .relaxed).oldValue
        var lastError: AllocationError?
        for step in 0..<regions.count {
            let region = regions[(start &+ step) % regions.count]
            guard let replica = view.localReplica(region), let allocator = replica.allocator else { continue }
            let slot: ObjectSlot
            do {
                slot = try allocator.reserve(payloadBytes: bytes.count)
            } catch {
                if case .objectTooLarge(let size, let maximum) = error {
                    throw TransactionError.tooLarge(bytes: size, maximum: maximum)
                }
                lastError = error
                continue
            }
            reservations.append((region, slot))
            let header = ObjectLayout.loadHeader(replica.region.base + slot.offset).unlocked
            // The address carries the slot's incarnation: once the object is freed (the
            // incarnation changes), reads through it fail instead of finding a later object.
            let address = GlobalAddress(region: region, offset: UInt32(slot.offset), incarnation: header.incarnation)
            writeIndex.append(address)
            writes.append(WriteEntry(address: address, primary: engine.node, expected: header, new: header.allocating,
                                     operation: .allocate, lines: slot.lines, payloadOffset: payloads.count, length: bytes.count))
            payloads.append(contentsOf: bytes)
            return address
        }
        let full = lastError?.description ?? "no region has room"
        // Regions on demand: ask for a region of this node's, then run the attempt again in the
        // configuration that has it (this one's view does not route to the new region).
        try engine.requestRegion(seenIn: view.configurationID, bytes: bytes.count, full: full)
        throw AbortSignal(cause: .wrongConfiguration)
    }

    /// Frees the object at `address` when the transaction commits: its slot's incarnation changes, so
    /// any transaction that read it aborts, and reads of it fail with ``TransactionError/notAllocated(_:)``.
    /// Its payload is zeroed on every replica.
    ///
    /// Cost: as ``write(_:_:)``.
    public func free(_ address: GlobalAddress) throws {
        if let index = writeIndex[address] {
            switch writes[index].operation {
            case .free:
                throw TransactionError.notAllocated(address)
            case .allocate:
                // Allocated and freed in one transaction: it never existed.
                if let reservation = reservations.firstIndex(where: { $0.0 == address.region && $0.1.offset == Int(address.offset) }) {
                    let (region, slot) = reservations.remove(at: reservation)
                    view.localReplica(region)?.allocator?.unreserve(slot)
                } else if let reservation = remoteReservations.firstIndex(where: { $0.address.untagged == address.untagged }) {
                    releaseRemote(remoteReservations.remove(at: reservation))
                }
                writes.remove(at: index)
                writeIndex.rebuild(writes.map(\.address))
            case .write:
                writes[index].operation = .free
                writes[index].new = writes[index].expected.freeing
                writes[index].length = 0
            }
            return
        }
        let (header, primary) = try versionToLock(address)
        writeIndex.append(address)
        writes.append(WriteEntry(address: address, primary: primary, expected: header, new: header.freeing,
                                 operation: .free, lines: 0, payloadOffset: payloads.count, length: 0))
    }

    /// Whether `header` is a live object for `address`: allocated, and of the incarnation the
    /// address was allocated with, if it carries one.
    @inline(__always) static func isLive(_ header: ObjectHeader, at address: GlobalAddress) -> Bool {
        guard header.isAllocated else { return false }
        guard let incarnation = address.incarnation else { return true }
        return header.incarnation == incarnation
    }

    /// Returns every slot reserved by this attempt (after an abort).
    func returnReservations() {
        for (region, slot) in reservations { view.localReplica(region)?.allocator?.unreserve(slot) }
        reservations.removeAll(keepingCapacity: true)
        returnRemoteReservations()
    }
}

/// Positions of addresses in a read or write set: a linear scan while the set is small (the common
/// case, with no hashing), a dictionary beyond that.
struct AddressIndex {
    private var addresses: [UInt64] = []
    private var large: [UInt64: Int] = [:]
    private static let linearLimit = 16

    /// Keyed by the slot (``GlobalAddress/untagged``): an object read through its allocated
    /// address and through its slot's is one entry.
    subscript(address: GlobalAddress) -> Int? {
        let key = address.untagged.rawValue
        if addresses.count <= Self.linearLimit {
            var index = 0
            while index < addresses.count {
                if addresses[index] == key { return index }
                index += 1
            }
            return nil
        }
        return large[key]
    }

    /// Records `address` at the next position.
    mutating func append(_ address: GlobalAddress) {
        let key = address.untagged.rawValue
        addresses.append(key)
        if addresses.count == Self.linearLimit + 1 {
            for (index, raw) in addresses.enumerated() { large[raw] = index }
        } else if addresses.count > Self.linearLimit + 1 {
            large[key] = addresses.count - 1
        }
    }

    mutating func removeAll() {
        addresses.removeAll(keepingCapacity: true)
        if !large.isEmpty { large.removeAll(keepingCapacity: true) }
    }

    mutating func rebuild(_ list: [GlobalAddress]) {
        removeAll()
        for address in list { append(address) }
    }
}
