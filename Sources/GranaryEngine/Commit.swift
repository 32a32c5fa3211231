import GranaryConfiguration
import GranaryMemory
import GranaryTransport
#if canImport(Glibc)
import Glibc
#endif

/// The coordinator's side of FaRM's commit protocol, one method per phase:
/// ``lock()`` -> ``validate()`` -> ``commitBackup(_:)`` -> ``commitPrimary(_:)`` -> ``truncate(_:)``,
/// or ``abort(_:)`` after a failed LOCK or VALIDATE.
extension Transaction {
    /// Commits the attempt, or throws ``AbortSignal`` (after cleaning up) when it must be retried.
    func commit() throws {
        try withEngine { engine in try commit(statistics: engine.statistics) }
    }

    private func commit(statistics stats: EngineStatistics) throws {
        // Phase timers sample one attempt in `phaseTimingInterval` (clock reads and timer updates
        // cost more than some phases); the commit and abort counters count every attempt.
        let timed = executeStart != 0
        var now: UInt64 = 0
        @inline(__always) func mark(_ phase: Phase) {
            guard timed else { return }
            let end = monotonicNanoseconds()
            stats.record(phase, nanoseconds: end - now)
            now = end
        }
        if timed {
            now = monotonicNanoseconds()
            stats.record(.execute, nanoseconds: now - executeStart)
        }
        if writes.isEmpty {
            // Read-only: no records at all. One read is already a consistent snapshot.
            if reads.count > 1 {
                guard try validate(skippingWritten: false) else { throw AbortSignal(cause: .validationFailed) }
                mark(.validate)
            }
            stats.committed(readOnly: true)
            return
        }
        let id = try lock()
        mark(.lock)
        guard try validate(skippingWritten: true) else {
            try abort(id)
            throw AbortSignal(cause: .validationFailed)
        }
        mark(.validate)
        let backups = try commitBackup(id)
        mark(.commitBackup)
        try commitPrimary(id)
        mark(.commitPrimary)
        stats.committed(readOnly: false)
        reservations.removeAll(keepingCapacity: true)  // now owned by the committed objects
        try truncate(id, backups: backups)
        mark(.truncate)
    }

    /// Sets ``primaryMask`` (a bit per node: no allocation) from the write set.
    private func collectPrimaries() {
        var mask: UInt64 = 0
        writes.withUnsafeBufferPointer { writes in
            for entry in writes { mask |= 1 << UInt64(entry.primary.index) }
        }
        primaryMask = mask
    }

    private func ensureRecordCapacity(_ bytes: Int) {
        if bytes > recordCapacity {
            recordBuffer.deallocate()
            recordCapacity = max(bytes, recordCapacity * 2)
            recordBuffer = .allocate(byteCount: recordCapacity, alignment: 8)
        }
    }

    /// Writes a record of `kind` holding the entries for which `include` is true, and sends it.
    private func sendEntries(_ kind: RecordKind, _ id: TransactionID, to node: NodeID,
                             where include: (WriteEntry) -> Bool) throws {
        // Buffer pointers rather than `for entry in writes`, whose iterator holds a reference.
        var size = RecordFormat.headerBytes
        writes.withUnsafeBufferPointer { writes in
            for entry in writes where include(entry) { size += RecordFormat.entryBytes(payload: entry.length) }
        }
        ensureRecordCapacity(size)
        var writer = RecordWriter(into: recordBuffer, capacity: recordCapacity, kind: kind,
                                  configuration: view.configurationID, transaction: id)
        writes.withUnsafeBufferPointer { writes in
            payloads.withUnsafeBytes { payloadBytes in
                for entry in writes where include(entry) {
                    writer.appendEntry(address: entry.address, expected: entry.expected, new: entry.new, lines: entry.lines,
                                       operation: entry.operation, payload: payloadBytes.baseAddress.map { $0 + entry.payloadOffset },
                                       length: entry.length)
                }
            }
        }
        try withView { view in try view.send(writer.bytes, to: node) }
    }

    private func sendHeaderOnly(_ kind: RecordKind, _ id: TransactionID, to node: NodeID) throws {
        let writer = RecordWriter(into: recordBuffer, capacity: recordCapacity, kind: kind,
                                  configuration: view.configurationID, transaction: id)
        try withView { view in try view.send(writer.bytes, to: node) }
    }

    /// LOCK: one record per primary with the written objects, their read versions and new values;
    /// each primary's CPU locks them with compare-and-swap and answers. Waits for every answer.
    func lock() throws -> TransactionID {
        try withEngine { engine in try lock(engine: engine) }
    }

