import GranaryMemory
import GranaryTransport
import Glibc
import Synchronization

/// FaRM's parallel record processing: several threads of a node handle the records of its
/// incoming logs at once, each ring of its mailbox a lane served under a claim of its own, with
/// one record processor per sender (``Engine/lanes``). Nothing node-wide is taken on the hot
/// path; the poll claim (every lane) is for recovery and configuration changes.
extension Engine {
    /// Serves every record waiting in this node's mailbox in the lanes no other thread is serving
    /// right now (the node's poller thread does this). Returns how many records were handled.
    ///
    /// Each ring is a lane: its records are handled under the mailbox's claim of that ring,
    /// taken with a try-lock, so different rings are served by different threads at once (FaRM's
    /// parallel record processing). A sender's log ring has its own record processor
    /// (``lanes``); a queue ring holds replies, whose handling keeps no state.
    func pollOnce() -> Int { poll(for: nil) }

    /// ``pollOnce()`` by a coordinator of node `coordinator` in this process lending its CPU while
    /// it waits (for an answer, or for room in a log): it serves the lane of what it sent here
    /// (`coordinator`'s log ring), and at its own node the queue rings (the answers to it), and
    /// tells the poller thread that the mailbox is being served. The lanes of other coordinators
    /// are left to them and to the poller: a lane served by the thread that wrote its records
    /// finds them, and the lane's state, in that core's cache.
    func helpPoll(for coordinator: NodeID) -> Int { poll(for: coordinator) }

    private func poll(for coordinator: NodeID?) -> Int {
        guard running.load(ordering: .relaxed), !processingPaused.load(ordering: .relaxed) else { return 0 }
        var handled = 0
        let unmanagedView = self.unmanagedView
        let inUse = channelsInUse.load(ordering: .relaxed)
        if let coordinator {
            if coordinator.index < NodeID.limit, inUse & (1 << UInt64(coordinator.index)) != 0 {
                handled += pollLog(from: coordinator, view: unmanagedView)
            }
            if coordinator == node {
                for sender in NodeMask(inUse) { handled += pollQueue(from: sender, view: unmanagedView) }
            }
            if handled > 0, !helped.load(ordering: .relaxed) { helped.store(true, ordering: .relaxed) }
        } else {
            for sender in NodeMask(inUse) {
                handled += pollLog(from: sender, view: unmanagedView)
                handled += pollQueue(from: sender, view: unmanagedView)
            }
        }
        if handled > 0 { statistics.processed(handled) }
        return handled
    }

    /// Serves `sender`'s log lane if it may hold work and no other thread serves it now.
    @inline(__always)
    private func pollLog(from sender: NodeID, view unmanagedView: Unmanaged<ConfigurationView>) -> Int {
        // Look before taking the lane's claim: most polls find nothing, and the claim's cache
        // line would otherwise bounce between the threads that look.
        let mayHaveWork = lanes[sender.index]._withUnsafeGuaranteedRef { lane in
            lane.unsentCount.load(ordering: .relaxed) > 0 || mailbox.attention != lane.seenAttention.load(ordering: .relaxed)
                || lane.mayRetryDeferred
        } || mailbox.mayHaveMessage(from: sender)
        guard mayHaveWork else { return 0 }
        return mailbox.withLaneIfAvailable(sender, kind: .log) { poller in
            // Read again under the lane's claim: a pause (`pauseRecordProcessing`) takes every
            // lane after setting it, so no lane taken after that serves a record.
            guard !processingPaused.load(ordering: .relaxed) else { return 0 }
            return unmanagedView._withUnsafeGuaranteedRef { view in serveLog(poller, from: sender, view: view) }
        } ?? 0
    }

    /// Serves `sender`'s queue lane if it may hold a message and no other thread serves it now.
    @inline(__always)
    private func pollQueue(from sender: NodeID, view unmanagedView: Unmanaged<ConfigurationView>) -> Int {
        let mayHaveWork = mailbox.mayHaveMessage(from: sender, kind: .messages)
            || lanes[sender.index]._withUnsafeGuaranteedRef { mailbox.attention != $0.seenQueueAttention.load(ordering: .relaxed) }
        guard mayHaveWork else { return 0 }
        return mailbox.withLaneIfAvailable(sender, kind: .messages) { poller in
            guard !processingPaused.load(ordering: .relaxed) else { return 0 }
            return unmanagedView._withUnsafeGuaranteedRef { view in serveQueue(poller, from: sender, view: view) }
        } ?? 0
    }

