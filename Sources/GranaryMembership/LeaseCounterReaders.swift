import Foundation
import GranaryEngine
import GranaryMemory
import GranaryTransport
import Synchronization

/// Peers' lease counters read on threads of their own, for transports whose one-sided read of a
/// dead peer blocks: over RDMA verbs a READ to a peer that died completes only when the queue
/// pair gives up retransmitting (about 1.6 s, `QueuePair`). The CM's lease thread reads every
/// member's counter each round; one dead member would stall it for that long, every other
/// member's lease would run out meanwhile, and the members would take the CM for silent (seen in
/// the soft-RoCE recovery test: a member SIGKILLed, and the CM and the other member removed with
/// it). Each peer's reader here reads its counter every renewal interval and publishes the value;
/// a reader stuck on a dead peer holds up no one else. A value not refreshed within `staleAfter`
/// reads as unreadable, as a failed read does.
///
/// `@unchecked Sendable`: the per-node words are atomics in blocks allocated at init and freed at
/// deinit (after every reader ended: readers hold this object); `running` is an atomic bit per
/// node. No lock: the CM's lease thread runs at real-time priority and asks on every round.
final class LeaseCounterReaders: @unchecked Sendable {
    /// Per node: the last value read, and when (monotonic ns; 0: never read, or the last read failed).
    private let values: UnsafeMutablePointer<Atomic<UInt64>>
    private let readAt: UnsafeMutablePointer<Atomic<UInt64>>
    /// Per node, for the account of a suspicion (``Account``): when the read now under way began
    /// (0: none), when a read last ended, when one last failed, when the value last changed, and
    /// the longest read since it changed (monotonic ns).
    private let startedAt: UnsafeMutablePointer<Atomic<UInt64>>
    private let endedAt: UnsafeMutablePointer<Atomic<UInt64>>
    private let failedAt: UnsafeMutablePointer<Atomic<UInt64>>
    private let changedAt: UnsafeMutablePointer<Atomic<UInt64>>
    private let longestRead: UnsafeMutablePointer<Atomic<UInt64>>
    /// Per node: when the latest read to complete (with a value or failed) began; published after
    /// its value (see ``evidence(of:)``).
    private let completedReadStart: UnsafeMutablePointer<Atomic<UInt64>>
    /// Per node: bumped by ``forget(_:)``; a read that began under an older epoch publishes nothing.
    private let epochs: UnsafeMutablePointer<Atomic<UInt64>>
    /// When the lease thread last asked for each node's counter: a reader stops once no one has
    /// asked for `idleAfter`.
    private let askedAt: UnsafeMutablePointer<Atomic<UInt64>>
    /// A bit per node whose reader runs (set by the first ask, cleared by the reader as it ends).
    private let running = Atomic<UInt64>(0)
    private let read: @Sendable (NodeID) -> UInt64?
    private let interval: UInt64
    private let staleAfter: UInt64
    private let idleAfter: UInt64 = 2_000_000_000
    private let stopped = Atomic<Bool>(false)

    /// - Parameters:
    ///   - read: one blocking read of a node's counter (nil: it failed).
    ///   - interval: nanoseconds between a reader's reads.
    ///   - staleAfter: nanoseconds after which a value not refreshed reads as unreadable.
    init(interval: UInt64, staleAfter: UInt64, read: @escaping @Sendable (NodeID) -> UInt64?) {
        self.interval = interval
        self.staleAfter = staleAfter
        self.read = read
        values = Self.words()
        readAt = Self.words()
        askedAt = Self.words()
        startedAt = Self.words()
        endedAt = Self.words()
        failedAt = Self.words()
        changedAt = Self.words()
        longestRead = Self.words()
        epochs = Self.words()
        completedReadStart = Self.words()
    }

    private static func words() -> UnsafeMutablePointer<Atomic<UInt64>> {
        let words = UnsafeMutablePointer<Atomic<UInt64>>.allocate(capacity: NodeID.limit)
        for index in 0..<NodeID.limit { (words + index).initialize(to: Atomic<UInt64>(0)) }
        return words
    }

    deinit {
        for words in [values, readAt, askedAt, startedAt, endedAt, failedAt, changedAt, longestRead, epochs, completedReadStart] {
            words.deinitialize(count: NodeID.limit)
            words.deallocate()
        }
    }

    /// What `node`'s reader was doing when the CM suspected the node, in numbers (taken on the
    /// lease thread: no formatting there), for the log line of the removal: a removal of a live
    /// node must say what the CM saw.
    struct Account: Sendable, CustomStringConvertible {
        let at: UInt64
        let value: UInt64
        let startedAt: UInt64
        let endedAt: UInt64
        let lastFailure: UInt64
        let changedAt: UInt64
        let longestRead: UInt64

        private func ago(_ time: UInt64) -> String { time == 0 ? "never" : "\((at &- time) / 1_000_000) ms ago" }

        var description: String {
            var parts: [String] = []
            parts.append(startedAt == 0 ? "no read under way" : "a read under way for \((at &- startedAt) / 1_000_000) ms")
            parts.append("last read ended \(ago(endedAt))")
            parts.append("last failed \(ago(lastFailure))")
            parts.append("the value \(value) last changed \(ago(changedAt))")
            parts.append("longest read since \(longestRead / 1_000_000) ms")
            return "its lease reader: " + parts.joined(separator: ", ")
        }
    }

