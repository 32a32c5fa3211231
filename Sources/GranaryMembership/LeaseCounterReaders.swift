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
        values = .allocate(capacity: NodeID.limit)
        readAt = .allocate(capacity: NodeID.limit)
        askedAt = .allocate(capacity: NodeID.limit)
        for index in 0..<NodeID.limit {
            (values + index).initialize(to: Atomic<UInt64>(0))
            (readAt + index).initialize(to: Atomic<UInt64>(0))
            (askedAt + index).initialize(to: Atomic<UInt64>(0))
        }
    }

    deinit {
        values.deinitialize(count: NodeID.limit)
        values.deallocate()
        readAt.deinitialize(count: NodeID.limit)
        readAt.deallocate()
        askedAt.deinitialize(count: NodeID.limit)
        askedAt.deallocate()
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

    /// Ends every reader (each after the read at hand).
    func stop() { stopped.store(true, ordering: .relaxed) }

    private func startReader(for node: NodeID) {
        let bit: UInt64 = 1 << UInt64(node.index)
        guard !stopped.load(ordering: .relaxed), running.load(ordering: .relaxed) & bit == 0,
              running.bitwiseOr(bit, ordering: .acquiringAndReleasing).oldValue & bit == 0 else { return }
        Thread.detachNewThread { [self] in
            defer { running.bitwiseAnd(~bit, ordering: .releasing) }
            while !stopped.load(ordering: .relaxed) {
                if let value = read(node) {
                    values[node.index].store(value, ordering: .relaxed)
                    readAt[node.index].store(monotonicNanoseconds(), ordering: .releasing)
                } else {
                    readAt[node.index].store(0, ordering: .releasing)
                }
                if monotonicNanoseconds() &- askedAt[node.index].load(ordering: .relaxed) > idleAfter { return }
                usleep(UInt32(max(1, min(interval / 1_000, 1_000_000))))
            }
        }
    }
}