    private func lock(engine: Engine) throws -> TransactionID {
        collectPrimaries()
        let primaries = primaryMask
        var backoff = Backoff(maximumSleepMicroseconds: 50)
        var acquired: TransactionID?
        while acquired == nil {
            acquired = engine.replies.acquire(node: engine.node, replies: primaries.nonzeroBitCount)
            if acquired == nil { backoff.pause() }
        }
        let id = acquired!
        defer { engine.replies.release(id) }
        for primary in NodeMask(primaries) {
            try sendEntries(.lock, id, to: primary) { $0.primary == primary }
            engine.statistics.lockRecordSent()
        }
        let timeout = engine.replyTimeoutNanoseconds
        let neighbours = self.neighbourList
        let primaryEngines = self.unmanagedNeighbours
        let waitResult = engine.replies.wait(id, timeoutNanoseconds: timeout) {
            // Serve the mailboxes of this process's nodes that nobody else is serving: first the
            // ones this answer depends on, the primaries' (LOCK) and this node's (the replies);
            // when they hold nothing, the others' (backups' records would otherwise wait for a
            // poller thread to be scheduled).
            var handled = 0
            for primary in NodeMask(primaries & ~(1 << UInt64(engine.node.index))) {
                handled += primaryEngines[primary.index]?._withUnsafeGuaranteedRef { $0.helpPoll() } ?? 0
            }
            handled += engine.helpPoll()
            if handled == 0 {
                for peer in neighbours { handled += peer._withUnsafeGuaranteedRef { $0.helpPoll() } }
            }
            return handled
        }
        guard let failure = waitResult else {
            var report = [engine.channelReport]
            for primary in NodeMask(primaries & ~(1 << UInt64(engine.node.index))) {
                if let peer = primaryEngines[primary.index] { report.append(peer.takeUnretainedValue().channelReport) }
            }
            engine.logger.error("LOCK of \(id) to \(NodeMask(primaries).map(\.description)) unanswered after \(timeout / 1_000_000) ms\n\(report.joined(separator: "\n"))")
            if Mailbox.crashOnStall {
                // Crash the thread that holds a primary's poll claim, so that the backtrace shows
                // where it is stuck; then this one.
                for primary in NodeMask(primaries) {
                    if let peer = primaryEngines[primary.index], let holder = peer.takeUnretainedValue().mailbox.claimHolderThread {
                        pthread_kill(holder, SIGABRT)
                        sleep(2)
                    }
                }
                fatalError("LOCK unanswered (GRANARY_CRASH_ON_UNANSWERED is set)")
            }
            try abort(id)
            throw TransactionError.peerUnresponsive(NodeID(primaries.trailingZeroBitCount), waitedMilliseconds: Int(timeout / 1_000_000))
        }
        if failure != 0 {
            try abort(id)
            let cause = AbortCause(rawValue: failure) ?? .lockConflict
            if cause == .invalidObject {
                // No retry can fix it: report the written objects the primaries refused.
                throw TransactionError.rejectedByPrimary(
                    writes.map(\.address),
                    reason: "a written object is not an object at its primary, or is smaller than the value written")
            }
            throw AbortSignal(cause: cause)
        }
        return id
    }

    /// VALIDATE: one-sided reads of the header words of objects read (and, when `skippingWritten`,
    /// not written), posted as one batch; false if any changed or is locked.
    func validate(skippingWritten: Bool) throws -> Bool {
        let reads = self.reads
        var checked = 0
        for read in reads where !(skippingWritten && writeIndex[read.address] != nil) { checked += 1 }
        guard checked > 0 else { return true }
        return try withUnsafeTemporaryAllocation(of: UInt64.self, capacity: reads.count) { headers in
            var batch = OperationBatch(capacity: checked)
            for (index, read) in reads.enumerated() {
                if skippingWritten && writeIndex[read.address] != nil {
                    headers[index] = read.header.rawValue
                } else {
                    batch.read(from: read.primary, read.address,
                               into: UnsafeMutableRawBufferPointer(start: headers.baseAddress! + index, count: 8))
                }
            }
            if let failure = Self.execute(engine.transport, &batch) { throw TransactionError.transport(failure) }
            for (index, read) in reads.enumerated() where headers[index] != read.header.rawValue {
                return false
            }
            return true
        }
    }

    private static func execute(_ transport: any Transport, _ batch: inout OperationBatch) -> TransportError? {
        do {
            try transport.execute(&batch)
            return nil
        } catch {
            return error
        }
    }

    /// COMMIT-BACKUP: one record per backup node with the new values of the objects it backs up.
    /// Waits only for the writes' completion, never for the backups' CPUs. Returns the backups.
    func commitBackup(_ id: TransactionID) throws -> UInt64 {
        let masks = view.backupMasks
        var nodes: UInt64 = 0
        writes.withUnsafeBufferPointer { writes in
            for entry in writes { nodes |= masks[entry.address.region.index] }
        }
        for node in NodeMask(nodes) {
            let bit: UInt64 = 1 << UInt64(node.index)
            try sendEntries(.commitBackup, id, to: node) { masks[$0.address.region.index] & bit != 0 }
        }
        return nodes
    }

