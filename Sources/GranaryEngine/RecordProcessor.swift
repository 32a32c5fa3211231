import GranaryConfiguration
import GranaryMemory
import GranaryTransport
import Synchronization

/// The node-side half of the commit protocol: what the poller does with each record in its mailbox.
/// As a primary it locks (LOCK), installs (COMMIT-PRIMARY) and unlocks (ABORT); as a backup it keeps
/// COMMIT-BACKUP records and applies them at TRUNCATE.
///
/// `@unchecked Sendable`: everything but the two published counters is touched only while holding
/// the engine mailbox's poll claim (``Engine/pollOnce()``); `engine` is set once before any polling.
final class RecordProcessor: @unchecked Sendable {
    /// The processor's mutable state, behind a pointer it owns: stored `var`s of a class pay a
    /// dynamic exclusivity check on every access, and these are touched several times per record.
    private struct State: ~Copyable {
        unowned(unsafe) var engine: Engine? = nil
        /// The engine's reply slots and install policy, copied when `engine` is set: a call through
        /// `engine` retains and releases it.
        var replies: Unmanaged<ReplySlots>? = nil
        var persistEveryInstall = false
        var brokenChannels: UInt64 = 0
        // Small to start (they grow): in flight are a few LOCK records per coordinator thread and
        // a truncation batch or two of COMMIT-BACKUP records, and a large sparse table misses the cache.
        var locked = TransactionTable(minimumCapacity: 64)
        var stashed = TransactionTable(minimumCapacity: 256)
        var kept = RecordPool()
        var deferred: [DeferredEntry] = []
        var unsent = [[[UInt8]]](repeating: [], count: NodeID.limit)
    }
    private let state: UnsafeMutablePointer<State> = {
        let state = UnsafeMutablePointer<State>.allocate(capacity: 1)
        state.initialize(to: State())
        return state
    }()

    /// The engine this processor serves (set once, before any polling).
    var engine: Engine {
        get { state.pointee.engine.unsafelyUnwrapped }
        set {
            state.pointee.engine = newValue
            state.pointee.replies = Unmanaged.passUnretained(newValue.replies)
            state.pointee.persistEveryInstall = newValue.persistEveryInstall
        }
    }
    /// Whether locks are held here for coordinators (non-zero) and whether backup records await
    /// truncation, for ``Engine/isQuiescent``. Only zero versus non-zero is kept exact: storing
    /// every change would move the counters' cache line between the helping cores on every record.
    let pendingCount = Atomic<Int>(0)
    let stashedCount = Atomic<Int>(0)

    @inline(__always) private func publish(_ counter: borrowing Atomic<Int>, _ value: Int) {
        if (counter.load(ordering: .relaxed) == 0) != (value == 0) { counter.store(value, ordering: .releasing) }
    }

    /// An entry of a kept COMMIT-BACKUP record, its payload borrowed from the record.
    struct BackupEntry {
        let address: GlobalAddress
        let new: ObjectHeader
        let lines: Int
        let operation: EntryOperation
        let payload: UnsafeRawBufferPointer

        func owned() -> DeferredEntry {
            DeferredEntry(address: address, new: new, lines: lines, operation: operation, payload: Array(payload))
        }
    }

    /// A truncated entry waiting for its object's slab to be known here, with its own payload copy.
    struct DeferredEntry {
        let address: GlobalAddress
        let new: ObjectHeader
        let lines: Int
        let operation: EntryOperation
        let payload: [UInt8]

        func apply(_ body: (BackupEntry) -> Bool) -> Bool {
            payload.withUnsafeBytes { bytes in
                body(BackupEntry(address: address, new: new, lines: lines, operation: operation, payload: bytes))
            }
        }
    }

