import GranaryConfiguration
import GranaryMemory
import GranaryTransport
#if canImport(Glibc)
import Glibc
#endif

/// The coordinator's side of FaRM's commit protocol, one method per phase:
/// log space promised (``promiseLogSpace(engine:waitForRoom:)``) -> LOCK (``sendLock``, ``waitForLock``, ``endLock``)
/// -> ``validate()`` -> ``commitBackup(_:)`` -> ``commitPrimary(_:)`` -> ``truncate(_:)``,
/// or ``abort(_:)`` after a failed LOCK or VALIDATE.
extension Transaction {
    /// Commits the attempt, or throws ``AbortSignal`` (after cleaning up) when it must be retried.
    ///
    /// Every failure has one exact outcome:
    /// - before COMMIT-BACKUP begins (a record too large, a LOCK that fails or is not answered, a
    ///   VALIDATE read that fails), ABORT goes to every primary that may hold a lock, and the
    ///   error (or a retry) is certain: nothing was written;
    /// - while COMMIT-BACKUP records go out, a failure sends ABORT to the backups that got one,
    ///   then to the primaries; if every backup's ABORT was delivered the transaction certainly
    ///   did not commit (the error is thrown), else ``TransactionError/outcomeUnknown(reason:)``;
    /// - once every backup holds its record, the transaction is committed as soon as one
    ///   COMMIT-PRIMARY is delivered; if none can be, ``TransactionError/outcomeUnknown(reason:)``
    ///   (the logs will commit it: recovery rolls forward what the backups hold);
    /// - TRUNCATE never turns a committed transaction into an error.
    ///
    /// With `spinNanoseconds`, a commit whose LOCK replies are not all in after that long stops
    /// there and returns false, holding its locks' claim on the commit gate and its reply slot;
    /// ``resumeCommit(spinNanoseconds:)`` goes on with it (an async caller waits in between
    /// without a thread). Without it, the commit waits on this thread. Returns true once the
    /// commit finished.
    func commit(spinNanoseconds: UInt64? = nil) throws -> Bool {
        try withEngine { engine in
            guard engine.running.load(ordering: .relaxed) else { throw TransactionError.shutDown(engine.node) }
            return try commit(engine: engine, statistics: engine.statistics, spinNanoseconds: spinNanoseconds)
        }
    }

    /// Goes on with a commit that ``commit(spinNanoseconds:)`` left waiting for LOCK replies: the
    /// same outcomes. Returns false if the replies are still not all in after `spinNanoseconds`
    /// more (call again), true once the commit finished.
    func resumeCommit(spinNanoseconds: UInt64?) throws -> Bool {
        try withEngine { engine in
            guard let waiting = state.pointee.waitingLock else { return true }
            var keepsPromises = false
            defer { if !keepsPromises { endPromises() } }
            var deadline = waiting.deadline
            let result = waitForLock(waiting.id, engine: engine, deadline: &deadline, spinNanoseconds: spinNanoseconds)
            if result == .stillWaiting {
                state.pointee.waitingLock?.deadline = deadline
                keepsPromises = true
                return false
            }
            state.pointee.waitingLock = nil
            defer { engine.gate.leave(waiting.shard) }
            try endLock(waiting.id, result, engine: engine)
            try commitLocked(waiting.id, engine: engine, statistics: engine.statistics) { _ in }
            return true
        }
    }

    /// Stops waiting for the LOCK replies of a commit left waiting (the caller's task was
    /// cancelled): the next ``resumeCommit(spinNanoseconds:)`` aborts it (ABORT to its primaries).
    func abandonLockWait() {
        guard let waiting = state.pointee.waitingLock else { return }
        withEngine { $0.replies.abandon(waiting.id, failure: AbortCause.lockConflict.rawValue) }
    }

    /// Whether every object this attempt read or writes lies in a region `gate` does not block
    /// (asked only while a recovery blocks just the recovering regions).
    private func touchesNoRecoveringRegion(_ gate: CommitGate) -> Bool {
        let writes = state.pointee.writes.withUnsafeBufferPointer { writes in
            !writes.contains { gate.isBlocked($0.address.region) }
        }
        guard writes else { return false }
        return state.pointee.reads.withUnsafeBufferPointer { reads in
            !reads.contains { gate.isBlocked($0.address.region) }
        }
    }