    /// Serves every lane; the caller holds the mailbox's poll claim (every lane's).
    func serveMailbox(_ poller: borrowing MailboxPoller, view: ConfigurationView) -> Int {
        var handled = 0
        for sender in NodeMask(channelsInUse.load(ordering: .relaxed)) {
            // The log first, then the queue: a LOCK this node sends itself is answered on its
            // own queue while the log is served, and the answer is then taken in the same round.
            handled += serveLog(poller, from: sender, view: view)
            handled += serveQueue(poller, from: sender, view: view)
        }
        if handled > 0 { statistics.processed(handled) }
        return handled
    }

    /// Serves `sender`'s log lane: the replies its processor could not send yet, then the log
    /// ring. The caller holds the lane's claim.
    func serveLog(_ poller: borrowing MailboxPoller, from sender: NodeID, view: ConfigurationView) -> Int {
        var handled = 0
        let delay = processingDelay.load(ordering: .relaxed)
        if delay > 0 { usleep(delay) }
        // The handler captures unretained references: a retain and release per poll of a ring
        // would bounce the processor's and the view's reference counts between the cores.
        let processor = lanes[sender.index]
        let unmanagedView = Unmanaged.passUnretained(view)
        // Every node that was ever a member is polled: records from nodes outside the current
        // configuration are read only to be rejected (precise membership).
        let everyRing = processor._withUnsafeGuaranteedRef { lane in
            lane.flushReplies(view: view)
            if lane.mayRetryDeferred { lane.retryDeferred(view: view) }
            return attentionChanged(since: lane.seenAttention)
        }
        if everyRing || mailbox.mayHaveMessage(from: sender) {
            do {
                handled = try poller.poll(from: sender, limit: 64, keeping: { bytes, position in
                    processor._withUnsafeGuaranteedRef { processor in
                        if bytes.count >= RecordFormat.headerBytes {
                            let stamp = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
                            if stamp > processor.lastLogStamp { processor.lastLogStamp = stamp }
                        }
                        return unmanagedView._withUnsafeGuaranteedRef { processor.handle(from: sender, bytes, position: position, view: $0) }
                    }
                })
            } catch {
                refused(from: sender, error)
            }
        }
        // Releases while polling the log can free space behind its head (TRUNCATE of a deferred entry).
        mailbox.advanceReleased(from: sender)
        if mailbox.takeReopened(from: sender, kind: .log) { checkConnections(to: 1 << UInt64(sender.index), view: view) }
        return handled
    }

    /// Serves `sender`'s queue lane: LOCK and ALLOCATE replies to this node's coordinators, which
    /// change nothing in the lane's processor. The caller holds the lane's claim.
    func serveQueue(_ poller: borrowing MailboxPoller, from sender: NodeID, view: ConfigurationView) -> Int {
        var handled = 0
        let processor = lanes[sender.index]
        let unmanagedView = Unmanaged.passUnretained(view)
        let everyRing = processor._withUnsafeGuaranteedRef { attentionChanged(since: $0.seenQueueAttention) }
        if everyRing || mailbox.mayHaveMessage(from: sender, kind: .messages) {
            do {
                handled = try poller.poll(from: sender, kind: .messages, limit: 64) { bytes in
                    processor._withUnsafeGuaranteedRef { processor in
                        unmanagedView._withUnsafeGuaranteedRef { processor.handleQueued(from: sender, bytes, view: $0) }
                    }
                }
            } catch {
                refused(from: sender, error)
            }
        }
        if mailbox.takeReopened(from: sender, kind: .messages) { checkConnections(to: 1 << UInt64(sender.index), view: view) }
        return handled
    }

    /// Whether a sender posted a reopening request (it restarted) since a lane last looked, whose
    /// word of the mailbox's attention is `seen` (then updated): the lane polls its ring whatever
    /// its head shows, which reopens it if the request is for it.
    private func attentionChanged(since seen: borrowing Atomic<UInt64>) -> Bool {
        let attention = mailbox.attention
        guard attention != seen.load(ordering: .relaxed) else { return false }
        seen.store(attention, ordering: .relaxed)
        return true
    }

    /// Bytes that are not a message in a ring of `sender`: refused, and the ring reopened for the
    /// sender to attach again (it learns at its next look at the ring).
    private func refused(from sender: NodeID, _ error: any Error) {
        statistics.rejected()
        logger.error("refused what the channel from \(sender) held: \(error)")
    }

    /// The sum of `count` over the lanes of the nodes whose rings are polled.
    func sumOverLanes(_ count: (RecordProcessor) -> Int) -> Int {
        NodeMask(channelsInUse.load(ordering: .relaxed)).reduce(0) { $0 + count(lanes[$1.index].takeUnretainedValue()) }
    }
}