    /// Bit n: the ring of node n held bytes that are not records from it; it is no longer polled.
    var brokenChannels: UInt64 { get { state.pointee.brokenChannels } set { state.pointee.brokenChannels = newValue } }
    /// Bit n: poll the ring of node n (every node that was ever a member).
    let channelsInUse = Atomic<UInt64>(0)
    /// LOCK records whose objects this primary holds locked, until COMMIT-PRIMARY or ABORT: the
    /// record's copy in ``kept`` (with each entry's slot after it).
    private var locked: TransactionTable { _read { yield state.pointee.locked } _modify { yield &state.pointee.locked } }
    /// COMMIT-BACKUP records this backup keeps until TRUNCATE: their copies in ``kept``.
    private var stashed: TransactionTable { _read { yield state.pointee.stashed } _modify { yield &state.pointee.stashed } }
    /// Record copies, in buffers reused from record to record (no allocation once warm).
    private var kept: RecordPool { _read { yield state.pointee.kept } _modify { yield &state.pointee.kept } }
    /// Truncated entries for objects whose allocation has not reached this backup yet (records of
    /// different coordinators arrive in any order); applied once it has.
    private var deferred: [DeferredEntry] { _read { yield state.pointee.deferred } _modify { yield &state.pointee.deferred } }
    private let replyBuffer = UnsafeMutableRawPointer.allocate(byteCount: RecordFormat.headerBytes, alignment: 8)

    deinit {
        replyBuffer.deallocate()
        state.deinitialize(count: 1)
        state.deallocate()
    }

    func handle(from sender: NodeID, _ bytes: UnsafeRawBufferPointer, view: ConfigurationView) {
        let record: RecordView
        do {
            record = try RecordView(bytes)
        } catch {
            engine.statistics.rejected()
            engine.logger.info("rejected a record from \(sender): \(error)")
            return
        }
        guard view.isMember(sender) else {
            // Precise membership: a node outside the configuration changes nothing here.
            engine.statistics.rejected()
            engine.logger.info("rejected a \(record.kind) record from \(sender), which is not a member of \(view.configuration.id)")
            if record.kind == .lock { reply(to: record.transaction, failure: .wrongConfiguration, view: view) }
            return
        }
        guard record.configuration == view.configurationID else {
            if record.kind == .lockReply, record.cause == AbortCause.wrongConfiguration.rawValue {
                // A primary in another configuration refused our LOCK: the waiting coordinator must
                // learn it (its own configuration is the stale one, or the primary's is).
                engine.replies.deliver(record.transaction, failure: record.cause)
                return
            }
            engine.statistics.rejected()
            let error = ConfigurationError.wrongConfiguration(found: record.configuration, expected: view.configuration.id, from: sender)
            engine.logger.info("\(error)")
            if record.kind == .lock { reply(to: record.transaction, failure: .wrongConfiguration, view: view) }
            return
        }
        do {
            switch record.kind {
            case .lock: try lock(record, raw: bytes, view: view)
            case .lockReply: state.pointee.replies.unsafelyUnwrapped._withUnsafeGuaranteedRef { $0.deliver(record.transaction, failure: record.cause) }
            case .commitPrimary: commitPrimary(record.transaction, view: view)
            case .abort: abort(record.transaction, view: view)
            case .commitBackup: try commitBackup(record, raw: bytes, view: view)
            case .truncate: try truncate(record, view: view)
            }
        } catch {
            engine.statistics.rejected()
            engine.logger.info("rejected a \(record.kind) record of \(record.transaction) from \(sender): \(error)")
        }
    }

    /// Replies that found their channel busy or full, in order, per coordinator node.
    private var unsent: [[[UInt8]]] { _read { yield state.pointee.unsent } _modify { yield &state.pointee.unsent } }
    let unsentCount = Atomic<Int>(0)

    /// Answers a LOCK without ever waiting: a reply that cannot go now waits here and goes out at
    /// the next poll (``flushReplies(view:)``). A poller that blocked on a full ring could deadlock
    /// with a peer's poller blocked on ours.
    private func reply(to transaction: TransactionID, failure: AbortCause?, view: ConfigurationView) {
        let writer = RecordWriter(into: replyBuffer, capacity: RecordFormat.headerBytes, kind: .lockReply,
                                  configuration: view.configurationID, transaction: transaction,
                                  cause: failure?.rawValue ?? 0)
        let node = transaction.node
        if unsentCount.load(ordering: .relaxed) == 0 || unsent[node.index].isEmpty, let sender = view.senderTable[node.index] {
            let result: Result<Bool, TransportError> = sender._withUnsafeGuaranteedRef { sender in
                do throws(TransportError) { return .success(try sender.trySend(writer.bytes)) } catch { return .failure(error) }
            }
            switch result {
            case .success(true): return
            case .success(false): break
            case .failure(let error):
                engine.logger.info("could not answer \(transaction): \(error)")
                return
            }
        }
        unsent[node.index].append(Array(writer.bytes))
        unsentCount.add(1, ordering: .relaxed)
    }

