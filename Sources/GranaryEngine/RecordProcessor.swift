import GranaryConfiguration
import GranaryMemory
import GranaryTransport
import Synchronization

/// The node-side half of the commit protocol: what the poller does with each record in its mailbox.
/// As a primary it locks (LOCK), installs (COMMIT-PRIMARY) and unlocks (ABORT); as a backup it keeps
/// COMMIT-BACKUP records and applies them at TRUNCATE.
///
/// `@unchecked Sendable`: everything but the two published counters is touched only while holding
/// the engine's polling try-lock (``Engine/pollOnce()``); `engine` is set once before any polling.
final class RecordProcessor: @unchecked Sendable {
    unowned(unsafe) var engine: Engine!
    let pendingCount = Atomic<Int>(0)
    let stashedCount = Atomic<Int>(0)

    struct LockedObject {
        let replica: LocalReplica
        let slot: ObjectSlot
        let expected: ObjectHeader
        let new: ObjectHeader
        let operation: EntryOperation
        let payload: [UInt8]
    }

    struct BackupEntry {
        let address: GlobalAddress
        let new: ObjectHeader
        let lines: Int
        let operation: EntryOperation
        let payload: [UInt8]
    }

    /// Channels whose ring held bytes that are not records from their sender.
    var brokenChannels = Set<NodeID>()
    /// Bit n: poll the ring of node n (every node that was ever a member).
    let channelsInUse = Atomic<UInt64>(0)
    private var locked: [TransactionID: [LockedObject]] = [:]
    private var stashed: [TransactionID: [BackupEntry]] = [:]
    /// Truncated entries for objects whose allocation has not reached this backup yet (records of
    /// different coordinators arrive in any order); applied once it has.
    private var deferred: [BackupEntry] = []
    private let replyBuffer = UnsafeMutableRawPointer.allocate(byteCount: RecordFormat.headerBytes, alignment: 8)

    deinit { replyBuffer.deallocate() }

