import GranaryConfiguration
import Glibc
import GranaryMemory
import GranaryTransport
import Synchronization

/// The node-side half of the commit protocol: what the poller does with each record in its mailbox.
/// As a primary it locks (LOCK), installs (COMMIT-PRIMARY) and unlocks (ABORT); as a backup it keeps
/// COMMIT-BACKUP records and applies them at TRUNCATE.
///
/// One processor per sender (a lane of ``Engine/lanes``): it handles the records of that sender's
/// log and message queue at this node.
///
/// `@unchecked Sendable`: everything but the published atomics is touched only while holding the
/// mailbox's claim of this processor's lane (``Mailbox/withLaneIfAvailable(_:_:)``, or every
/// lane's, ``Mailbox/withPoller(_:)``); `engine` is set once before any polling. What lanes share at
/// this node: the objects of its replicas (a primary's LOCK takes each object's lock with
/// compare-and-swap; a backup's installs run under ``Engine/backupApplyClaim``), the slab
/// allocators (their own lock) and the reply slots of its coordinators (atomic).
final class RecordProcessor: @unchecked Sendable {
    /// The processor's mutable state, behind a pointer it owns: stored `var`s of a class pay a
    /// dynamic exclusivity check on every access, and these are touched several times per record.
    private struct State: ~Copyable {
        unowned(unsafe) var engine: Engine? = nil
        /// The engine's reply slots and install policy, copied when `engine` is set: a call through
        /// `engine` retains and releases it.
        var replies: Unmanaged<ReplySlots>? = nil
        /// The engine's mailbox (its rings are the node's log: kept records are released there).
        var mailbox: Unmanaged<Mailbox>? = nil
        var persistEveryInstall = false
        // Small to start (they grow): in flight are a few LOCK records per coordinator thread and
        // a truncation batch or two of COMMIT-BACKUP records, and a large sparse table misses the cache.
        var locked = TransactionTable(minimumCapacity: 64)
        var stashed = TransactionTable(minimumCapacity: 256)
        var committed = TransactionTable(minimumCapacity: 256)
        /// The log messages of committed transactions at this primary (their LOCK and
        /// COMMIT-PRIMARY records), by the index ``committed`` maps to; `freeCommitted` lists
        /// unused indexes. (The record copies themselves go back to the pool at COMMIT-PRIMARY.)
        var committedMessages: [RingReference] = []
        /// The configuration each kept COMMIT-PRIMARY's LOCK was stamped with, by the same index.
        var committedStamps: [ConfigurationID] = []
        var freeCommitted: [Int] = []
        /// The latest configuration stamped on a record this lane's log ring delivered: once it is
        /// at or past the configuration a recovery moves to, every earlier record of the ring has
        /// been handled (the ring is FIFO, and its sender stamps the new configuration only after
        /// its last record of the old one). Read by the drain under the poll claim.
        var lastLogStamp: UInt64 = 0
        /// Ring messages held for deferred entries, by ring reference key, with how many of their
        /// entries are still deferred.
        var deferredMessages: [UInt64: (RingReference, Int)] = [:]
        var kept = RecordPool()
        var deferred: [DeferredEntry] = []
        var unsent = [[[UInt8]]](repeating: [], count: NodeID.limit)
        /// Objects LOCK RECOVERY locked at this (promoted) primary, with their headers before.
        var recoveryLocks: [(UInt, ObjectHeader)] = []
        /// Slots this primary reserved for other nodes' coordinators (ALLOCATE), by untagged
        /// address, with the node that holds each reservation.
        var remoteReservations: [UInt64: RemoteReservationHolder] = [:]
        /// Transactions (raw ids) whose kept COMMIT-BACKUP record allocates, with the keys of the
        /// slabs it allocates in: they are in ``Engine/keptSlabClasses`` until the record leaves.
        var allocating: [UInt64: [UInt64]] = [:]
    }
    private let state: UnsafeMutablePointer<State> = {
        let state = UnsafeMutablePointer<State>.allocate(capacity: 1)
        state.initialize(to: State())
        return state
    }()

    /// See `State.lastLogStamp`; only the lane's holder touches it.
    var lastLogStamp: UInt64 {
        get { state.pointee.lastLogStamp }
        set { state.pointee.lastLogStamp = newValue }
    }