    /// Sends the replies that could not go before, as far as the channels take them.
    func flushReplies(view: ConfigurationView) {
        guard unsentCount.load(ordering: .relaxed) > 0 else { return }
        for index in unsent.indices where !unsent[index].isEmpty {
            let replies = unsent[index]
            guard let sender = view.senders[index] else { continue }
            var sent = 0
            for reply in replies {
                let ok = (try? reply.withUnsafeBytes { try sender.trySend($0) }) ?? true
                if !ok { break }
                sent += 1
            }
            unsent[index].removeFirst(sent)
            unsentCount.subtract(sent, ordering: .relaxed)
        }
    }

    // MARK: Primary

    /// LOCK at the primary's CPU: compare-and-swap each object's header from the version the
    /// coordinator read to locked. All or nothing per record. The record is kept (with each entry's
    /// slot) until COMMIT-PRIMARY or ABORT.
    private func lock(_ record: RecordView, raw: UnsafeRawBufferPointer, view: ConfigurationView) throws {
        let index = kept.keep(raw, extraWords: record.count)
        let slots = kept.extraWords(index, after: raw.count)
        var lockedCount = 0
        var failure: AbortCause?
        var malformed: (any Error)?
        do {
            try lockEntries(record, view: view, slots: slots, lockedCount: &lockedCount, failure: &failure)
        } catch {
            // A malformed entry after some were locked: unlock those and refuse the record, so
            // that nothing stays locked and the coordinator learns at once.
            malformed = error
            failure = .invalidObject
        }
        if let failure {
            if lockedCount > 0 { release(index, locked: lockedCount, view: view, install: false) }
            kept.release(index)
            reply(to: record.transaction, failure: failure, view: view)
            if let malformed { throw malformed }
            return
        }
        locked.updateValue(index, forKey: record.transaction)
        publish(pendingCount, locked.count)
        reply(to: record.transaction, failure: nil, view: view)
    }

    /// Locks the entries of a LOCK record in order until one fails; records each locked slot.
    private func lockEntries(_ record: RecordView, view: ConfigurationView, slots: UnsafeMutablePointer<UInt64>,
                             lockedCount: inout Int, failure: inout AbortCause?) throws {
        try record.forEachEntry { entry in
            guard failure == nil else { return }
            guard let replica = view.replica(entry.address.region),
                  let slot = (try? replica.slot(at: Int(entry.address.offset))) ?? nil,
                  entry.payload.count <= ObjectLayout.payloadCapacity(lines: slot.lines) else {
                failure = .invalidObject
                return
            }
            if ObjectLayout.tryLock(replica.base + slot.offset, expected: entry.expected).locked {
                slots[lockedCount] = UInt64(slot.offset) << 16 | UInt64(slot.lines)
                lockedCount += 1
            } else {
                failure = .lockConflict
            }
        }
    }

    /// For the first `count` entries of kept LOCK record `index`: install the new values and unlock
    /// (COMMIT-PRIMARY), or unlock restoring the read header (ABORT, a failed LOCK).
    private func release(_ index: Int, locked count: Int, view: ConfigurationView, install: Bool) {
        let raw = kept.bytes(index)
        guard let record = try? RecordView(raw) else { return }
        let slots = kept.extraWords(index, after: raw.count)
        var entryIndex = 0
        try? record.forEachEntry { entry in
            guard entryIndex < count else { return }
            let slot = ObjectSlot(offset: Int(slots[entryIndex] >> 16), lines: Int(slots[entryIndex] & 0xFFFF))
            entryIndex += 1
            guard let replica = view.replica(entry.address.region) else {
                engine.logger.error("\(record.transaction) locked \(entry.address), whose region is no longer on \(engine.node)")
                return
            }
            let base = replica.base + slot.offset
            guard install else {
                ObjectLayout.unlock(base, restoring: entry.expected)
                return
            }
            switch entry.operation {
            case .write, .allocate:
                ObjectLayout.install(base, lines: slot.lines, payload: entry.payload.baseAddress ?? UnsafeRawPointer(base),
                                     count: entry.payload.count, header: entry.new)
                if entry.operation == .allocate { replica.didAllocate(slot, persist: state.pointee.persistEveryInstall) }
            case .free:
                // The payload is zeroed, not left as the last write made it: then a replica's
                // bytes depend only on the newest record applied to the object, and backups, which
                // apply records in any order (newest version wins), end byte-equal to the primary.
                ObjectLayout.install(base, lines: slot.lines, payload: UnsafeRawPointer(base), count: 0, header: entry.new)
                replica.didFree(slot)
            }
            if state.pointee.persistEveryInstall {
                replica.withRegion { try? $0.persist(offset: slot.offset, length: slot.lines * ObjectLayout.lineSize) }
            }
        }
    }

