import GranaryMemory
import GranaryTransport
import Synchronization

/// Where LOCK replies meet the coordinator waiting for them, without locks on the hot path.
///
/// Each in-flight transaction attempt holds one slot: a sequence number (the low 40 bits of its
/// transaction id), a count of replies still expected, and the first failure. The node's poller
/// records a reply only if the slot still carries the reply's sequence, so a late reply to an
/// attempt that gave up is ignored.
///
/// `@unchecked Sendable`: slot words are atomics; the free list is behind a mutex.
final class ReplySlots: @unchecked Sendable {
    static let count = 1024
    private let words: UnsafeMutablePointer<Atomic<UInt64>>  // 3 per slot: sequence, pending, failure
    private let free: Mutex<[Int]>
    private let sequence = Atomic<UInt64>(1)

    init() {
        words = .allocate(capacity: Self.count * 3)
        for i in 0..<(Self.count * 3) { (words + i).initialize(to: Atomic<UInt64>(0)) }
        free = Mutex(Array((0..<Self.count).reversed()))
    }

    deinit {
        words.deinitialize(count: Self.count * 3)
        words.deallocate()
    }

    /// Takes a slot for a new attempt expecting `replies` replies; nil if all are in use.
    func acquire(node: NodeID, replies: Int) -> TransactionID? {
        guard let slot = free.withLock({ $0.popLast() }) else { return nil }
        let sequence = self.sequence.wrappingAdd(1, ordering: .relaxed).oldValue & 0xFF_FFFF_FFFF
        words[slot * 3 + 1].store(UInt64(replies), ordering: .relaxed)
        words[slot * 3 + 2].store(0, ordering: .relaxed)
        words[slot * 3].store(sequence, ordering: .releasing)
        return TransactionID(node: node, slot: slot, sequence: sequence)
    }

    /// Records a reply (from the poller). `failure` is 0 for success, else an AbortCause raw value.
    func deliver(_ id: TransactionID, failure: UInt8) {
        let slot = id.slot
        guard slot < Self.count, words[slot * 3].load(ordering: .acquiring) == id.sequence else { return }
        if failure != 0 {
            _ = words[slot * 3 + 2].compareExchange(expected: 0, desired: UInt64(failure), ordering: .relaxed)
        }
        words[slot * 3 + 1].subtract(1, ordering: .releasing)
    }

    /// Waits until every expected reply arrived; returns the first failure cause (0 if none), or nil
    /// on timeout. While waiting it calls `help` (which polls mailboxes the replies depend on) and
    /// backs off only when `help` found nothing to do.
    func wait(_ id: TransactionID, timeoutNanoseconds: UInt64, help: () -> Int) -> UInt8? {
        let slot = id.slot
        // Never sleep: the answer is typically microseconds away, and on a small machine a sleeping
        // coordinator costs more than a yielding one.
        var backoff = Backoff(spins: 32, yields: .max - 32)
        var deadline: UInt64 = 0
        var spins = 0
        while words[slot * 3 + 1].load(ordering: .acquiring) != 0 {
            if help() > 0 {
                backoff.reset()
                continue
            }
            spins += 1
            if spins & 63 == 0 {
                let now = monotonicNanoseconds()
                if deadline == 0 { deadline = now + timeoutNanoseconds } else if now > deadline { return nil }
            }
            backoff.pause()
        }
        return UInt8(truncatingIfNeeded: words[slot * 3 + 2].load(ordering: .relaxed))
    }

    /// Returns the slot; later replies to `id` are ignored.
    func release(_ id: TransactionID) {
        words[id.slot * 3].store(0, ordering: .releasing)
        free.withLock { $0.append(id.slot) }
    }
}