    func handle(from sender: NodeID, _ bytes: UnsafeRawBufferPointer) {
        let record: RecordView
        do {
            record = try RecordView(bytes)
        } catch {
            engine.statistics.rejected()
            engine.logger.info("rejected a record from \(sender): \(error)")
            return
        }
        let view = engine.view
        guard view.isMember(sender) else {
            // Precise membership: a node outside the configuration changes nothing here.
            engine.statistics.rejected()
            engine.logger.info("rejected a \(record.kind) record from \(sender), which is not a member of \(view.configuration.id)")
            if record.kind == .lock { reply(to: record.transaction, failure: .wrongConfiguration, view: view) }
            return
        }
        guard record.configuration == view.configuration.id else {
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
            case .lock: try lock(record, view: view)
            case .lockReply: engine.replies.deliver(record.transaction, failure: record.cause)
            case .commitPrimary: commitPrimary(record.transaction)
            case .abort: abort(record.transaction)
            case .commitBackup: try commitBackup(record, view: view)
            case .truncate: try truncate(record, view: view)
            }
        } catch {
            engine.statistics.rejected()
            engine.logger.info("rejected a \(record.kind) record of \(record.transaction) from \(sender): \(error)")
        }
    }

    /// Replies that found their channel busy or full, in order, per coordinator node.
    private var unsent: [NodeID: [[UInt8]]] = [:]
    let unsentCount = Atomic<Int>(0)

    /// Answers a LOCK without ever waiting: a reply that cannot go now waits here and goes out at
    /// the next poll (``flushReplies(view:)``). A poller that blocked on a full ring could deadlock
    /// with a peer's poller blocked on ours.
    private func reply(to transaction: TransactionID, failure: AbortCause?, view: ConfigurationView) {
        let writer = RecordWriter(into: replyBuffer, capacity: RecordFormat.headerBytes, kind: .lockReply,
                                  configuration: view.configuration.id, transaction: transaction,
                                  cause: failure?.rawValue ?? 0)
        let node = transaction.node
        if unsent[node]?.isEmpty ?? true, let sender = view.senders[node.index] {
            do {
                if try sender.trySend(writer.bytes) { return }
            } catch {
                engine.logger.info("could not answer \(transaction): \(error)")
                return
            }
        }
        unsent[node, default: []].append(Array(writer.bytes))
        unsentCount.add(1, ordering: .relaxed)
    }

    /// Sends the replies that could not go before, as far as the channels take them.
    func flushReplies(view: ConfigurationView) {
        guard unsentCount.load(ordering: .relaxed) > 0 else { return }
        for (node, replies) in unsent where !replies.isEmpty {
            guard let sender = view.senders[node.index] else { continue }
            var sent = 0
            for reply in replies {
                let ok = (try? reply.withUnsafeBytes { try sender.trySend($0) }) ?? true
                if !ok { break }
                sent += 1
            }
            unsent[node]!.removeFirst(sent)
            unsentCount.subtract(sent, ordering: .relaxed)
        }
    }

    // MARK: Primary

    /// LOCK at the primary's CPU: compare-and-swap each object's header from the version the
    /// coordinator read to locked. All or nothing per record.
    private func lock(_ record: RecordView, view: ConfigurationView) throws {
        var objects: [LockedObject] = []
        objects.reserveCapacity(record.count)
        var failure: AbortCause?
        try record.forEachEntry { entry in
            guard failure == nil else { return }
            guard let replica = view.localReplica(entry.address.region), let allocator = replica.allocator,
                  let slot = try? allocator.slot(at: Int(entry.address.offset)),
                  entry.payload.count <= ObjectLayout.payloadCapacity(lines: slot.lines) else {
                failure = .invalidObject
                return
            }
            let object = replica.region.base + slot.offset
            if ObjectLayout.tryLock(object, expected: entry.expected).locked {
                objects.append(LockedObject(replica: replica, slot: slot, expected: entry.expected, new: entry.new,
                                            operation: entry.operation, payload: Array(entry.payload)))
            } else {
                failure = .lockConflict
            }
        }
        if let failure {
            for object in objects {
                ObjectLayout.unlock(object.replica.region.base + object.slot.offset, restoring: object.expected)
            }
            reply(to: record.transaction, failure: failure, view: view)
            return
        }
        locked[record.transaction] = objects
        pendingCount.store(locked.count, ordering: .releasing)
        reply(to: record.transaction, failure: nil, view: view)
    }

    /// COMMIT-PRIMARY: install the new values, bump versions, unlock.
    private func commitPrimary(_ transaction: TransactionID) {
        guard let objects = locked.removeValue(forKey: transaction) else {
            engine.logger.info("COMMIT-PRIMARY for \(transaction), which holds no locks here")
            return
        }
        pendingCount.store(locked.count, ordering: .releasing)
        for object in objects {
            let base = object.replica.region.base + object.slot.offset
            switch object.operation {
            case .write, .allocate:
                object.payload.withUnsafeBytes { payload in
                    ObjectLayout.install(base, lines: object.slot.lines, payload: payload.baseAddress ?? UnsafeRawPointer(base),
                                         count: payload.count, header: object.new)
                }
                if object.operation == .allocate { object.replica.allocator?.didAllocate(object.slot) }
            case .free:
                ObjectLayout.stamp(base, lines: object.slot.lines, header: object.new)
                object.replica.allocator?.didFree(object.slot)
            }
            if engine.persistEveryInstall {
                try? object.replica.region.persist(offset: object.slot.offset, length: object.slot.lines * ObjectLayout.lineSize)
            }
        }
    }

    /// ABORT: release the locks, restoring the headers as they were.
    private func abort(_ transaction: TransactionID) {
        guard let objects = locked.removeValue(forKey: transaction) else { return }
        pendingCount.store(locked.count, ordering: .releasing)
        for object in objects {
            ObjectLayout.unlock(object.replica.region.base + object.slot.offset, restoring: object.expected)
        }
    }

    // MARK: Backup

    /// COMMIT-BACKUP: keep the record until TRUNCATE. (The coordinator waits only for the write's
    /// completion, not for this.)
    private func commitBackup(_ record: RecordView, view: ConfigurationView) throws {
        var entries: [BackupEntry] = []
        entries.reserveCapacity(record.count)
        try record.forEachEntry { entry in
            guard let replica = view.localReplica(entry.address.region), replica.allocator == nil else {
                throw RecordView.Malformed(description: "\(entry.address.region) has no backup replica on \(engine.node)")
            }
            entries.append(BackupEntry(address: entry.address, new: entry.new, lines: entry.lines,
                                       operation: entry.operation, payload: Array(entry.payload)))
        }
        stashed[record.transaction] = entries
        stashedCount.store(stashed.count + deferred.count, ordering: .releasing)
    }

    /// TRUNCATE: apply the kept records to the backup replicas, newest version wins, then drop them.
    private func truncate(_ record: RecordView, view: ConfigurationView) throws {
        var appliedAllocation = false
        for id in try record.transactionIDs() {
            guard let entries = stashed.removeValue(forKey: id) else { continue }
            for entry in entries {
                if !apply(entry, view: view) { deferred.append(entry) }
                appliedAllocation = appliedAllocation || entry.operation == .allocate
            }
        }
        if appliedAllocation && !deferred.isEmpty {
            deferred = deferred.filter { !apply($0, view: view) }
        }
        stashedCount.store(stashed.count + deferred.count, ordering: .releasing)
    }

    /// Applies one entry to this backup's replica; false if the object's slab is not known here yet.
    /// Applies every kept backup record of `regions` (this node was promoted to their primary).
    /// Transaction recovery, which decides the fate of transactions whose coordinator failed
    /// between COMMIT-BACKUP and COMMIT-PRIMARY, is not implemented yet: kept records are applied.
    func applyKept(regions: Set<RegionID>, view: ConfigurationView) {
        for (id, entries) in stashed {
            let mine = entries.filter { regions.contains($0.address.region) }
            guard !mine.isEmpty else { continue }
            for entry in mine where !apply(entry, view: view) { deferred.append(entry) }
            stashed[id] = entries.filter { !regions.contains($0.address.region) }
        }
        deferred = deferred.filter { !apply($0, view: view) }
        stashedCount.store(stashed.count + deferred.count, ordering: .releasing)
    }

    private func apply(_ entry: BackupEntry, view: ConfigurationView) -> Bool {
        guard let replica = view.localReplica(entry.address.region) else { return true }
        let offset = Int(entry.address.offset)
        let slot: ObjectSlot
        if entry.operation == .allocate {
            slot = ObjectSlot(offset: offset, lines: entry.lines)
            SlabAllocator.recordSlabClass(in: replica.region, layout: replica.layout, slot: slot)
        } else {
            guard let found = try? SlabAllocator.slot(in: replica.region, layout: replica.layout, at: offset) else {
                return false
            }
            slot = found
        }
        let base = replica.region.base + slot.offset
        let current = ObjectLayout.loadHeader(base)
        // Records of different transactions reach a backup in any order; versions only grow.
        guard entry.new.version > current.version else { return true }
        _ = ObjectLayout.tryLock(base, expected: current)
        switch entry.operation {
        case .write, .allocate:
            entry.payload.withUnsafeBytes { payload in
                ObjectLayout.install(base, lines: slot.lines, payload: payload.baseAddress ?? UnsafeRawPointer(base),
                                     count: payload.count, header: entry.new)
            }
        case .free:
            ObjectLayout.stamp(base, lines: slot.lines, header: entry.new)
        }
        if engine.persistEveryInstall {
            try? replica.region.persist(offset: slot.offset, length: slot.lines * ObjectLayout.lineSize)
        }
        return true
    }
}