    /// COMMIT-PRIMARY: install the new values, bump versions, unlock.
    private func commitPrimary(_ transaction: TransactionID, view: ConfigurationView) {
        guard let index = locked.removeValue(forKey: transaction) else {
            engine.logger.info("COMMIT-PRIMARY for \(transaction), which holds no locks here")
            return
        }
        publish(pendingCount, locked.count)
        release(index, locked: .max, view: view, install: true)
        kept.release(index)
    }

    /// ABORT: release the locks, restoring the headers as they were.
    private func abort(_ transaction: TransactionID, view: ConfigurationView) {
        guard let index = locked.removeValue(forKey: transaction) else { return }
        publish(pendingCount, locked.count)
        release(index, locked: .max, view: view, install: false)
        kept.release(index)
    }

    // MARK: Backup

    /// COMMIT-BACKUP: keep the record until TRUNCATE. (The coordinator waits only for the write's
    /// completion, not for this.)
    private func commitBackup(_ record: RecordView, raw: UnsafeRawBufferPointer, view: ConfigurationView) throws {
        try record.forEachEntry { entry in
            guard let replica = view.replica(entry.address.region), !replica.isPrimary else {
                throw RecordView.Malformed(description: "\(entry.address.region) has no backup replica on \(engine.node)")
            }
        }
        if let previous = stashed.updateValue(kept.keep(raw, extraWords: 0), forKey: record.transaction) {
            kept.release(previous)
        }
        publish(stashedCount, stashed.count + deferred.count)
    }

    /// TRUNCATE: apply the kept records to the backup replicas, newest version wins, then drop them.
    private func truncate(_ record: RecordView, view: ConfigurationView) throws {
        // The batch's backup objects may have left this core's cache since COMMIT-BACKUP: start
        // fetching every one of them before the first install waits for its own.
        try record.forEachTransactionID { id in
            guard let index = stashed[id] else { return }
            forEachKeptEntry(index) { entry in
                guard let replica = view.replica(entry.address.region),
                      Int(entry.address.offset) <= replica.size - ObjectLayout.lineSize else { return }
                CacheLines.prefetch(replica.base + Int(entry.address.offset))
            }
        }
        var appliedAllocation = false
        try record.forEachTransactionID { id in
            guard let index = stashed.removeValue(forKey: id) else { return }
            forEachKeptEntry(index) { entry in
                if !apply(entry, view: view) { deferred.append(entry.owned()) }
                appliedAllocation = appliedAllocation || entry.operation == .allocate
            }
            kept.release(index)
        }
        if appliedAllocation && !deferred.isEmpty {
            deferred = deferred.filter { deferredEntry in !deferredEntry.apply { apply($0, view: view) } }
        }
        publish(stashedCount, stashed.count + deferred.count)
    }

    /// Calls `body` with each entry of kept COMMIT-BACKUP record `index`.
    private func forEachKeptEntry(_ index: Int, _ body: (BackupEntry) -> Void) {
        guard let record = try? RecordView(kept.bytes(index)) else { return }
        try? record.forEachEntry { entry in
            body(BackupEntry(address: entry.address, new: entry.new, lines: entry.lines, operation: entry.operation,
                             payload: entry.payload))
        }
    }

    /// Applies every kept backup record of `regions` (this node was promoted to their primary).
    /// Transaction recovery, which decides the fate of transactions whose coordinator failed
    /// between COMMIT-BACKUP and COMMIT-PRIMARY, is not implemented yet: kept records are applied.
    /// (Their entries for other regions are applied at TRUNCATE; applying is idempotent, newest
    /// version wins.)
    func applyKept(regions: Set<RegionID>, view: ConfigurationView) {
        stashed.forEachValue { index in
            forEachKeptEntry(index) { entry in
                if regions.contains(entry.address.region), !apply(entry, view: view) { deferred.append(entry.owned()) }
            }
        }
        deferred = deferred.filter { deferredEntry in !deferredEntry.apply { apply($0, view: view) } }
        publish(stashedCount, stashed.count + deferred.count)
    }