    /// COMMIT-PRIMARY: tell each primary to install and unlock. The transaction is committed once the
    /// first of these writes completes (every backup already holds its record).
    func commitPrimary(_ id: TransactionID) throws {
        for primary in NodeMask(primaryMask) { try sendHeaderOnly(.commitPrimary, id, to: primary) }
    }

    /// ABORT: release the locks at every primary and return reserved slots.
    func abort(_ id: TransactionID) throws {
        for primary in NodeMask(primaryMask) { try sendHeaderOnly(.abort, id, to: primary) }
        returnReservations()
    }

    /// TRUNCATE, lazily: remember the transaction per backup; a batch goes out in one record once
    /// ``EngineOptions/truncationBatch`` transactions are waiting for that backup.
    func truncate(_ id: TransactionID, backups: UInt64) throws {
        try withEngine { engine in try truncate(id, backups: backups, engine: engine) }
    }

    private func truncate(_ id: TransactionID, backups: UInt64, engine: Engine) throws {
        for backup in NodeMask(backups) {
            if let batch = engine.pendingTruncation.add(id, for: backup, limit: engine.truncationBatch) {
                try engine.sendTruncate(batch, to: backup)
            }
        }
    }
}

/// The nodes of a bit mask (bit n: node n), in ascending order.
struct NodeMask: Sequence, IteratorProtocol {
    var bits: UInt64
    init(_ bits: UInt64) { self.bits = bits }
    mutating func next() -> NodeID? {
        guard bits != 0 else { return nil }
        let index = bits.trailingZeroBitCount
        bits &= bits - 1
        return NodeID(index)
    }
}

extension Engine {
    /// Sends one TRUNCATE record listing `ids` to `backup`.
    func sendTruncate(_ ids: [TransactionID], to backup: NodeID) throws(TransactionError) {
        let bytes = RecordFormat.headerBytes + ids.count * 8
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 8)
        defer { buffer.deallocate() }
        var writer = RecordWriter(into: buffer, capacity: bytes, kind: .truncate, configuration: configuration.id,
                                  transaction: TransactionID(rawValue: 0))
        for id in ids { writer.appendTransaction(id) }
        try send(writer.bytes, to: backup)
    }

    /// Runs `body` as a transaction on this node, committing it and retrying on conflicts.
    ///
    /// Blocks the calling thread while it waits for LOCK replies and between attempts. See
    /// `Node.transaction` for the async form, which waits between attempts without blocking.
    public func run<R>(_ body: (Transaction) throws -> R) throws -> R {
        let transaction = Transaction(engine: self)
        var attempt = 0
        var lastCause = AbortCause.lockConflict
        while attempt < options.maximumAttempts {
            attempt += 1
            switch try self.attempt(transaction, body) {
            case .committed(let result):
                return result
            case .aborted(let cause):
                lastCause = cause
                let wait = retryDelay(afterAttempt: attempt)
                if wait > 1_000 { usleep(UInt32(wait / 1_000)) }
            }
        }
        throw TransactionError.conflict(lastCause, attempts: attempt)
    }

    /// The outcome of one attempt.
    public enum AttemptOutcome<R> {
        case committed(R)
        case aborted(AbortCause)
    }

    /// Runs one attempt of `body` in `transaction` (which it resets first) and commits it.
    ///
    /// - Returns: `.aborted` on a conflict, after releasing everything the attempt held.
    /// - Throws: ``TransactionError`` for errors no retry can fix, or what `body` throws.
    public func attempt<R>(_ transaction: Transaction, _ body: (Transaction) throws -> R) throws -> AttemptOutcome<R> {
        guard running.load(ordering: .relaxed) else { throw TransactionError.shutDown(node) }
        transaction.reset()
        transaction.attemptCount &+= 1
        transaction.executeStart = transaction.attemptCount % phaseTimingInterval == 0 ? monotonicNanoseconds() : 0
        do {
            let result = try body(transaction)
            try transaction.commit()
            return .committed(result)
        } catch let signal as AbortSignal {
            transaction.returnReservations()
            statistics.aborted(signal.cause)
            return .aborted(signal.cause)
        } catch {
            transaction.returnReservations()
            throw error
        }
    }

    /// A randomised, exponentially growing wait before the next attempt, in nanoseconds.
    public func retryDelay(afterAttempt attempt: Int) -> UInt64 {
        let limit = min(options.retryBackoffCapNanoseconds, options.retryBackoffBaseNanoseconds << UInt64(min(attempt, 20)))
        return UInt64.random(in: 0...limit)
    }

    /// A fresh transaction object for ``attempt(_:_:)`` loops.
    public func makeTransaction() -> Transaction { Transaction(engine: self) }
}