    /// The engine this processor serves (set once, before any polling).
    var engine: Engine {
        get { state.pointee.engine.unsafelyUnwrapped }
        set {
            state.pointee.engine = newValue
            state.pointee.replies = Unmanaged.passUnretained(newValue.replies)
            state.pointee.mailbox = Unmanaged.passUnretained(newValue.mailbox)
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

    /// A truncated entry waiting for its object's slab to be known here, with its own payload copy,
    /// and the ring message it came from (kept in the log until the entry is applied).
    struct DeferredEntry {
        let address: GlobalAddress
        let new: ObjectHeader
        let lines: Int
        let operation: EntryOperation
        let payload: [UInt8]
        var message: RingReference? = nil

        func apply(_ body: (BackupEntry) -> Bool) -> Bool {
            payload.withUnsafeBytes { bytes in
                body(BackupEntry(address: address, new: new, lines: lines, operation: operation, payload: bytes))
            }
        }
    }

    /// The mailbox's attention word as this lane last acted on it (``Mailbox/attention``): written
    /// by the holder of the lane's claim, read by anyone looking for work.
    let seenAttention = Atomic<UInt64>(0)
    /// The same for the sender's queue ring (a lane of its own, see ``Engine/serveQueue(_:from:view:)``).
    let seenQueueAttention = Atomic<UInt64>(0)
    /// How many entries wait in ``deferred`` (published for ``mayRetryDeferred``).
    private let deferredCount = Atomic<Int>(0)
    /// ``Engine/allocationsApplied`` when this lane last tried its deferred entries.
    private let seenAllocations = Atomic<Int>(0)

    /// Whether deferred entries wait here and another lane has applied an allocation since they
    /// were last tried (it may have entered their slab's class). Plain loads.
    var mayRetryDeferred: Bool {
        deferredCount.load(ordering: .relaxed) > 0
            && engine.allocationsApplied.load(ordering: .relaxed) != seenAllocations.load(ordering: .relaxed)
    }

    /// Runs `body` holding the engine's ``Engine/backupApplyClaim``: installs into backup replicas.
    @inline(__always) private func withBackupApply<R, E: Error>(_ body: () throws(E) -> R) throws(E) -> R {
        try state.pointee.engine.unsafelyUnwrapped.withBackupApplyClaim(body)
    }
    /// LOCK records whose objects this primary holds locked, until COMMIT-PRIMARY or ABORT: the
    /// record's copy in ``kept`` (with each entry's slot after it).
    private var locked: TransactionTable { _read { yield state.pointee.locked } _modify { yield &state.pointee.locked } }
    /// COMMIT-BACKUP records this backup keeps until TRUNCATE: their copies in ``kept``.
    private var stashed: TransactionTable { _read { yield state.pointee.stashed } _modify { yield &state.pointee.stashed } }
    /// Transactions without backups that this primary installed (COMMIT-PRIMARY): their LOCK and
    /// COMMIT-PRIMARY records stay in the log until TRUNCATE, the proof recovery reads that they
    /// committed (with backups, the backups' records are that proof). Maps to ``committedMessages``.
    private var committed: TransactionTable { _read { yield state.pointee.committed } _modify { yield &state.pointee.committed } }

    /// Releases a kept ring message (and its second one, if any) in the node's log.
    @inline(__always) private func releaseMessages(_ reference: RingReference) {
        state.pointee.mailbox.unsafelyUnwrapped._withUnsafeGuaranteedRef { mailbox in
            mailbox.releaseMessage(from: reference.sender, at: reference.position)
            if reference.second != RingReference.none { mailbox.releaseMessage(from: reference.sender, at: reference.second) }
        }
    }

    /// Releases the pool copy `index` and the ring messages it stands for.
    @inline(__always) private func drop(_ index: Int) {
        releaseMessages(kept.reference(index))
        kept.release(index)
    }

    private func publishKept() {
        publish(stashedCount, stashed.count + deferred.count + committed.count)
        if deferredCount.load(ordering: .relaxed) != deferred.count { deferredCount.store(deferred.count, ordering: .relaxed) }
    }
    /// Record copies, in buffers reused from record to record (no allocation once warm).
    private var kept: RecordPool { _read { yield state.pointee.kept } _modify { yield &state.pointee.kept } }
    /// Truncated entries for objects whose allocation has not reached this backup yet (records of
    /// different coordinators arrive in any order); applied once it has.
    private var deferred: [DeferredEntry] { _read { yield state.pointee.deferred } _modify { yield &state.pointee.deferred } }
    private let replyBuffer = UnsafeMutableRawPointer.allocate(byteCount: RecordFormat.headerBytes, alignment: 8)
    private let allocationReplyBuffer = UnsafeMutableRawPointer.allocate(byteCount: RemoteAllocation.replyBytes, alignment: 8)

    deinit {
        replyBuffer.deallocate()
        allocationReplyBuffer.deallocate()
        state.deinitialize(count: 1)
        state.deallocate()
    }

    /// Handles one message from `sender`'s message queue: only LOCK replies travel there.
    func handleQueued(from sender: NodeID, _ bytes: UnsafeRawBufferPointer, view: ConfigurationView) {
        guard let record = try? RecordView(bytes), record.kind == .lockReply || record.kind == .allocateReply else {
            engine.statistics.rejected()
            engine.logger.info("rejected a message from \(sender)'s queue that is not a LOCK or ALLOCATE reply")
            return
        }
        if record.kind == .allocateReply {
            // An answer to this node's own request, matched by its reply slot's sequence (a late
            // or foreign one changes nothing), whatever configuration the primary is in.
            guard record.transaction.node == engine.node, record.body.count >= 24 else {
                engine.statistics.rejected()
                engine.logger.info("rejected an ALLOCATE reply from \(sender) for \(record.transaction)")
                return
            }
            state.pointee.replies.unsafelyUnwrapped._withUnsafeGuaranteedRef {
                $0.deliverAllocation(record.transaction, status: record.cause,
                                     address: record.body.loadUnaligned(fromByteOffset: 0, as: UInt64.self),
                                     header: record.body.loadUnaligned(fromByteOffset: 8, as: UInt64.self),
                                     lines: record.body.loadUnaligned(fromByteOffset: 16, as: UInt32.self),
                                     region: record.body.loadUnaligned(fromByteOffset: 20, as: UInt32.self))
            }
            return
        }
        _ = handle(from: sender, bytes, position: 0, view: view)
    }

    /// Handles one record from `sender`'s log ring at stream position `position`; returns whether the
    /// record stays in the ring as part of the node's log (LOCK, COMMIT-PRIMARY and COMMIT-BACKUP
    /// records until TRUNCATE or ABORT), to be released later.
    func handle(from sender: NodeID, _ bytes: UnsafeRawBufferPointer, position: UInt64, view: ConfigurationView) -> Bool {
        let record: RecordView
        do {
            record = try RecordView(bytes)
        } catch {
            engine.statistics.rejected()
            engine.logger.info("rejected a record from \(sender): \(error)")
            return false
        }
        let ring = RingReference(sender: sender, position: position)
        guard view.isMember(sender), engine.refusedSenders.load(ordering: .relaxed) & (1 << UInt64(sender.index)) == 0 else {
            // Precise membership: a node outside the configuration changes nothing here.
            engine.statistics.rejected()
            engine.logger.info("rejected a \(record.kind) record from \(sender), which is not a member of \(view.configuration.id)")
            if record.kind == .lock { reply(to: record.transaction, failure: .wrongConfiguration, view: view) }
            if record.kind == .allocate { answerAllocation(to: record.transaction, status: .notPrimary, view: view) }
            return false
        }
        // A member's TRUNCATE or ABORT stamped with an older configuration (sent while its
        // coordinator had not yet moved on) is still taken: each only ends what its coordinator
        // decided (a commit everywhere, or nothing), and refusing it would leave the records it
        // releases in this log for ever.
        let ends = (record.kind == .truncate || record.kind == .abort) && record.configuration < view.configurationID
        guard record.configuration >= view.routingEpoch || ends else {
            if record.kind == .lockReply, record.cause == AbortCause.wrongConfiguration.rawValue {
                // A primary in another configuration refused our LOCK: the waiting coordinator must
                // learn it (its own configuration is the stale one, or the primary's is).
                engine.replies.deliver(record.transaction, failure: record.cause)
                return false
            }
            engine.statistics.rejected()
            let error = ConfigurationError.wrongConfiguration(found: record.configuration, expected: view.configuration.id, from: sender)
            // A sender ahead of this node is the ordinary moment between two nodes' moves (its
            // coordinator learns from the refused LOCK and tries again); one behind is not.
            if record.configuration > view.configurationID { engine.logger.debug("\(error)") } else { engine.logger.info("\(error)") }
            if record.kind == .lock { reply(to: record.transaction, failure: .wrongConfiguration, view: view) }
            if record.kind == .allocate { answerAllocation(to: record.transaction, status: .notPrimary, view: view) }
            return false
        }
        if record.kind != .lockReply && record.kind != .truncate && record.transaction.node != sender {
            // A coordinator's records carry its own transaction ids: anything else is foreign.
            engine.statistics.rejected()
            engine.logger.info("rejected a \(record.kind) record from \(sender) for \(record.transaction), which \(sender) does not coordinate")
            return false
        }
        do {
            switch record.kind {
            case .lock: return try lock(record, raw: bytes, ring: ring, view: view)
            case .lockReply:
                // Replies come through the message queue; one in the log is still only a reply.
                state.pointee.replies.unsafelyUnwrapped._withUnsafeGuaranteedRef { $0.deliver(record.transaction, failure: record.cause) }
                return false
            case .commitPrimary:
                return commitPrimary(record.transaction, ring: ring, keep: record.cause == RecordFormat.keepUntilTruncate, view: view)
            case .abort:
                abort(record.transaction, view: view)
                return false
            case .commitBackup: return try commitBackup(record, raw: bytes, ring: ring, view: view)
            case .truncate:
                try truncate(record, view: view)
                return false
            case .allocate:
                try allocateForRemote(record, from: sender, view: view)
                return false
            case .allocateRelease:
                try releaseForRemote(record, from: sender, view: view)
                return false
            case .allocateReply:
                // Replies come through the message queue (``handleQueued(from:_:view:)``).
                throw RecordView.Malformed(description: "an ALLOCATE reply in the log")
            }
        } catch {
            engine.statistics.rejected()
            engine.logger.info("rejected a \(record.kind) record of \(record.transaction) from \(sender): \(error)")
            return false
        }
    }

    /// Slots reserved for other nodes' coordinators (see `RemoteAllocation`).
    var remoteReservations: [UInt64: RemoteReservationHolder] {
        _read { yield state.pointee.remoteReservations } _modify { yield &state.pointee.remoteReservations }
    }

    /// Replies that found their channel busy or full, in order, per coordinator node.
    private var unsent: [[[UInt8]]] { _read { yield state.pointee.unsent } _modify { yield &state.pointee.unsent } }
    let unsentCount = Atomic<Int>(0)

    /// Answers a LOCK without ever waiting: a reply that cannot go now waits here and goes out at
    /// the next poll (``flushReplies(view:)``). A poller that blocked on a full ring could deadlock
    /// with a peer's poller blocked on ours.
    ///
    /// A reply to a LOCK this node took carries the LOCK's own configuration (`stamp`): the
    /// coordinator takes it whichever configuration either has moved to meanwhile (a commit
    /// admitted outside the recovering regions stamps its records with the configuration being
    /// recovered into, and its coordinator or this primary may move there first). A refusal
    /// carries this node's.
    private func reply(to transaction: TransactionID, failure: AbortCause?, stamp: ConfigurationID? = nil, view: ConfigurationView) {
        if transaction.node == engine.node {
            // This node coordinates the transaction: its reply slot is in this process, so the
            // answer goes there directly instead of through the node's own message queue (a ring
            // write, and a poll of it, saved on every LOCK of a local primary).
            state.pointee.replies.unsafelyUnwrapped._withUnsafeGuaranteedRef { $0.deliver(transaction, failure: failure?.rawValue ?? 0) }
            return
        }
        let writer = RecordWriter(into: replyBuffer, capacity: RecordFormat.headerBytes, kind: .lockReply,
                                  configuration: stamp ?? view.configurationID, transaction: transaction,
                                  cause: failure?.rawValue ?? 0)
        sendReply(writer.bytes, to: transaction, view: view)
    }

    /// ALLOCATE-REPLY to `transaction`'s coordinator (see `RemoteAllocation`).
    func answerAllocation(to transaction: TransactionID, status: RemoteAllocation.Status, address: GlobalAddress = GlobalAddress(rawValue: 0),
                          header: ObjectHeader = ObjectHeader(rawValue: 0), lines: Int = 0, region: RegionID = RegionID(rawValue: 0),
                          view: ConfigurationView) {
        var writer = RecordWriter(into: allocationReplyBuffer, capacity: RemoteAllocation.replyBytes, kind: .allocateReply,
                                  configuration: view.configurationID, transaction: transaction, cause: status.rawValue)
        writer.appendWord(address.rawValue)
        writer.appendWord(header.rawValue)
        writer.appendWord(UInt64(UInt32(clamping: lines)) | UInt64(region.rawValue) << 32)
        if transaction.node == engine.node {
            state.pointee.replies.unsafelyUnwrapped._withUnsafeGuaranteedRef {
                $0.deliverAllocation(transaction, status: status.rawValue, address: address.rawValue, header: header.rawValue,
                                     lines: UInt32(clamping: lines), region: UInt32(region.rawValue))
            }
            return
        }
        sendReply(writer.bytes, to: transaction, view: view)
    }

    /// Sends a reply to `transaction`'s coordinator on its message queue without waiting: a
    /// reply that cannot go now waits in order for ``flushReplies(view:)``.
    private func sendReply(_ bytes: UnsafeRawBufferPointer, to transaction: TransactionID, view: ConfigurationView) {
        let node = transaction.node
        guard node.index < NodeID.limit, view.replySenderTable[node.index] != nil else {
            engine.statistics.rejected()
            engine.logger.info("cannot answer \(transaction): no channel to its coordinator \(node)")
            return
        }
        if unsentCount.load(ordering: .relaxed) == 0 || unsent[node.index].isEmpty, let sender = view.replySenderTable[node.index] {
            let result: Result<Bool, TransportError> = sender._withUnsafeGuaranteedRef { sender in
                do throws(TransportError) { return .success(try sender.trySend(bytes, usingReserve: true)) } catch { return .failure(error) }
            }
            switch result {
            case .success(true): return
            case .success(false): break
            case .failure(let error):
                engine.logger.info("could not answer \(transaction): \(error)")
                return
            }
        }
        unsent[node.index].append(Array(bytes))
        unsentCount.add(1, ordering: .relaxed)
    }

    /// Sends the replies that could not go before, as far as the channels take them.
    func flushReplies(view: ConfigurationView) {
        guard unsentCount.load(ordering: .relaxed) > 0 else { return }
        for index in unsent.indices where !unsent[index].isEmpty {
            let replies = unsent[index]
            guard let sender = view.replySenders[index] else { continue }
            var sent = 0
            for reply in replies {
                let ok = (try? reply.withUnsafeBytes { try sender.trySend($0, usingReserve: true) }) ?? true
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
    private func lock(_ record: RecordView, raw: UnsafeRawBufferPointer, ring: RingReference, view: ConfigurationView) throws -> Bool {
        let index = kept.keep(raw, extraWords: record.count, reference: ring)
        // One table operation on the common path: the entry goes in now, and comes out again if
        // the LOCK fails.
        if let first = locked.updateValue(index, forKey: record.transaction) {
            // The same transaction id twice: a foreign or replayed record. Refuse it; the first stands.
            _ = locked.updateValue(first, forKey: record.transaction)
            kept.release(index)
            throw RecordView.Malformed(description: "a second LOCK record for \(record.transaction)")
        }
        let slots = kept.extraWords(index)
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
            _ = locked.removeValue(forKey: record.transaction)
            if lockedCount > 0 { release(index, locked: lockedCount, view: view, install: false) }
            kept.release(index)
            reply(to: record.transaction, failure: failure, stamp: record.configuration, view: view)
            if let malformed { throw malformed }
            return false
        }
        publish(pendingCount, locked.count)
        reply(to: record.transaction, failure: nil, stamp: record.configuration, view: view)
        return true
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
            // A new object goes only into a free slot: an allocate entry that read the slot
            // allocated (someone else's object took it) would otherwise lock and overwrite it.
            guard entry.operation != .allocate || !entry.expected.isAllocated else {
                failure = .lockConflict
                return
            }
            var attempt = ObjectLayout.tryLock(replica.base + slot.offset, expected: entry.expected)
            if !attempt.locked, !attempt.found.isLocked, engine.sabotage == .skipLockCheck {
                attempt = ObjectLayout.tryLock(replica.base + slot.offset, expected: attempt.found)
            }
            if attempt.locked {
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
        let slots = kept.extraWords(index)
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
                // The slab's size class reaches the table before the first object in it does.
                if entry.operation == .allocate {
                    replica.didAllocate(slot, persist: state.pointee.persistEveryInstall)
                    endRemoteReservation(entry.address)
                }
                ObjectLayout.install(base, lines: slot.lines, payload: entry.payload.baseAddress ?? UnsafeRawPointer(base),
                                     count: entry.payload.count, header: entry.new)
            case .free:
                // The payload is zeroed, not left as the last write made it: then a replica's
                // bytes depend only on the newest record applied to the object, and backups, which
                // apply records in any order (newest version wins), end byte-equal to the primary.
                replica.didFree(slot) {
                    ObjectLayout.install(base, lines: slot.lines, payload: UnsafeRawPointer(base), count: 0, header: entry.new)
                }
            }
            if state.pointee.persistEveryInstall {
                replica.withRegion { try? $0.persist(offset: slot.offset, length: slot.lines * ObjectLayout.lineSize) }
            }
        }
    }

    /// COMMIT-PRIMARY: install the new values, bump versions, unlock. The LOCK record and this one
    /// stay in the log until TRUNCATE.
    private func commitPrimary(_ transaction: TransactionID, ring: RingReference, keep: Bool, view: ConfigurationView) -> Bool {
        guard let index = locked.removeValue(forKey: transaction) else {
            engine.logger.info("COMMIT-PRIMARY for \(transaction), which holds no locks here")
            return false
        }
        publish(pendingCount, locked.count)
        release(index, locked: .max, view: view, install: true)
        guard keep else {
            // The backups' COMMIT-BACKUP records prove the commit until TRUNCATE.
            drop(index)
            return false
        }
        var reference = kept.reference(index)
        reference.second = ring.position
        let stamp = (try? RecordView(kept.bytes(index)))?.configuration ?? ConfigurationID(rawValue: 0)
        kept.release(index)
        let slot: Int
        if let reused = state.pointee.freeCommitted.popLast() {
            slot = reused
            state.pointee.committedMessages[slot] = reference
            state.pointee.committedStamps[slot] = stamp
        } else {
            slot = state.pointee.committedMessages.count
            state.pointee.committedMessages.append(reference)
            state.pointee.committedStamps.append(stamp)
        }
        committed.updateValue(slot, forKey: transaction)
        publishKept()
        return true
    }

    /// ABORT: at a primary, release the locks, restoring the headers as they were; at a backup,
    /// drop the COMMIT-BACKUP record of a transaction whose commit was undone.
    private func abort(_ transaction: TransactionID, view: ConfigurationView) {
        if let index = locked.removeValue(forKey: transaction) {
            publish(pendingCount, locked.count)
            release(index, locked: .max, view: view, install: false)
            drop(index)
        }
        if let index = stashed.removeValue(forKey: transaction) {
            forgetSlabClasses(of: transaction)
            drop(index)
            publishKept()
        }
    }

    // MARK: Backup

    /// COMMIT-BACKUP: keep the record until TRUNCATE. (The coordinator waits only for the write's
    /// completion, not for this.)
    private func commitBackup(_ record: RecordView, raw: UnsafeRawBufferPointer, ring: RingReference, view: ConfigurationView) throws -> Bool {
        var allocates = false
        try record.forEachEntry { entry in
            // The whole write set's other entries are kept for recovery, never applied here.
            guard !entry.replicated else { return }
            guard let replica = view.replica(entry.address.region), !replica.isPrimary else {
                throw RecordView.Malformed(description: "\(entry.address.region) has no backup replica on \(engine.node)")
            }
            try Self.check(entry, in: replica)
            if entry.operation == .allocate { allocates = true }
        }
        let index = kept.keep(raw, extraWords: 0, reference: ring)
        if let previous = stashed.updateValue(index, forKey: record.transaction) {
            forgetSlabClasses(of: record.transaction)
            drop(previous)
        }
        if allocates {
            // Entries waiting for a slab this record allocates in, in any lane: the slab's class
            // is known now.
            var keys: [UInt64] = []
            engine.keptSlabClasses.withLock { classes in
                forEachKeptEntry(index) { entry in
                    guard entry.operation == .allocate, let key = slabKey(entry.address, view: view) else { return }
                    classes[key, default: (ObjectSlot(offset: Int(entry.address.offset), lines: entry.lines), 0)].records += 1
                    keys.append(key)
                }
            }
            state.pointee.allocating[record.transaction.rawValue] = keys
            engine.allocationsApplied.add(1, ordering: .relaxed)
            if !deferred.isEmpty {
                for entry in deferred { _ = learnSlabClass(of: entry.address, view: view) }
                withBackupApply { applyDeferred(view: view) }
            }
        }
        publishKept()
        return true
    }

    /// The key of `address`'s slab in ``Engine/keptSlabClasses``.
    private func slabKey(_ address: GlobalAddress, view: ConfigurationView) -> UInt64? {
        guard let replica = view.replica(address.region) else { return nil }
        return UInt64(address.region.rawValue) << 40 | UInt64(Int(address.offset) >> replica.layout.slabShift)
    }

    /// Takes the slabs the kept COMMIT-BACKUP record of `transaction` allocates in out of
    /// ``Engine/keptSlabClasses`` (the record leaves: applied, aborted or replaced).
    private func forgetSlabClasses(of transaction: TransactionID) {
        guard !state.pointee.allocating.isEmpty, let keys = state.pointee.allocating.removeValue(forKey: transaction.rawValue) else { return }
        engine.keptSlabClasses.withLock { classes in
            for key in keys {
                guard let held = classes[key] else { continue }
                classes[key] = held.records > 1 ? (held.slot, held.records - 1) : nil
            }
        }
    }

    /// For a truncated entry whose object's slab has no size class at this backup yet: finds an
    /// allocation in that slab among the COMMIT-BACKUP records kept here, in any lane (not yet
    /// truncated; ``Engine/keptSlabClasses``), and enters its class in the backup's slab table. The class is certain: a committed transaction
    /// used an object of the slab, so an allocation in it committed at the primary, and every slot
    /// of a slab has the same class. Returns whether it found one. (Without this, the entry would
    /// wait for the allocating coordinator's lazy TRUNCATE, holding its record in the log.)
    private func learnSlabClass(of address: GlobalAddress, view: ConfigurationView) -> Bool {
        guard let replica = view.replica(address.region), let key = slabKey(address, view: view),
              let found = engine.keptSlabClasses.withLock({ $0[key]?.slot }), found.lines > 0 else { return false }
        let persist = state.pointee.persistEveryInstall
        replica.withRegion { SlabAllocator.recordSlabClass(in: $0, layout: replica.layout, slot: found, persist: persist) }
        return true
    }

    /// Checks a backup entry's fields against the replica before anything uses them: the offset
    /// lies in the region on a line boundary, the lines and the payload fit the region and the
    /// object.
    static func check(_ entry: RecordView.Entry, in replica: ReplicaAccess) throws(RecordView.Malformed) {
        let offset = Int(entry.address.offset)
        guard offset % ObjectLayout.lineSize == 0, offset >= replica.layout.firstSlabOffset, offset < replica.size else {
            throw RecordView.Malformed(description: "entry for \(entry.address): offset outside the region's objects")
        }
        if entry.operation == .allocate {
            guard entry.lines >= 1, offset + entry.lines * ObjectLayout.lineSize <= replica.size,
                  entry.payload.count <= ObjectLayout.payloadCapacity(lines: entry.lines) else {
                throw RecordView.Malformed(description: "allocate entry for \(entry.address): \(entry.lines) lines with a \(entry.payload.count)-byte payload do not fit")
            }
        } else if entry.payload.count > ObjectLayout.payloadCapacity(lines: max(1, (replica.size - offset) / ObjectLayout.lineSize)) {
            throw RecordView.Malformed(description: "entry for \(entry.address): a \(entry.payload.count)-byte payload runs past the region")
        }
    }

    /// TRUNCATE: apply the kept records to the backup replicas, newest version wins, then drop them.
    private func truncate(_ record: RecordView, view: ConfigurationView) throws {
        // The batch's backup objects may have left this core's cache since COMMIT-BACKUP: start
        // fetching every one of them before the first install waits for its own.
        var applies = false
        try record.forEachTransactionID { id in
            guard let index = stashed[id] else { return }
            applies = true
            forEachKeptEntry(index) { entry in
                guard let replica = view.replica(entry.address.region),
                      Int(entry.address.offset) <= replica.size - ObjectLayout.lineSize else { return }
                CacheLines.prefetch(replica.base + Int(entry.address.offset))
            }
        }
        var appliedAllocation = false
        func applyAll() throws {
            try record.forEachTransactionID { id in
                if let slot = committed.removeValue(forKey: id) {
                    releaseMessages(state.pointee.committedMessages[slot])
                    state.pointee.freeCommitted.append(slot)
                }
                guard let index = stashed.removeValue(forKey: id) else { return }
                forgetSlabClasses(of: id)
                if applyStashed(index, view: view) { appliedAllocation = true }
            }
            if appliedAllocation && !deferred.isEmpty { applyDeferred(view: view) }
        }
        if applies {
            try withBackupApply { try applyAll() }
        } else {
            try applyAll()
        }
        if appliedAllocation { engine.allocationsApplied.add(1, ordering: .relaxed) }
        publishKept()
    }

    /// ``applyDeferred(view:)`` for data recovery, after it entered slab classes from the
    /// primary's table (entries waiting for a slab this backup had never seen).
    func retryDeferred(view: ConfigurationView) {
        seenAllocations.store(engine.allocationsApplied.load(ordering: .relaxed), ordering: .relaxed)
        guard !deferred.isEmpty else { return }
        for entry in deferred { _ = learnSlabClass(of: entry.address, view: view) }
        withBackupApply { applyDeferred(view: view) }
        publishKept()
    }

    /// Applies the entries of kept COMMIT-BACKUP record `index` (TRUNCATE, or recovery's commit)
    /// and drops it; an entry whose slab is not known here yet is deferred, and the record stays
    /// in the log until it is applied. Returns whether an entry allocated.
    private func applyStashed(_ index: Int, view: ConfigurationView) -> Bool {
        var deferredHere = 0
        var allocated = false
        forEachKeptEntry(index) { entry in
            if !apply(entry, view: view) && !(learnSlabClass(of: entry.address, view: view) && apply(entry, view: view)) {
                var owned = entry.owned()
                owned.message = kept.reference(index)
                deferred.append(owned)
                deferredHere += 1
            }
            allocated = allocated || entry.operation == .allocate
        }
        if deferredHere > 0 {
            let reference = kept.reference(index)
            state.pointee.deferredMessages[reference.key] = (reference, deferredHere)
            kept.release(index)
        } else {
            drop(index)
        }
        return allocated
    }

    /// Applies the deferred entries whose slabs are now known; releases the log records of those
    /// that are all applied.
    private func applyDeferred(view: ConfigurationView) {
        var remaining: [DeferredEntry] = []
        for entry in deferred {
            if entry.apply({ apply($0, view: view) }) {
                guard let message = entry.message, var held = state.pointee.deferredMessages[message.key] else { continue }
                held.1 -= 1
                if held.1 == 0 {
                    state.pointee.deferredMessages[message.key] = nil
                    releaseMessages(held.0)
                } else {
                    state.pointee.deferredMessages[message.key] = held
                }
            } else {
                remaining.append(entry)
            }
        }
        deferred = remaining
    }

    /// Calls `body` with each entry of kept COMMIT-BACKUP record `index` for a region this node
    /// backs (not those of the rest of the write set, ``RecordFormat/replicatedEntry``).
    @inline(__always) private func forEachKeptEntry(_ index: Int, _ body: (BackupEntry) -> Void) {
        guard let record = try? RecordView(kept.bytes(index)) else { return }
        try? record.forEachEntry { entry in
            guard !entry.replicated else { return }
            body(BackupEntry(address: entry.address, new: entry.new, lines: entry.lines, operation: entry.operation,
                             payload: entry.payload))
        }
    }

    // MARK: Transaction-state recovery (see TransactionRecovery.swift)

    /// FIND RECOVERING TRANSACTIONS and LOCK RECOVERY at this node, after its logs are drained:
    /// a vote for every transaction whose records this node still holds (a LOCK at a primary, a
    /// COMMIT-BACKUP at a backup, a kept COMMIT-PRIMARY of a transaction without backups), with the
    /// regions the records name. The objects of kept COMMIT-BACKUP records in `promoted` (regions
    /// this node leads in the next configuration) are locked until ``resolveRecovered(_:view:)``,
    /// so that no reader sees them before the decision is applied.
    ///
    /// A COMMIT-BACKUP record that names a region in `orphaned` (whose primary the next
    /// configuration removes) goes into its vote whole: REPLICATE-TX-STATE (see
    /// ``TransactionRecovery/replicated(_:)``).
    ///
    /// Records stamped with `next` or later are not voted on: they come from commits admitted
    /// outside the recovering regions after their coordinator's BLOCK step, and recovery leaves
    /// them to their coordinators.
    func recoveryVotes(view: ConfigurationView, next: ConfigurationID, promoted: Set<RegionID>, orphaned: Set<RegionID>) -> [TransactionRecovery.Vote] {
        var votes: [TransactionRecovery.Vote] = []
        locked.forEach { id, index in
            var regions = Set<RegionID>()
            var backups: UInt64?
            if let record = try? RecordView(kept.bytes(index)) {
                guard record.configuration < next else { return }
                try? record.forEachEntry { regions.insert($0.address.region) }
                backups = record.backups
            }
            votes.append(TransactionRecovery.Vote(transaction: id.rawValue, kind: .lock, regions: regions.sorted(), backups: backups ?? 0))
        }
        stashed.forEach { id, index in
            let parsed = try? RecordView(kept.bytes(index))
            if let parsed, parsed.configuration >= next { return }
            let backups = parsed?.backups
            var regions = Set<RegionID>()
            forEachKeptEntry(index) { entry in
                regions.insert(entry.address.region)
                guard promoted.contains(entry.address.region), let replica = view.replica(entry.address.region) else { return }
                let offset = Int(entry.address.offset)
                guard offset >= replica.layout.firstSlabOffset, offset % ObjectLayout.lineSize == 0,
                      offset + ObjectLayout.lineSize <= replica.size else { return }
                let object = replica.base + offset
                let header = ObjectLayout.loadHeader(object)
                if !header.isLocked, ObjectLayout.tryLock(object, expected: header).locked {
                    state.pointee.recoveryLocks.append((UInt(bitPattern: object), header))
                }
            }
            // REPLICATE-TX-STATE: the record holds the whole write set; it ships if any region of
            // it lost its primary.
            var written = regions
            try? parsed?.forEachEntry { written.insert($0.address.region) }
            let record = written.isDisjoint(with: orphaned) ? [] : Array(kept.bytes(index))
            votes.append(TransactionRecovery.Vote(transaction: id.rawValue, kind: .commitBackup, regions: regions.sorted(),
                                                  backups: backups ?? 0, record: record))
        }
        committed.forEach { id, slot in
            guard state.pointee.committedStamps[slot] < next else { return }
            votes.append(TransactionRecovery.Vote(transaction: id.rawValue, kind: .commitPrimary, regions: []))
        }
        return votes
    }

    /// Applies recovery's decisions to every transaction they name whose records this node holds:
    /// a LOCK is installed and unlocked (commit) or unlocked unchanged (abort); a COMMIT-BACKUP is
    /// applied (commit) or dropped (abort); a kept COMMIT-PRIMARY is dropped (already installed).
    /// Every record this node voted on is named (the decisions cover every vote); a record of a
    /// transaction they do not name is stamped with the next configuration, from a commit admitted
    /// outside the recovering regions, and is left as it is. Then the locks LOCK RECOVERY took are released
    /// where no install did. Every record of the old configuration leaves the log.
    ///
    /// First, REPLICATE-TX-STATE: each record in `shipped` of a committed transaction this node
    /// holds no record of is applied to this node's replicas of the regions it names (allocations
    /// first); returns how many such records were applied as `replicated`.
    func resolveRecovered(_ decisions: [UInt64: Bool], shipped: [UInt64: [UInt8]], removed: [NodeID],
                          view: ConfigurationView) -> (committed: Int, aborted: Int, replicated: Int) {
        // Answers to removed coordinators will never be read.
        for node in removed where node.index < NodeID.limit && !unsent[node.index].isEmpty {
            unsentCount.subtract(unsent[node.index].count, ordering: .relaxed)
            unsent[node.index].removeAll()
        }
        var replicated = 0
        for (transaction, bytes) in shipped where decisions[transaction] == true {
            let id = TransactionID(rawValue: transaction)
            guard locked[id] == nil, stashed[id] == nil, committed[id] == nil else { continue }
            var applies = false
            bytes.withUnsafeBytes { raw in
                guard let record = try? RecordView(raw), record.kind == .commitBackup else { return }
                for allocations in [true, false] {
                    try? record.forEachEntry { entry in
                        guard (entry.operation == .allocate) == allocations, view.replica(entry.address.region) != nil else { return }
                        applies = true
                        _ = apply(BackupEntry(address: entry.address, new: entry.new, lines: entry.lines, operation: entry.operation,
                                              payload: entry.payload), view: view)
                    }
                }
            }
            if applies { replicated += 1 }
        }
        var outcome = (committed: 0, aborted: 0, replicated: replicated)
        func count(_ commit: Bool) { if commit { outcome.committed += 1 } else { outcome.aborted += 1 } }
        var entries: [(TransactionID, Int)] = []
        locked.forEach { id, index in if decisions[id.rawValue] != nil { entries.append((id, index)) } }
        for (id, index) in entries {
            _ = locked.removeValue(forKey: id)
            let commit = decisions[id.rawValue] ?? false
            count(commit)
            release(index, locked: .max, view: view, install: commit)
            drop(index)
        }
        publish(pendingCount, locked.count)
        entries.removeAll()
        stashed.forEach { id, index in if decisions[id.rawValue] != nil { entries.append((id, index)) } }
        var appliedAllocation = false
        for (id, index) in entries {
            _ = stashed.removeValue(forKey: id)
            forgetSlabClasses(of: id)
            let commit = decisions[id.rawValue] ?? false
            count(commit)
            guard commit else {
                drop(index)
                continue
            }
            if applyStashed(index, view: view) { appliedAllocation = true }
        }
        if appliedAllocation && !deferred.isEmpty { applyDeferred(view: view) }
        if appliedAllocation || replicated > 0 { engine.allocationsApplied.add(1, ordering: .relaxed) }
        entries.removeAll()
        committed.forEach { id, slot in if decisions[id.rawValue] != nil { entries.append((id, slot)) } }
        for (id, slot) in entries {
            _ = committed.removeValue(forKey: id)
            releaseMessages(state.pointee.committedMessages[slot])
            state.pointee.freeCommitted.append(slot)
        }
        for (address, header) in state.pointee.recoveryLocks {
            let object = UnsafeMutableRawPointer(bitPattern: address)!
            if ObjectLayout.loadHeader(object).isLocked { ObjectLayout.unlock(object, restoring: header) }
        }
        state.pointee.recoveryLocks.removeAll()
        publishKept()
        return outcome
    }

    /// Applies one entry to this backup's replica; false if the object's slab is not known here yet.
    private func apply(_ entry: BackupEntry, view: ConfigurationView) -> Bool {
        guard let replica = view.replica(entry.address.region) else { return true }
        guard let applied = Self.apply(entry, at: replica.base, layout: replica.layout) else { return false }
        if state.pointee.persistEveryInstall {
            replica.withRegion { region in
                if let table = applied.tableEntry { try? region.persist(offset: table, length: 2) }
                if let object = applied.object { try? region.persist(offset: object.offset, length: object.length) }
            }
        }
        return true
    }

    /// What ``apply(_:at:layout:)`` wrote: a slab-table entry's offset, an object's bytes.
    struct Applied {
        var tableEntry: Int?
        var object: (offset: Int, length: Int)?
    }

    /// Applies one entry of a committed transaction to the replica of its region mapped at `base`
    /// (a backup at TRUNCATE; any replica in restart recovery): the newest version wins, so
    /// entries may come in any order and more than once. Returns nil if the object's slab is not
    /// known in this replica yet (its allocation has not been applied), else what it wrote. An
    /// entry that does not fit the replica (checked before) is skipped. Takes the mapping's base,
    /// not the region: a reference passed per entry would be retained per entry.
    static func apply(_ entry: BackupEntry, at base: UnsafeMutableRawPointer, layout: SlabLayout) -> Applied? {
        let offset = Int(entry.address.offset)
        let slot: ObjectSlot
        var applied = Applied()
        if entry.operation == .allocate {
            guard entry.lines > 0, offset >= layout.firstSlabOffset, offset + entry.lines * ObjectLayout.lineSize <= layout.regionSize else {
                return applied
            }
            slot = ObjectSlot(offset: offset, lines: entry.lines)
            // The slab's size class is in the table before the object is (a restart rebuilds the
            // allocator from the table, then the headers).
            if SlabAllocator.recordSlabClass(at: base, layout: layout, slot: slot) {
                applied.tableEntry = SlabLayout.tableOffset + (offset >> layout.slabShift) * 2
            }
        } else {
            guard let found = try? SlabAllocator.slot(inRegion: entry.address.region, at: base, layout: layout, offset: offset) else {
                return nil
            }
            slot = found
        }
        guard entry.payload.count <= ObjectLayout.payloadCapacity(lines: slot.lines) else { return applied }
        let object = base + slot.offset
        let current = ObjectLayout.loadHeader(object)
        // Records of different transactions reach a backup in any order; versions only grow.
        guard entry.new.version > current.version else { return applied }
        _ = ObjectLayout.tryLock(object, expected: current)
        switch entry.operation {
        case .write, .allocate:
            ObjectLayout.install(object, lines: slot.lines, payload: entry.payload.baseAddress ?? UnsafeRawPointer(object),
                                 count: entry.payload.count, header: entry.new)
        case .free:
            // Zeroed as at the primary (see release): the result does not depend on which older
            // records arrived before this one.
            ObjectLayout.install(object, lines: slot.lines, payload: UnsafeRawPointer(object), count: 0, header: entry.new)
        }
        applied.object = (slot.offset, slot.lines * ObjectLayout.lineSize)
        return applied
    }
}

/// The records the processor keeps (LOCK records at a primary until COMMIT-PRIMARY, COMMIT-BACKUP
/// records at a backup until TRUNCATE), each with room for words of its own after it (a LOCK's
/// locked-slot words), in entries that are reused: once the pool has grown to the number of
/// records in flight, keeping one allocates nothing.
///
/// A record is not copied: it stays where it lies in the node's log (the sender's ring in this
/// node's mailbox) until the processor releases it, and nothing moves or overwrites a kept
/// message there (a reopened ring restamps only its trailer; the space is reused only after
/// release), so the entry points at it. Only the extra words live in the entry's own buffer.
///
/// Not thread-safe: used only by its lane's record processor, under the lane's claim.
struct RecordPool: ~Copyable {
    /// One kept record: where its bytes lie, its own buffer for extra words, and where it lies
    /// in the log. `next` links the entries not in use (a free list through the entries
    /// themselves). One entry per record, so that keeping or dropping one touches the pool's
    /// header line and one entry line: the processor's state moves between the cores that take
    /// turns serving the mailbox, and every distinct line it touches per record is a miss there.
    private struct Entry {
        var bytes: UnsafeRawPointer?
        var length: Int
        var buffer: UnsafeMutableRawPointer
        var capacity: Int
        var reference: RingReference
        var next: Int
    }

    private var entries: UnsafeMutablePointer<Entry>
    private var count = 0
    private var capacity = 1024
    /// The first entry not in use (-1: none).
    private var firstFree = -1

    init() {
        entries = .allocate(capacity: capacity)
    }

    deinit {
        for index in 0..<count { entries[index].buffer.deallocate() }
        entries.deinitialize(count: count)
        entries.deallocate()
    }

    /// Keeps `record`, which lies in the node's log at `reference` and stays there until released,
    /// with room for `extraWords` 8-byte words of the processor's own; returns the entry's index.
    mutating func keep(_ record: UnsafeRawBufferPointer, extraWords: Int, reference: RingReference) -> Int {
        let needed = extraWords * 8
        let index: Int
        if firstFree >= 0 {
            index = firstFree
            firstFree = entries[index].next
            if entries[index].capacity < needed {
                entries[index].buffer.deallocate()
                entries[index].capacity = max(needed, entries[index].capacity * 2)
                entries[index].buffer = .allocate(byteCount: entries[index].capacity, alignment: 8)
            }
        } else {
            if count == capacity {
                let larger = UnsafeMutablePointer<Entry>.allocate(capacity: capacity * 2)
                larger.moveInitialize(from: entries, count: count)
                entries.deallocate()
                entries = larger
                capacity *= 2
            }
            index = count
            let size = max(needed, 64)
            (entries + index).initialize(to: Entry(bytes: nil, length: 0, buffer: .allocate(byteCount: size, alignment: 8),
                                                   capacity: size, reference: reference, next: -1))
            count += 1
        }
        entries[index].bytes = record.baseAddress
        entries[index].length = record.count
        entries[index].reference = reference
        return index
    }

    /// The record kept in entry `index`.
    func bytes(_ index: Int) -> UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: entries[index].bytes, count: entries[index].length) }

    /// The extra words of entry `index`.
    func extraWords(_ index: Int) -> UnsafeMutablePointer<UInt64> {
        entries[index].buffer.assumingMemoryBound(to: UInt64.self)
    }

    /// Where the record kept in entry `index` lies in the node's log.
    func reference(_ index: Int) -> RingReference { entries[index].reference }

    /// Gives entry `index` back (the record's log space is released by the caller).
    mutating func release(_ index: Int) {
        entries[index].bytes = nil
        entries[index].next = firstFree
        firstFree = index
    }
}

/// Where a kept record lies in the node's log: the sender's ring and the record's stream position
/// there, and a second record of the same ring that goes with it (``none`` if there is none).
struct RingReference {
    static let none = UInt64.max
    let sender: NodeID
    let position: UInt64
    var second: UInt64 = RingReference.none

    init(sender: NodeID, position: UInt64) {
        self.sender = sender
        self.position = position
    }

    var key: UInt64 { UInt64(sender.rawValue) << 56 ^ position }
}