    /// Applies one entry to this backup's replica; false if the object's slab is not known here yet.
    private func apply(_ entry: BackupEntry, view: ConfigurationView) -> Bool {
        guard let replica = view.replica(entry.address.region) else { return true }
        let offset = Int(entry.address.offset)
        let slot: ObjectSlot
        if entry.operation == .allocate {
            slot = ObjectSlot(offset: offset, lines: entry.lines)
            let persist = state.pointee.persistEveryInstall
            replica.withRegion { SlabAllocator.recordSlabClass(in: $0, layout: replica.layout, slot: slot, persist: persist) }
        } else {
            guard let found = replica.withRegion({ try? SlabAllocator.slot(in: $0, layout: replica.layout, at: offset) }) else {
                return false
            }
            slot = found
        }
        let base = replica.base + slot.offset
        let current = ObjectLayout.loadHeader(base)
        // Records of different transactions reach a backup in any order; versions only grow.
        guard entry.new.version > current.version else { return true }
        _ = ObjectLayout.tryLock(base, expected: current)
        switch entry.operation {
        case .write, .allocate:
            ObjectLayout.install(base, lines: slot.lines, payload: entry.payload.baseAddress ?? UnsafeRawPointer(base),
                                 count: entry.payload.count, header: entry.new)
        case .free:
            // Zeroed as at the primary (see release): the result does not depend on which older
            // records arrived before this one.
            ObjectLayout.install(base, lines: slot.lines, payload: UnsafeRawPointer(base), count: 0, header: entry.new)
        }
        if state.pointee.persistEveryInstall {
            replica.withRegion { try? $0.persist(offset: slot.offset, length: slot.lines * ObjectLayout.lineSize) }
        }
        return true
    }
}

/// Copies of records kept after their ring space is reused (LOCK records at a primary until
/// COMMIT-PRIMARY, COMMIT-BACKUP records at a backup until TRUNCATE), in buffers that are reused:
/// once the pool has grown to the number of records in flight, keeping one allocates nothing.
///
/// Not thread-safe: used only by the record processor, under the engine mailbox's poll claim.
struct RecordPool: ~Copyable {
    private var buffers: [UnsafeMutableRawPointer] = []
    private var capacities: [Int] = []
    private var lengths: [Int] = []
    private var free: [Int] = []

    init() {
        buffers.reserveCapacity(1024)
        capacities.reserveCapacity(1024)
        lengths.reserveCapacity(1024)
        free.reserveCapacity(1024)
    }

    deinit { for buffer in buffers { buffer.deallocate() } }

    /// Copies `record` into a buffer with room for `extraWords` 8-byte words after it; returns the
    /// buffer's index.
    mutating func keep(_ record: UnsafeRawBufferPointer, extraWords: Int) -> Int {
        let needed = RecordFormat.padded(record.count) + extraWords * 8
        let index: Int
        if let reused = free.popLast() {
            index = reused
            if capacities[index] < needed {
                buffers[index].deallocate()
                capacities[index] = max(needed, capacities[index] * 2)
                buffers[index] = .allocate(byteCount: capacities[index], alignment: 8)
            }
        } else {
            index = buffers.count
            let capacity = max(needed, 512)
            buffers.append(.allocate(byteCount: capacity, alignment: 8))
            capacities.append(capacity)
            lengths.append(0)
        }
        if let source = record.baseAddress { buffers[index].copyMemory(from: source, byteCount: record.count) }
        lengths[index] = record.count
        return index
    }

    /// The record kept in buffer `index`.
    func bytes(_ index: Int) -> UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: buffers[index], count: lengths[index]) }

    /// The extra words after a record of `count` bytes in buffer `index`.
    func extraWords(_ index: Int, after count: Int) -> UnsafeMutablePointer<UInt64> {
        (buffers[index] + RecordFormat.padded(count)).assumingMemoryBound(to: UInt64.self)
    }

    /// Gives buffer `index` back.
    mutating func release(_ index: Int) { free.append(index) }
}