    private func commit(engine: Engine, statistics stats: EngineStatistics, spinNanoseconds: UInt64?) throws -> Bool {
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
                // Reads routed by a configuration recovery has since replaced may have gone to a
                // removed primary: read again in the new one.
                guard engine.isCurrentView(state.pointee.viewRef) else { throw AbortSignal(cause: .wrongConfiguration) }
                guard try validate(skippingWritten: false) else { throw AbortSignal(cause: .validationFailed) }
                mark(.validate)
            }
            stats.committed(readOnly: true)
            return true
        }
        try checkRecordSizes()
        // BLOCK (transaction-state recovery): no commit starts while recovery runs, but for one
        // that touches no recovering region once every member has acknowledged; and one that began in a
        // configuration since replaced starts again in the new one.
        var admittedDuringRecovery = false
        guard let shard = engine.gate.enter(admits: {
            admittedDuringRecovery = true
            return touchesNoRecoveringRegion(engine.gate)
        }) else {
            // The caller's retry loop waits for the gate (`Engine.run` on its thread,
            // `Node.transaction` without holding a thread of the cooperative pool, which the
            // recovery that opens the gate may need).
            throw AbortSignal(cause: .wrongConfiguration)
        }
        var holdsGate = true
        defer { if holdsGate { engine.gate.leave(shard) } }
        guard engine.isCurrentView(state.pointee.viewRef) else { throw AbortSignal(cause: .wrongConfiguration) }
        state.pointee.stamp = admittedDuringRecovery ? max(engine.gate.recoveryTarget, withView { $0.configurationID }) : withView { $0.configurationID }
        // Owed records wait while a recovery runs: it decides those sent before it, and the
        // others go once every member has moved (stamped so that all take them).
        if engine.owed.count.load(ordering: .relaxed) > 0, !engine.gate.isClosed { engine.resolveOwedRecords() }
        try promiseLogSpace(engine: engine, waitForRoom: spinNanoseconds == nil)
        var keepsPromises = false
        defer { if !keepsPromises { endPromises() } }
        let id = try sendLock(engine: engine, waitForRoom: spinNanoseconds == nil)
        var deadline: UInt64 = 0
        let result: ReplySlots.WaitResult = engine.faults.fails(.lockReply, engine.node)
            ? .timedOut : waitForLock(id, engine: engine, deadline: &deadline, spinNanoseconds: spinNanoseconds)
        if result == .stillWaiting {
            state.pointee.waitingLock = WaitingLock(id: id, shard: shard, deadline: deadline)
            holdsGate = false
            keepsPromises = true
            return false
        }
        try endLock(id, result, engine: engine)
        mark(.lock)
        try commitLocked(id, engine: engine, statistics: stats, mark: mark)
        return true
    }

    /// The commit after LOCK: VALIDATE -> COMMIT-BACKUP -> COMMIT-PRIMARY -> TRUNCATE.
    private func commitLocked(_ id: TransactionID, engine: Engine, statistics stats: EngineStatistics,
                              mark: (Phase) -> Void) throws {
        let valid: Bool
        do {
            valid = try validate(skippingWritten: true, engine: engine)
        } catch {
            abortLocked(id, engine: engine)
            throw error
        }
        guard valid else {
            abortLocked(id, engine: engine)
            throw AbortSignal(cause: .validationFailed)
        }
        mark(.validate)
        let backups = try commitBackup(id, engine: engine)
        mark(.commitBackup)
        // Who keeps the proof of the commit until TRUNCATE: the backups' COMMIT-BACKUP records
        // when there are backups (primaries then release their LOCK and COMMIT-PRIMARY records as
        // they install), else the primaries' records.
        let truncated = backups != 0 ? backups : primaryMask
        let undelivered = try commitPrimary(id, backups: backups, truncating: truncated, engine: engine)
        if engine.gate.isFenced, !grantedAfterRecordsLanded(engine: engine) {
            // The lease lapsed while the records went out and no grant came after: this node may
            // have been removed and the others may have refused records that arrived after they
            // drained their logs. Recovery decides; this node cannot say which way (and sends no
            // TRUNCATE: a backup that had not taken its votes would apply and forget a transaction
            // that recovery may abort).
            throw TransactionError.outcomeUnknown(reason: "\(engine.node)'s lease from the configuration manager lapsed while \(id) was committing, and no grant came after its records landed")
        }
        mark(.commitPrimary)
        stats.committed(readOnly: false)
        reservations.removeAll(keepingCapacity: true)  // now owned by the committed objects
        remoteReservations.removeAll(keepingCapacity: true)
        if undelivered == 0 { truncate(id, nodes: truncated, engine: engine) }
        mark(.truncate)
    }

    /// Called when the lease lapsed while a commit's records went out (every send returned: they
    /// are in the receivers' rings). Waits for the CM's next grant: true once the grant word holds
    /// a value written after the records landed, false (the outcome stays unknown) if a recovery
    /// closes the gate, the engine stops or ``EngineOptions/replyTimeout`` passes first.
    ///
    /// A grant written after the records landed proves they count: the CM grants only members of
    /// its configuration that it does not suspect, and commits a configuration without a node only
    /// a lease plus a margin after its last grant to it; so no configuration without this node was
    /// committed before the records landed, and no receiver had drained its logs for one. A
    /// configuration that keeps this node drains nothing before this node acknowledges it, which
    /// waits for this commit (it holds the gate), so a recovery that starts meanwhile ends the wait.
    private func grantedAfterRecordsLanded(engine: Engine) -> Bool {
        let word = engine.leaseGrantWord
        let landed = word.pointee.load(ordering: .acquiring)
        let deadline = monotonicNanoseconds() + engine.replyTimeoutNanoseconds
        while word.pointee.load(ordering: .acquiring) == landed {
            guard !engine.gate.isRecovering, engine.running.load(ordering: .relaxed),
                  monotonicNanoseconds() < deadline else { return false }
            usleep(20)
        }
        return true
    }

    /// Sets ``primaryMask`` (a bit per node: no allocation) from the write set.
    private func collectPrimaries() {
        var mask: UInt64 = 0
        writes.withUnsafeBufferPointer { writes in
            for entry in writes { mask |= 1 << UInt64(entry.primary.index) }
        }
        primaryMask = mask
    }

    /// Refuses, before anything is locked, a transaction one of whose LOCK or COMMIT-BACKUP records
    /// would not fit a channel: ``TransactionError/tooLarge(bytes:maximum:)`` names the record's
    /// size and the limit. (Cheap when the whole write set fits one record, the common case.)
    func checkRecordSizes() throws(TransactionError) {
        let maximum = withView { $0.maximumRecordBytes }
        var total = RecordFormat.headerBytes + RecordFormat.trailerBytes
        writes.withUnsafeBufferPointer { writes in
            for entry in writes { total += RecordFormat.entryBytes(payload: entry.length) }
        }
        guard total > maximum else { return }
        guard writes.count <= RecordFormat.maximumEntries else {
            throw .tooLarge(bytes: total, maximum: maximum)
        }
        // A COMMIT-BACKUP carries the whole write set: with backups, it is the largest record.
        let masks = withView { $0.backupMasks }
        var backedUp = false
        writes.withUnsafeBufferPointer { writes in
            for entry in writes where masks[entry.address.region.index] != 0 { backedUp = true }
        }
        if backedUp { throw .tooLarge(bytes: total, maximum: maximum) }
        // Without backups: the LOCK record to each primary.
        var largest = 0
        for node in 0..<NodeID.limit {
            var lockBytes = RecordFormat.headerBytes + RecordFormat.trailerBytes
            writes.withUnsafeBufferPointer { writes in
                for entry in writes where entry.primary.index == node { lockBytes += RecordFormat.entryBytes(payload: entry.length) }
            }
            largest = max(largest, lockBytes)
        }
        if largest > maximum { throw .tooLarge(bytes: largest, maximum: maximum) }
    }

    private func ensureRecordCapacity(_ bytes: Int) {
        if bytes > recordCapacity {
            recordBuffer.deallocate()
            recordCapacity = max(bytes, recordCapacity * 2)
            recordBuffer = .allocate(byteCount: recordCapacity, alignment: 8)
        }
    }

    /// Writes a record of `kind` holding the entries for which `include` is true, and sends it.
    /// With `replicatingOthers` (COMMIT-BACKUP) it holds every entry, those for which `include` is
    /// false marked ``RecordFormat/replicatedEntry``.
    private func sendEntries(_ kind: RecordKind, _ id: TransactionID, to node: NodeID, waiting: Bool = true,
                             replicatingOthers: Bool = false, where include: (WriteEntry) -> Bool) throws(TransactionError) {
        // Buffer pointers rather than `for entry in writes`, whose iterator holds a reference.
        // LOCK and COMMIT-BACKUP (the only kinds sent here) end with the transaction's backups.
        var size = RecordFormat.headerBytes + RecordFormat.trailerBytes
        writes.withUnsafeBufferPointer { writes in
            for entry in writes where replicatingOthers || include(entry) { size += RecordFormat.entryBytes(payload: entry.length) }
        }
        ensureRecordCapacity(size)
        var writer = RecordWriter(into: recordBuffer, capacity: recordCapacity, kind: kind,
                                  configuration: state.pointee.stamp, transaction: id)
        writes.withUnsafeBufferPointer { writes in
            payloads.withUnsafeBytes { payloadBytes in
                for entry in writes {
                    let own = include(entry)
                    guard own || replicatingOthers else { continue }
                    writer.appendEntry(address: entry.address, expected: entry.expected, new: entry.new, lines: entry.lines,
                                       operation: entry.operation, payload: payloadBytes.baseAddress.map { $0 + entry.payloadOffset },
                                       length: entry.length, flags: own ? 0 : RecordFormat.replicatedEntry)
                }
            }
        }
        writer.appendTrailer(backups: backupMask)
        try sendRecord(writer.bytes, to: node, promised: true, waiting: waiting)
    }

    /// Sends a record of this commit to `node`. `promised` (LOCK, COMMIT-BACKUP, COMMIT-PRIMARY):
    /// in the space ``promiseLogSpace(engine:waitForRoom:)`` promised it, waiting for room only
    /// with `waiting` (else ``TransportError/channelFull(receiver:waitedMilliseconds:)`` at once).
    @inline(__always)
    func sendRecord(_ bytes: UnsafeRawBufferPointer, to node: NodeID, usingReserve: Bool = false,
                    promised: Bool = false, waiting: Bool = true) throws(TransactionError) {
        let failure: TransactionError? = state.pointee.viewRef._withUnsafeGuaranteedRef { view in
            do throws(TransactionError) {
                if !usingReserve && view.channelFillsUp(to: node) { withEngine { $0.flushTruncations(to: node) } }
                if usingReserve {
                    try view.send(bytes, to: node, usingReserve: true)
                } else {
                    do throws(TransactionError) {
                        try view.send(bytes, to: node, waiting: false, promised: promised)
                    } catch .transport(.channelFull) {
                        // Full after all (others filled it since the look above): the ring holds
                        // records kept until TRUNCATE, and the TRUNCATEs pending for this node may
                        // be what frees it. They go first, on the reserve kept for them; then this
                        // record waits for room, if it may.
                        withEngine { $0.flushTruncations(to: node) }
                        try view.send(bytes, to: node, waiting: waiting, promised: promised)
                    }
                }
                return nil
            } catch {
                return error
            }
        }
        if let failure { throw failure }
    }

    /// FaRM reserves log space before a commit starts, so that no commit ever waits half-way for
    /// room that only other commits' TRUNCATEs could free (they may be waiting the same way). Each
    /// receiver's log promises this commit the space of every record it may send there: to a
    /// primary its LOCK and COMMIT-PRIMARY, to a backup its COMMIT-BACKUP (``ChannelSender/promise(_:)``).
    /// ABORT and TRUNCATE need no promise: they use the ring's reserve, and free space.
    ///
    /// Nothing is sent while a log has no room (the promises made are given back): this thread
    /// sends the TRUNCATEs it has pending for that node and waits, holding nothing, serving the
    /// receiver's mailbox if it is in this process, up to the channel's send timeout; without
    /// `waitForRoom`, once a millisecond passes in which serving it handled nothing (a receiver
    /// elsewhere, or paused), the attempt ends as ``AbortCause/logFull`` (a caller that must not
    /// hold its thread retries after a pause).
    private func promiseLogSpace(engine: Engine, waitForRoom: Bool) throws {
        collectPrimaries()
        let masks = view.backupMasks
        let promises = state.pointee.promises
        let lockBytes = promises + NodeID.limit
        let backupBytes = lockBytes + NodeID.limit
        let primaries = primaryMask
        var backups: UInt64 = 0
        let emptyRecord = RecordFormat.headerBytes + RecordFormat.trailerBytes
        for primary in NodeMask(primaries) { lockBytes[primary.index] = emptyRecord }
        // Every COMMIT-BACKUP carries the whole write set (``RecordFormat``).
        var wholeRecord = emptyRecord
        writes.withUnsafeBufferPointer { writes in
            for entry in writes {
                let bytes = RecordFormat.entryBytes(payload: entry.length)
                lockBytes[entry.primary.index] += bytes
                wholeRecord += bytes
                backups |= masks[entry.address.region.index]
            }
        }
        for backup in NodeMask(backups) { backupBytes[backup.index] = wholeRecord }
        backupMask = backups
        let nodes = primaries | backups
        for node in NodeMask(nodes) {
            let bit: UInt64 = 1 << UInt64(node.index)
            var total = 0
            if primaries & bit != 0 {
                total += ChannelFormat.stride(lockBytes[node.index]) + ChannelFormat.stride(RecordFormat.headerBytes)
            }
            if backups & bit != 0 { total += ChannelFormat.stride(backupBytes[node.index]) }
            promises[node.index] = total
        }
        var start: UInt64 = 0
        var progress: UInt64 = 0  // when serving the receiver's mailbox last handled something
        var backoff = Backoff(maximumSleepMicroseconds: 200)
        while true {
            var refused: NodeID?
            state.pointee.viewRef._withUnsafeGuaranteedRef { view in
                for node in NodeMask(nodes) {
                    guard view.promise(promises[node.index], to: node) else {
                        refused = node
                        return
                    }
                    state.pointee.promisedMask |= 1 << UInt64(node.index)
                }
            }
            guard let node = refused else {
                // After a wait, the configuration may have moved on (a recovery that gave up
                // waiting for this commit): records routed by the old one would miss new backups.
                if start != 0, !engine.isCurrentView(state.pointee.viewRef) {
                    endPromises()
                    throw AbortSignal(cause: .wrongConfiguration)
                }
                return
            }
            endPromises()
            // A receiver being removed will not free its log, and while a recovery waits for the
            // commits in flight to end, this one must not wait: it starts again once commits do.
            if engine.mustStopWaiting(on: nodes) { throw AbortSignal(cause: .wrongConfiguration) }
            let now = monotonicNanoseconds()
            if start == 0 {
                start = now
                progress = now
                // The TRUNCATEs pending for that node may be what keeps its log full: once they
                // are taken (microseconds, as a rule), the space of the records they release is free.
                engine.flushTruncations(to: node)
            }
            if !waitForRoom, now - progress > 1_000_000 { throw AbortSignal(cause: .logFull) }
            if now - start > (view.senders[node.index]?.sendTimeoutNanoseconds ?? 10_000_000_000) {
                throw TransactionError.transport(.channelFull(receiver: node, waitedMilliseconds: Int((now - start) / 1_000_000)))
            }
            // A receiver in this process: serve its mailbox meanwhile (the TRUNCATEs just sent
            // free its log once taken), as a LOCK wait does.
            let helped = helpPoll(node, engine: engine)
            if helped == 0 { backoff.pause() } else { progress = monotonicNanoseconds() }
        }
    }

    /// Gives back this commit's promises (``promiseLogSpace(engine:waitForRoom:)``) when it ends,
    /// whichever way. (Until then a record it sent counts twice, in the ring and in the promise:
    /// one give-back per log instead of one per record, and never less room than promised.)
    func endPromises() {
        let mask = state.pointee.promisedMask
        guard mask != 0 else { return }
        let promises = state.pointee.promises
        state.pointee.viewRef._withUnsafeGuaranteedRef { view in
            for node in NodeMask(mask) { view.releasePromise(promises[node.index], to: node) }
        }
        state.pointee.promisedMask = 0
    }

    private func sendHeaderOnly(_ kind: RecordKind, _ id: TransactionID, to node: NodeID,
                                keepUntilTruncate: Bool = false) throws(TransactionError) {
        let writer = RecordWriter(into: recordBuffer, capacity: recordCapacity, kind: kind,
                                  configuration: state.pointee.stamp, transaction: id,
                                  cause: keepUntilTruncate ? RecordFormat.keepUntilTruncate : 0)
        // ABORT frees log space instead of holding it: it may use the ring's reserve.
        try sendRecord(writer.bytes, to: node, usingReserve: kind == .abort, promised: kind == .commitPrimary)
    }

    /// LOCK: one record per primary with the written objects, their read versions and new values;
    /// each primary's CPU locks them with compare-and-swap and answers (``waitForLock``,
    /// ``endLock``). If a send fails, ABORT goes to every primary the LOCK reached (they may hold
    /// locks) and the attempt ends: nothing was written. Returns the attempt's reply slot.
    ///
    /// The LOCK's space was promised; ABORT and TRUNCATE records may still hold it for a moment.
    /// Without `waitForRoom` (a caller that can wait without a thread), a primary's log that has
    /// no room for the LOCK then ends the attempt the same way, as ``AbortCause/logFull``, rather
    /// than hold a thread of a cooperative pool that the receiver's progress may need.
    private func sendLock(engine: Engine, waitForRoom: Bool) throws -> TransactionID {
        let primaries = primaryMask  // (set by promiseLogSpace)
        let id = engine.replies.acquireWaiting(node: engine.node, replies: primaries.nonzeroBitCount)
        var sent: UInt64 = 0
        for primary in NodeMask(primaries) {
            do {
                try engine.faults.check(.lockSend, primary)
                try sendEntries(.lock, id, to: primary, waiting: waitForRoom) { $0.primary == primary }
            } catch TransactionError.transport(.channelFull(_, 0)) where !waitForRoom {
                abortLocked(id, primaries: sent, engine: engine)
                engine.replies.release(id)
                throw AbortSignal(cause: .logFull)
            } catch {
                abortLocked(id, primaries: sent, engine: engine)
                engine.replies.release(id)
                throw error
            }
            sent |= 1 << UInt64(primary.index)
            engine.statistics.lockRecordSent()
        }
        return id
    }

    /// Waits for the LOCK replies of `id` (see ``ReplySlots/wait(_:deadline:timeoutNanoseconds:spinNanoseconds:help:)``),
    /// lending this thread to the mailboxes the answer depends on.
    private func waitForLock(_ id: TransactionID, engine: Engine, deadline: inout UInt64,
                             spinNanoseconds: UInt64?) -> ReplySlots.WaitResult {
        let primaries = primaryMask
        let neighbours = self.neighbourList
        return engine.replies.wait(id, deadline: &deadline, timeoutNanoseconds: engine.replyTimeoutNanoseconds,
                                   spinNanoseconds: spinNanoseconds) {
            // Serve the mailboxes of this process's nodes that nobody else is serving: first the
            // ones this answer depends on, the primaries' (LOCK) and this node's (the replies);
            // when they hold nothing, the others' (backups' records would otherwise wait for a
            // poller thread to be scheduled).
            // A primary being removed will not answer: recovery decides what its LOCK did. Nor
            // will anyone, to this node, once it crashed. And while a recovery waits for this
            // commit to end, the attempt gives up (it retries once commits start again): a primary
            // that is silent but not yet removed (a second node that crashed just after the one
            // being removed) would otherwise hold the recovery for the whole reply timeout.
            if engine.mustStopWaiting(on: primaries) {
                engine.replies.abandon(id, failure: AbortCause.wrongConfiguration.rawValue)
            }
            var handled = 0
            for primary in NodeMask(primaries & ~(1 << UInt64(engine.node.index))) {
                handled += helpPoll(primary, engine: engine)
            }
            handled += engine.helpPoll(for: engine.node)
            if handled == 0 {
                for peer in neighbours { handled += peer._withUnsafeGuaranteedRef { $0.helpPoll(for: engine.node) } }
            }
            return handled
        }
    }

    /// Serves the mailbox of `node` for a moment if it is this node or another in this process
    /// (see ``Engine/helpPoll(for:)``); returns the records handled.
    @inline(__always)
    private func helpPoll(_ node: NodeID, engine: Engine) -> Int {
        node == engine.node ? engine.helpPoll(for: node) : unmanagedNeighbours[node.index]?._withUnsafeGuaranteedRef { $0.helpPoll(for: engine.node) } ?? 0
    }

    /// LOCK's outcome, once its wait ended (answered or timed out): returns if every primary
    /// locked; otherwise ABORT goes to every primary and the attempt ends (thrown). Releases the
    /// reply slot either way.
    private func endLock(_ id: TransactionID, _ result: ReplySlots.WaitResult, engine: Engine) throws {
        defer { engine.replies.release(id) }
        let primaries = primaryMask
        guard case .answered(let failure) = result else {
            let timeout = engine.replyTimeoutNanoseconds
            let primaryEngines = self.unmanagedNeighbours
            var report = [engine.channelReport]
            for primary in NodeMask(primaries & ~(1 << UInt64(engine.node.index))) {
                if let peer = primaryEngines[primary.index] { report.append(peer.takeUnretainedValue().channelReport) }
            }
            engine.logger.error("LOCK of \(id) to \(NodeMask(primaries).map(\.description)) unanswered after \(timeout / 1_000_000) ms\n\(report.joined(separator: "\n"))")
            if Mailbox.crashOnStall {
                // Crash the thread that holds a primary's poll claim or the lane of this node's
                // log there, so that the backtrace shows where it is stuck; then this one.
                for primary in NodeMask(primaries) {
                    if let peer = primaryEngines[primary.index]?.takeUnretainedValue(),
                       let holder = peer.mailbox.claimHolderThread ?? peer.mailbox.laneHolderThread(engine.node, kind: .log) {
                        pthread_kill(holder, SIGABRT)
                        sleep(2)
                    }
                }
                fatalError("LOCK unanswered (GRANARY_CRASH_ON_UNANSWERED is set)")
            }
            abortLocked(id, engine: engine)
            // This node crashed or stopped meanwhile (its own poller took no answer).
            guard engine.running.load(ordering: .relaxed) else { throw TransactionError.shutDown(engine.node) }
            // A primary that reopened its ring towards us (it restarted, or refused bytes it
            // could not read) never saw the LOCK: attach again for the next transaction.
            engine.checkConnections(to: primaries, view: view)
            throw TransactionError.peerUnresponsive(NodeID(primaries.trailingZeroBitCount), waitedMilliseconds: Int(timeout / 1_000_000))
        }
        if failure != 0 {
            abortLocked(id, engine: engine)
            let cause = AbortCause(rawValue: failure) ?? .lockConflict
            if cause == .invalidObject {
                // No retry can fix it: report the written objects the primaries refused.
                throw TransactionError.rejectedByPrimary(
                    writes.map(\.address),
                    reason: "a written object is not an object at its primary, or is smaller than the value written")
            }
            throw AbortSignal(cause: cause)
        }
    }

    /// VALIDATE: one-sided reads of the header words of objects read (and, when `skippingWritten`,
    /// not written), posted as one batch; false if any changed or is locked.
    func validate(skippingWritten: Bool) throws -> Bool {
        try withEngine { engine in try validate(skippingWritten: skippingWritten, engine: engine) }
    }

    private func validate(skippingWritten: Bool, engine: Engine) throws -> Bool {
        if engine.sabotage == .skipValidation { return true }
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
                    try engine.faults.check(.validateRead, read.primary)
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
    ///
    /// A failure before every backup holds its record undoes the commit: ABORT to the backups that
    /// got a record (they drop it), then to every primary (they unlock). See ``commit()``.
    func commitBackup(_ id: TransactionID, engine: Engine) throws -> UInt64 {
        let masks = view.backupMasks
        let nodes = backupMask  // (set by promiseLogSpace)
        var sent: UInt64 = 0
        for node in NodeMask(nodes) {
            let bit: UInt64 = 1 << UInt64(node.index)
            do {
                try engine.faults.check(.commitBackupSend, node)
                try sendEntries(.commitBackup, id, to: node, replicatingOthers: true) { masks[$0.address.region.index] & bit != 0 }
            } catch {
                // Not committed yet: no COMMIT-PRIMARY went out. Take back what the backups got.
                var undelivered: UInt64 = 0
                for backup in NodeMask(sent) where !sendAbort(id, to: backup, engine: engine) { undelivered |= 1 << UInt64(backup.index) }
                if undelivered == 0 {
                    abortLocked(id, engine: engine)
                    throw error
                }
                // A backup keeps a record the ABORT could not withdraw: the primaries keep their
                // locks and LOCK records (so that recovery could roll the whole transaction
                // forward) until the engine delivers the backups' ABORTs, then theirs.
                engine.owed.add(OutcomePlan(transaction: id, step: .undo(backups: undelivered, primaries: primaryMask)))
                throw TransactionError.outcomeUnknown(
                    reason: "COMMIT-BACKUP of \(id) to \(node) failed (\(error)), and the ABORT to backup(s) \(NodeMask(undelivered).map(\.description).joined(separator: ", ")) that hold its record could not be delivered yet")
            }
            sent |= bit
        }
        return nodes
    }

    /// COMMIT-PRIMARY: tell each primary to install and unlock. The transaction is committed once the
    /// first of these writes completes (every backup already holds its record). Returns the
    /// primaries it could not reach: the engine owes them COMMIT-PRIMARY (retried), and the
    /// transaction's TRUNCATE waits until they have it.
    func commitPrimary(_ id: TransactionID, backups: UInt64, truncating truncated: UInt64, engine: Engine) throws -> UInt64 {
        var delivered = 0
        var undelivered: UInt64 = 0
        var failures: [String] = []
        for primary in NodeMask(primaryMask) {
            do {
                try engine.faults.check(.commitPrimarySend, primary)
                try sendHeaderOnly(.commitPrimary, id, to: primary, keepUntilTruncate: backups == 0)
                delivered += 1
            } catch {
                undelivered |= 1 << UInt64(primary.index)
                failures.append("\(primary): \(error)")
            }
        }
        guard undelivered != 0 else { return 0 }
        engine.logger.error("COMMIT-PRIMARY of \(id) could not be delivered to \(failures.joined(separator: "; ")); retried later")
        engine.owed.add(OutcomePlan(transaction: id, step: .commit(primaries: undelivered, truncate: truncated, keep: backups == 0)))
        if delivered == 0 {
            throw TransactionError.outcomeUnknown(
                reason: "no COMMIT-PRIMARY of \(id) could be delivered yet (\(failures.joined(separator: "; "))); every backup holds its record")
        }
        return undelivered
    }

    /// ABORT to every primary in `primaries` (default: every primary of the write set), then
    /// returns the reserved slots. The engine owes an ABORT it cannot deliver now and retries it;
    /// the outcome is certain already (no COMMIT-BACKUP record exists, or every one was withdrawn).
    func abortLocked(_ id: TransactionID, primaries: UInt64? = nil, engine: Engine) {
        var undelivered: UInt64 = 0
        for primary in NodeMask(primaries ?? primaryMask) where !sendAbort(id, to: primary, engine: engine) {
            undelivered |= 1 << UInt64(primary.index)
        }
        if undelivered != 0 { engine.owed.add(OutcomePlan(transaction: id, step: .undo(backups: 0, primaries: undelivered))) }
        returnReservations()
    }

    /// Sends ABORT for `id` to `node`; false (logged) if it could not be delivered.
    private func sendAbort(_ id: TransactionID, to node: NodeID, engine: Engine) -> Bool {
        do {
            try engine.faults.check(.abortSend, node)
            try sendHeaderOnly(.abort, id, to: node)
            return true
        } catch {
            engine.logger.error("ABORT of \(id) could not be delivered to \(node): \(error); its locks or records there wait for recovery")
            return false
        }
    }

    /// TRUNCATE, lazily: remember the transaction per primary and backup; a batch goes out in one
    /// record once ``EngineOptions/truncationBatch`` transactions are waiting for that node. A
    /// batch that cannot be sent is kept for the next flush; the transaction stays committed.
    func truncate(_ id: TransactionID, nodes: UInt64, engine: Engine) {
        let full = engine.pendingTruncation.add(id, for: nodes)
        if full != 0 { engine.sendFullTruncationBatches(full) }
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
    /// Sends the calling thread's full TRUNCATE batch for each node of `nodes` (a bit per node).
    func sendFullTruncationBatches(_ nodes: UInt64) {
        withUnsafeTemporaryAllocation(of: TransactionID.self, capacity: pendingTruncation.limit) { buffer in
            for node in NodeMask(nodes) {
                let count = pendingTruncation.takeFullBatch(for: node, into: buffer.baseAddress!)
                if count > 0 { sendTruncateOrKeep(UnsafeBufferPointer(rebasing: buffer[..<count]), to: node) }
            }
        }
    }

    /// Sends one TRUNCATE record listing `ids` to `node`; if it cannot go, puts them back in the
    /// pending batches (logged) for the next flush and returns the failure.
    @discardableResult
    func sendTruncateOrKeep(_ ids: UnsafeBufferPointer<TransactionID>, to node: NodeID) -> TransactionError? {
        do {
            try faults.check(.truncateSend, node)
            try sendTruncate(ids, to: node)
            return nil
        } catch {
            logger.warning("TRUNCATE of \(ids.count) transactions to \(node) failed (\(error)); kept for the next flush")
            pendingTruncation.putBack(ids, for: node)
            return error
        }
    }

    /// Sends TRUNCATE records listing `ids` to `backup`, in records of at most 4,096 ids (the
    /// count is 16 bits, and a record must fit a channel).
    func sendTruncate(_ ids: UnsafeBufferPointer<TransactionID>, to backup: NodeID) throws(TransactionError) {
        var start = 0
        while start < ids.count {
            let count = min(4_096, ids.count - start)
            let bytes = RecordFormat.headerBytes + count * 8
            try withUnsafeTemporaryAllocation(byteCount: bytes, alignment: 8) { buffer throws(TransactionError) in
                var writer = RecordWriter(into: buffer.baseAddress!, capacity: bytes, kind: .truncate,
                                          configuration: configuration.id, transaction: TransactionID(rawValue: 0))
                for id in ids[start..<start + count] { writer.appendTransaction(id) }
                // TRUNCATE frees log space: it may use the ring's reserve that kept records leave free.
                try send(writer.bytes, to: backup, usingReserve: true)
            }
            start += count
        }
    }

    /// Runs `body` as a transaction on this node, committing it and retrying on conflicts.
    ///
    /// Blocks the calling thread while it waits for LOCK replies and between attempts. See
    /// `Node.transaction` for the async form, which waits between attempts without blocking.
    package func run<R>(_ body: (Transaction) throws -> R) throws -> R {
        let transaction = Transaction(engine: self)
        var attempt = 0
        var lastCause = AbortCause.lockConflict
        while attempt < options.maximumAttempts {
            attempt += 1
            var outcome: AttemptOutcome<R>
            do {
                outcome = try self.attempt(transaction, body)
                while case .waitingForLockReplies(let result) = outcome {  // (not without a spin limit)
                    outcome = try resumeAttempt(transaction, result: result, spinNanoseconds: nil)
                }
            } catch {
                // A dead or paused peer: with a configuration manager, tried again once the peer
                // has been removed and recovered from.
                if retriesAfterRemoval(after: error) { continue }
                throw error
            }
            switch outcome {
            case .committed(let result):
                return result
            case .waitingForLockReplies:
                continue
            case .aborted(let cause):
                lastCause = cause
                if mustWaitForRecovery(after: cause) {
                    // Recovery runs (or the lease lapsed): wait for it; the attempt does not count.
                    if waitForUnblockedCommits() { attempt -= 1 }
                    continue
                }
                let wait = retryDelay(afterAttempt: attempt)
                if wait > 1_000 { usleep(UInt32(wait / 1_000)) }
            }
        }
        throw TransactionError.conflict(lastCause, attempts: attempt)
    }

    /// The outcome of one attempt.
    package enum AttemptOutcome<R> {
        case committed(R)
        case aborted(AbortCause)
        /// The body ran (its result here) and the commit waits for LOCK replies without a
        /// thread: ``resumeAttempt(_:result:spinNanoseconds:)`` goes on with it.
        case waitingForLockReplies(R)
    }

    /// Runs one attempt of `body` in `transaction` (which it resets first) and commits it.
    ///
    /// - Parameter spinNanoseconds: how long the commit may wait for LOCK replies on this thread
    ///   before it returns `.waitingForLockReplies` (nil: as long as it takes).
    /// - Returns: `.aborted` on a conflict, after releasing everything the attempt held.
    /// - Throws: ``TransactionError`` for errors no retry can fix, or what `body` throws.
    package func attempt<R>(_ transaction: Transaction, _ body: (Transaction) throws -> R,
                            spinNanoseconds: UInt64? = nil) throws -> AttemptOutcome<R> {
        guard running.load(ordering: .relaxed) else { throw TransactionError.shutDown(node) }
        transaction.reset()
        transaction.attemptCount &+= 1
        transaction.executeStart = transaction.attemptCount % phaseTimingInterval == 0 ? monotonicNanoseconds() : 0
        let result: R
        do {
            result = try body(transaction)
        } catch let signal as AbortSignal {
            transaction.returnReservations()
            statistics.aborted(signal.cause)
            return .aborted(signal.cause)
        } catch {
            // Nothing reaches the caller unvalidated: an error the body saw or threw (an absence,
            // a business check, an engine error) is returned only if everything the attempt read
            // still holds; otherwise the attempt was looking at a state that no serial order
            // gives, and it is retried as a conflict.
            transaction.returnReservations()
            guard try transaction.validate(skippingWritten: false) else {
                statistics.aborted(.validationFailed)
                return .aborted(.validationFailed)
            }
            throw error
        }
        return try finishing(transaction, result) { try transaction.commit(spinNanoseconds: spinNanoseconds) }
    }

    /// Goes on with an attempt that returned `.waitingForLockReplies(result)`: the outcomes of
    /// ``attempt(_:_:spinNanoseconds:)``.
    package func resumeAttempt<R>(_ transaction: Transaction, result: R, spinNanoseconds: UInt64?) throws -> AttemptOutcome<R> {
        try finishing(transaction, result) { try transaction.resumeCommit(spinNanoseconds: spinNanoseconds) }
    }

    /// Stops waiting for the LOCK replies of an attempt that returned `.waitingForLockReplies` (its
    /// caller was cancelled): the next ``resumeAttempt(_:result:spinNanoseconds:)`` aborts it.
    package func abandonLockWait(_ transaction: Transaction) { transaction.abandonLockWait() }

    /// The outcome of a commit step (`commit` true: finished, false: waiting for LOCK replies).
    @inline(__always)
    private func finishing<R>(_ transaction: Transaction, _ result: R, _ commit: () throws -> Bool) throws -> AttemptOutcome<R> {
        do {
            return try commit() ? .committed(result) : .waitingForLockReplies(result)
        } catch let signal as AbortSignal {
            transaction.returnReservations()
            statistics.aborted(signal.cause)
            return .aborted(signal.cause)
        } catch TransactionError.outcomeUnknown(let reason) {
            // The transaction may commit: its reserved slots stay reserved (the allocator is
            // rebuilt from the region's headers when the node restarts).
            transaction.reservations.removeAll(keepingCapacity: true)
            transaction.remoteReservations.removeAll(keepingCapacity: true)
            throw TransactionError.outcomeUnknown(reason: reason)
        } catch {
            transaction.returnReservations()
            throw error
        }
    }

    /// A randomised, exponentially growing wait before the next attempt, in nanoseconds.
    package func retryDelay(afterAttempt attempt: Int) -> UInt64 {
        let limit = min(options.retryBackoffCapNanoseconds, options.retryBackoffBaseNanoseconds << UInt64(min(attempt, 20)))
        return UInt64.random(in: 0...limit)
    }

    /// A fresh transaction object for ``attempt(_:_:)`` loops.
    package func makeTransaction() -> Transaction { Transaction(engine: self) }
}

/// A commit waiting for its LOCK replies without a thread (``Transaction/commit(spinNanoseconds:)``):
/// its reply slot, the commit-gate shard it entered (left when the commit ends) and the deadline
/// of its reply timeout.
struct WaitingLock {
    let id: TransactionID
    let shard: Int
    var deadline: UInt64
}
