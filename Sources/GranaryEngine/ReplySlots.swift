import GranaryMemory
import GranaryTransport
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Where LOCK replies meet the coordinator waiting for them, without locks on the hot path.
///
/// Each in-flight transaction attempt holds one slot: one word packing a sequence number (the low
/// 40 bits of its transaction id), the first failure (8 bits) and the count of replies still
/// expected (16 bits). The node's poller records a reply with one compare-and-swap that also
/// checks the sequence, so a late reply to an attempt that gave up is ignored, even if the slot
/// was released and taken again between the check and the update (the sequence and the count
/// change together or not at all).
///
/// Free slots are bits in 16 shards of 64, each shard's bitmap on a cache line of its own; a
/// thread takes slots from the shard its thread id hashes to (others when that one is empty), so
/// coordinators on different cores do not pass one free list's cache line back and forth.
///
/// `@unchecked Sendable`: slot words, shard bitmaps and allocation results are atomics.
final class ReplySlots: @unchecked Sendable {
    static let count = 1024
    private static let shards = threadShards
    /// One word per slot: sequence (bits 24..63) | failure (bits 16..23) | pending replies (bits 0..15).
    private let words: UnsafeMutablePointer<Atomic<UInt64>>
    /// Shard `i`'s bitmap of free slots (bit `b`: slot `64 * i + b`) at word `8 * i`, and its
    /// count of slots handed out at word `8 * i + 1` (from which sequence numbers are made).
    private let freeBits: UnsafeMutablePointer<Atomic<UInt64>>
    /// Three words per slot for an ALLOCATE reply: address, header, lines | region << 32.
    private let results: UnsafeMutablePointer<Atomic<UInt64>>

    @inline(__always) static func pack(sequence: UInt64, failure: UInt8, pending: Int) -> UInt64 {
        sequence << 24 | UInt64(failure) << 16 | UInt64(pending & 0xFFFF)
    }

    init() {
        words = .allocate(capacity: Self.count)
        for i in 0..<Self.count { (words + i).initialize(to: Atomic<UInt64>(0)) }
        results = .allocate(capacity: Self.count * 3)
        for i in 0..<(Self.count * 3) { (results + i).initialize(to: Atomic<UInt64>(0)) }
        let raw = UnsafeMutableRawPointer.allocate(byteCount: Self.shards * 64, alignment: 64)
        freeBits = raw.bindMemory(to: Atomic<UInt64>.self, capacity: Self.shards * 8)
        for i in 0..<(Self.shards * 8) { (freeBits + i).initialize(to: Atomic<UInt64>(i % 8 == 0 ? ~0 : 0)) }
    }

    deinit {
        words.deinitialize(count: Self.count)
        words.deallocate()
        results.deinitialize(count: Self.count * 3)
        results.deallocate()
        freeBits.deinitialize(count: Self.shards * 8)
        UnsafeMutableRawPointer(freeBits).deallocate()
    }

    /// Takes a free slot, from the calling thread's shard first; with a sequence number unique
    /// among this node's attempts (the shard's count of slots handed out, then the shard).
    private func takeSlot() -> (slot: Int, sequence: UInt64)? {
        let home = threadShard()
        for step in 0..<Self.shards {
            let shard = (home + step) & (Self.shards - 1)
            let bitmap = freeBits + shard * 8
            var bits = bitmap.pointee.load(ordering: .relaxed)
            while bits != 0 {
                let bit = bits.trailingZeroBitCount
                let (exchanged, found) = bitmap.pointee.compareExchange(expected: bits, desired: bits & ~(1 << UInt64(bit)),
                                                                        ordering: .acquiring)
                if exchanged {
                    var sequence: UInt64 = 0
                    while sequence == 0 {  // 0 marks a free slot; skipped when the 36-bit count wraps
                        let taken = (bitmap + 1).pointee.wrappingAdd(1, ordering: .relaxed).oldValue
                        sequence = (taken << 4 | UInt64(shard)) & 0xFF_FFFF_FFFF
                    }
                    return (shard * 64 + bit, sequence)
                }
                bits = found
            }
        }
        return nil
    }

    /// The most replies one attempt can expect (one per primary).
    static let maximumReplies = 0xFFFF

    /// Takes a slot for a new attempt expecting `replies` replies; nil if all are in use.
    func acquire(node: NodeID, replies: Int) -> TransactionID? {
        guard let (slot, sequence) = takeSlot() else { return nil }
        words[slot].store(Self.pack(sequence: sequence, failure: 0, pending: min(replies, Self.maximumReplies)), ordering: .releasing)
        return TransactionID(node: node, slot: slot, sequence: sequence)
    }

    /// ``acquire(node:replies:)``, backing off (up to 50 us sleeps) while every slot is in use.
    func acquireWaiting(node: NodeID, replies: Int) -> TransactionID {
        var backoff = Backoff(maximumSleepMicroseconds: 50)
        while true {
            if let id = acquire(node: node, replies: replies) { return id }
            backoff.pause()
        }
    }

    /// Records a reply (from the poller). `failure` is 0 for success, else an AbortCause raw value.
    /// A reply whose sequence is not the slot's current one (a late reply, a foreign or corrupt
    /// one) changes nothing.
    func deliver(_ id: TransactionID, failure: UInt8) {
        let slot = id.slot
        guard slot < Self.count else { return }
        var word = words[slot].load(ordering: .acquiring)
        while true {
            guard word >> 24 == id.sequence, word & 0xFFFF != 0 else { return }
            var next = word - 1
            if failure != 0, (word >> 16) & 0xFF == 0 { next |= UInt64(failure) << 16 }
            let (exchanged, found) = words[slot].compareExchange(expected: word, desired: next, ordering: .acquiringAndReleasing)
            if exchanged { return }
            word = found
        }
    }