    /// `node`'s reader's state now (see ``Account``).
    func account(of node: NodeID) -> Account? {
        guard node.index < NodeID.limit else { return nil }
        let index = node.index
        return Account(at: monotonicNanoseconds(), value: values[index].load(ordering: .relaxed),
                       startedAt: startedAt[index].load(ordering: .relaxed), endedAt: endedAt[index].load(ordering: .relaxed),
                       lastFailure: failedAt[index].load(ordering: .relaxed), changedAt: changedAt[index].load(ordering: .relaxed),
                       longestRead: longestRead[index].load(ordering: .relaxed))
    }

    /// `node`'s counter as its reader last read it, or nil if it has not read it within
    /// `staleAfter` (never yet, a failed read, or a read that has not completed: a dead peer).
    /// Never blocks: the first call starts the node's reader.
    func counter(of node: NodeID) -> UInt64? {
        guard node.index < NodeID.limit else { return nil }
        let now = monotonicNanoseconds()
        askedAt[node.index].store(now, ordering: .relaxed)
        startReader(for: node)
        let at = readAt[node.index].load(ordering: .acquiring)
        guard at != 0, now &- at <= staleAfter else { return nil }
        return values[node.index].load(ordering: .relaxed)
    }

    /// How current a reader's view of a node's counter is: when the latest read to complete began
    /// (0: none since the reader started or forgot the node), and when the read under way began
    /// (nil: none). A counter read unchanged by a read that began after a member's lease ran out
    /// proves the member silent; a counter not read since (a read under way, or a reader thread
    /// that has not run) proves nothing yet.
    struct Evidence: Sendable, Equatable {
        var completedReadStart: UInt64
        var readUnderWaySince: UInt64?
        /// Whether the latest read to complete failed.
        var latestFailed = false

        /// Whether the read under way has gone unanswered for `bound` nanoseconds by `now`.
        func unanswered(now: UInt64, for bound: UInt64) -> Bool {
            readUnderWaySince.map { now >= $0 && now - $0 >= bound } ?? false
        }
    }

    /// `node`'s ``Evidence``. Ask before ``counter(of:)``: the value that call returns is then at
    /// least as new as the read whose start this reports.
    func evidence(of node: NodeID) -> Evidence {
        guard node.index < NodeID.limit else { return Evidence(completedReadStart: 0, readUnderWaySince: nil) }
        let completed = completedReadStart[node.index].load(ordering: .acquiring)
        let started = startedAt[node.index].load(ordering: .relaxed)
        let failed = failedAt[node.index].load(ordering: .relaxed)
        return Evidence(completedReadStart: completed, readUnderWaySince: started == 0 ? nil : started,
                        latestFailed: failed != 0 && failed == endedAt[node.index].load(ordering: .relaxed))
    }

    /// Drops what was read of `node` so far: it is a new incarnation, reached through a new
    /// connection (the CM connected to it again as a member that joined). A read under way, begun
    /// before, publishes nothing: a value from the former incarnation's lease page (read through
    /// the connection made to it) must not pass for a renewal of the new one.
    func forget(_ node: NodeID) {
        guard node.index < NodeID.limit else { return }
        epochs[node.index].add(1, ordering: .acquiringAndReleasing)
        readAt[node.index].store(0, ordering: .releasing)
        changedAt[node.index].store(0, ordering: .relaxed)
        completedReadStart[node.index].store(0, ordering: .releasing)
    }

    /// Ends every reader (each after the read at hand).
    func stop() { stopped.store(true, ordering: .relaxed) }

    private func startReader(for node: NodeID) {
        let bit: UInt64 = 1 << UInt64(node.index)
        guard !stopped.load(ordering: .relaxed), running.load(ordering: .relaxed) & bit == 0,
              running.bitwiseOr(bit, ordering: .acquiringAndReleasing).oldValue & bit == 0 else { return }
        Thread.detachNewThread { [self] in
            defer { running.bitwiseAnd(~bit, ordering: .releasing) }
            let index = node.index
            while !stopped.load(ordering: .relaxed) {
                let epoch = epochs[index].load(ordering: .acquiring)
                let started = monotonicNanoseconds()
                startedAt[index].store(started, ordering: .relaxed)
                let value = read(node)
                let ended = monotonicNanoseconds()
                startedAt[index].store(0, ordering: .relaxed)
                endedAt[index].store(ended, ordering: .relaxed)
                // Forgotten meanwhile (`forget`): what this read saw is the former incarnation's.
                if epochs[index].load(ordering: .acquiring) != epoch { continue }
                if longestRead[index].load(ordering: .relaxed) < ended &- started {
                    longestRead[index].store(ended &- started, ordering: .relaxed)
                }
                if let value {
                    if values[index].load(ordering: .relaxed) != value || changedAt[index].load(ordering: .relaxed) == 0 {
                        changedAt[index].store(ended, ordering: .relaxed)
                        longestRead[index].store(0, ordering: .relaxed)
                    }
                    values[index].store(value, ordering: .relaxed)
                    readAt[index].store(ended, ordering: .releasing)
                } else {
                    failedAt[index].store(ended, ordering: .relaxed)
                    readAt[index].store(0, ordering: .releasing)
                }
                completedReadStart[index].store(started, ordering: .releasing)
                if monotonicNanoseconds() &- askedAt[node.index].load(ordering: .relaxed) > idleAfter { return }
                usleep(UInt32(max(1, min(interval / 1_000, 1_000_000))))
            }
        }
    }
}