    /// Waits until every expected reply arrived; returns the first failure cause (0 if none), or nil
    /// on timeout. While waiting it calls `help` (which polls mailboxes the replies depend on) and
    /// backs off only when `help` found nothing to do. The timeout counts from the first call
    /// whether or not `help` keeps finding work (a busy mailbox does not extend it).
    func wait(_ id: TransactionID, timeoutNanoseconds: UInt64, help: () -> Int) -> UInt8? {
        var deadline: UInt64 = 0
        switch wait(id, deadline: &deadline, timeoutNanoseconds: timeoutNanoseconds, help: help) {
        case .answered(let failure): return failure
        case .timedOut, .stillWaiting: return nil
        }
    }

    /// How a wait for replies ended.
    enum WaitResult: Equatable {
        /// Every reply is in; the first failure cause, 0 if none.
        case answered(UInt8)
        /// The deadline passed.
        case timedOut
        /// The wait gave up its thread after its spin (``wait(_:deadline:timeoutNanoseconds:spinNanoseconds:help:)``): call again later.
        case stillWaiting
    }

    /// ``wait(_:timeoutNanoseconds:help:)`` that can stop after `spinNanoseconds` without an answer
    /// (`.stillWaiting`) and be called again later: `deadline` (0 before the first call) carries
    /// the timeout over.
    func wait(_ id: TransactionID, deadline: inout UInt64, timeoutNanoseconds: UInt64, spinNanoseconds: UInt64? = nil,
              help: () -> Int) -> WaitResult {
        let slot = id.slot
        // Never sleep: the answer is typically microseconds away, and on a small machine a sleeping
        // coordinator costs more than a yielding one.
        var backoff = Backoff(spins: 32, yields: .max - 32)
        // A wait that may stop looks at the clock every 8 rounds (it must stop on time), others every 64.
        let clockMask = spinNanoseconds == nil ? 63 : 7
        var spinEnd = UInt64.max
        if let spinNanoseconds {
            let now = monotonicNanoseconds()
            if deadline == 0 { deadline = now + timeoutNanoseconds }
            spinEnd = now &+ spinNanoseconds
        }
        var rounds = 0
        while words[slot].load(ordering: .acquiring) & 0xFFFF != 0 {
            rounds &+= 1
            if rounds & clockMask == 0 {
                let now = monotonicNanoseconds()
                if deadline == 0 { deadline = now + timeoutNanoseconds } else if now > deadline { return .timedOut }
                if now > spinEnd { return .stillWaiting }
            }
            if help() > 0 {
                backoff.reset()
                continue
            }
            backoff.pause()
        }
        return .answered(UInt8(truncatingIfNeeded: words[slot].load(ordering: .relaxed) >> 16))
    }

    /// Stops waiting for the replies `id` still expects, with `failure` as its outcome: for a
    /// coordinator whose LOCK went to a node being removed (it will never answer). A no-op if the
    /// slot has moved on or every reply is in.
    func abandon(_ id: TransactionID, failure: UInt8) {
        let slot = id.slot
        guard slot < Self.count else { return }
        var word = words[slot].load(ordering: .acquiring)
        while word >> 24 == id.sequence, word & 0xFFFF != 0 {
            let next = Self.pack(sequence: id.sequence, failure: (word >> 16) & 0xFF == 0 ? failure : UInt8((word >> 16) & 0xFF), pending: 0)
            let (exchanged, found) = words[slot].compareExchange(expected: word, desired: next, ordering: .acquiringAndReleasing)
            if exchanged { return }
            word = found
        }
    }

    /// Records an ALLOCATE reply (see `RemoteAllocation`): the slot's address, header and size
    /// (lines, and the region asked for), then the status as the reply's failure byte. A reply
    /// whose sequence is not the slot's current one changes nothing.
    func deliverAllocation(_ id: TransactionID, status: UInt8, address: UInt64, header: UInt64, lines: UInt32, region: UInt32) {
        let slot = id.slot
        guard slot < Self.count, words[slot].load(ordering: .acquiring) >> 24 == id.sequence else { return }
        let result = results + slot * 3
        result[0].store(address, ordering: .relaxed)
        result[1].store(header, ordering: .relaxed)
        result[2].store(UInt64(lines) | UInt64(region) << 32, ordering: .relaxed)
        // The count's compare-and-swap (releasing) publishes the words above to the waiter.
        deliver(id, failure: status)
    }

    /// The answer ``deliverAllocation(_:status:address:header:lines:region:)`` recorded for `id`,
    /// once ``wait(_:timeoutNanoseconds:help:)`` returned.
    func allocation(_ id: TransactionID) -> (address: GlobalAddress, header: ObjectHeader, lines: Int, region: RegionID) {
        let result = results + id.slot * 3
        let size = result[2].load(ordering: .acquiring)
        return (GlobalAddress(rawValue: result[0].load(ordering: .relaxed)), ObjectHeader(rawValue: result[1].load(ordering: .relaxed)),
                Int(size & 0xFFFF_FFFF), RegionID(rawValue: UInt32(truncatingIfNeeded: size >> 32)))
    }

    /// Returns the slot; later replies to `id` are ignored.
    func release(_ id: TransactionID) {
        words[id.slot].store(0, ordering: .releasing)
        (freeBits + (id.slot / 64) * 8).pointee.bitwiseOr(1 << UInt64(id.slot % 64), ordering: .releasing)
    }
}
