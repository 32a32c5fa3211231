import GranaryMemory
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

#if DEBUG
/// Debug builds' hook for tests of what a kill of the receiving process leaves in its mailbox:
/// called (with the mailbox's base) between the stores whose order a scan of the log relies on,
/// after the receiver zeroed frames and before it moved the consumed counter over them. Armed
/// only while `receiverCrashPointArmed` is set.
package let receiverCrashPoint = Mutex<(@Sendable (UnsafeMutableRawPointer) -> Void)?>(nil)
@usableFromInline let receiverCrashPointArmed = Atomic<Bool>(false)

/// Installs (or, with nil, removes) the hook ``reachedCrashPoint(_:)`` calls.
package func setReceiverCrashPoint(_ hook: (@Sendable (UnsafeMutableRawPointer) -> Void)?) {
    receiverCrashPoint.withLock { $0 = hook }
    receiverCrashPointArmed.store(hook != nil, ordering: .releasing)
}

@usableFromInline func callReceiverCrashPoint(_ base: UnsafeMutableRawPointer) {
    receiverCrashPoint.withLock { $0?(base) }
}
#endif

/// A moment at which a kill of the receiving process leaves frames zeroed that the consumed
/// counter has not moved over yet. Nothing in release builds; a test's hook in debug builds.
@inlinable @inline(__always)
func reachedCrashPoint(_ base: UnsafeMutableRawPointer) {
    #if DEBUG
    if receiverCrashPointArmed.load(ordering: .relaxed) { callReceiverCrashPoint(base) }
    #endif
}

/// The wire format of a message ring, shared by senders and receivers.
///
/// A node's mailbox region holds one ring per possible sender. Ring of sender `s`:
/// ```
/// mailbox + 4096 + s * (64 + capacity)   control line: word 0 = bytes consumed (written by the receiver)
///            ... + 64                     ring: `capacity` bytes (a power of two)
/// ```
/// Messages start at ring positions that are multiples of 64; the message at position `p` and
/// the one after it, at `q = p + stride` (`ChannelFormat.stride(_:)`: the payload rounded up to
/// 8 bytes, plus 16, rounded up to 64):
/// ```
/// p + 56             header   length (bits 0..31) | sender (bits 32..47) | magic "GM" (bits 48..63)
/// p + 64             payload  `length` bytes (at most up to q + 48)
/// q + 48             trailer  a non-zero word derived from the message's stream position and the
///                             stream's epoch
/// q + 56             the next message's header
/// ```
/// So a payload starts on a cache line (the copies in and out of the ring are line-aligned, and a
/// receiver on the sender's core can take it from the store buffer), and the words that say
/// whether a message is there, headers and trailers, are only ever the last two words of a line.
/// The receiver, done with a message, zeroes those two words of each line the message used (not
/// the whole message), which is what keeps a stale word from passing for a new header or trailer;
/// the sender writes the header, the payload and the trailer, nothing else.
/// The stream position of a message is the number of ring bytes sent before it (its position in
/// the ring is that modulo the capacity), so every lap of the ring expects different trailers.
/// A message and the line of its trailer never straddle the end of the ring: the sender writes a
/// wrap word (magic "GW") at `p + 56` and continues at 0. The receiver accepts a message when its trailer holds the
/// expected value (the transport makes a write's last word visible last), hands it over, zeroes its
/// bytes and publishes how far it has consumed; the sender never writes past that point.
///
/// Several threads of the sending node may send on one channel at once: each reserves its bytes
/// by advancing the channel's tail with one compare-and-swap, then writes them. The receiver takes
/// messages in reservation order; one that is reserved but not yet written holds back those
/// reserved after it until its trailer lands.
///
/// A ring carries one stream at a time, from one sender connection (a ``ChannelSender``). A
/// sender attaches to an open ring with a compare-and-swap on its control line and starts at the
/// position the receiver left there. A sender that finds the ring attached to another connection
/// (the same node before it restarted) asks the receiver to reopen it; so does a receiver that
/// finds bytes in the ring that are not a message (the bad bytes are refused). Reopening keeps the
/// messages the receiver keeps as its log, zeroes the rest of the ring, picks a new epoch and
/// opens the ring again at the receiver's position; the sender of the old stream learns it was
/// detached at its next look at the control line and attaches again. So a node restarted with
/// the same id resynchronises its channels both ways, and a corrupt message costs the messages
/// sent after it on that ring until the sender reattaches, never the channel.
public enum ChannelFormat {
    /// Bytes of the control line before each ring: one cache line.
    public static let controlBytes = 64
    /// The magic in bits 48..63 of a message's header: "GM".
    public static let messageMagic: UInt64 = 0x474D
    /// The magic in bits 48..63 of a wrap word, which sends the stream on at ring offset 0: "GW".
    public static let wrapMagic: UInt64 = 0x4757
    /// The magic a kept message's header gets once the receiver is done with it, while messages
    /// before it are still kept (``Mailbox/releaseMessage(from:at:)``): its bytes stay until the
    /// receiver's consumed counter passes it, but a scan of the log skips it.
    public static let releasedMagic: UInt64 = 0x4746
    /// A ring's capacity when its creator does not choose: 64 KiB.
    public static let defaultRingCapacity = 64 << 10

    /// The largest message a ring of `capacity` bytes carries.
    @inlinable public static func maximumMessage(ringCapacity capacity: Int) -> Int { capacity / 4 - 16 }

    @inlinable static func padded(_ length: Int) -> Int { (length + 7) & ~7 }

    /// Where a message's header lies after its (64-byte aligned) ring position.
    @inlinable static var headerOffset: Int { 56 }

    /// How far a message of `length` bytes advances the stream position.
    @inlinable public static func stride(_ length: Int) -> Int { (padded(length) + 16 + 63) & ~63 }

    /// Where the trailer of a message of `length` bytes lies after the message's ring position.
    @inlinable static func trailerOffset(_ length: Int) -> Int { stride(length) + 48 }

    @inlinable static func header(length: Int, sender: NodeID) -> UInt64 {
        UInt64(length) | UInt64(sender.rawValue) << 32 | messageMagic << 48
    }

    @inlinable static func wrap(sender: NodeID) -> UInt64 { UInt64(sender.rawValue) << 32 | wrapMagic << 48 }

    /// Whether `word` may be `expected` seen part-written: each of its bytes is 0 or the byte of
    /// `expected` there. A software RDMA device (rxe) copies a WRITE's payload with the kernel's
    /// `memcpy`, in no guaranteed word size (under emulation a byte at a time), so a poller can
    /// see a header or a trailer half landed.
    @inlinable static func mayBeLanding(_ word: UInt64, _ expected: UInt64) -> Bool {
        var rest = word, wanted = expected
        while rest != 0 {
            let byte = rest & 0xFF
            if byte != 0 && byte != wanted & 0xFF { return false }
            rest >>= 8
            wanted >>= 8
        }
        return true
    }

    /// How long a header or trailer word that may be landing (each of its bytes 0 or the expected one) may stay so
    /// before it is taken for foreign bytes: a write lands in microseconds, but a software device's
    /// copy runs on a CPU that may be preempted (tens of ms in an emulated guest).
    public static let landingGraceNanoseconds: UInt64 = 200_000_000

    /// The trailer of the message at stream position `position` of a stream with epoch `epoch`:
    /// every lap of the ring, and every stream the ring carried (each reopening picks a new epoch),
    /// expects different trailers, so stale bytes of an earlier lap or stream never pass for a message.
    @inlinable public static func trailer(position: UInt64, epoch: UInt64) -> UInt64 { ((position ^ epoch) &* 0x9E37_79B9_7F4A_7C15) | 1 }

    // MARK: The control line of a ring
    //
    // ```
    // + 0    consumed   stream bytes the receiver is done with (receiver)
    // + 8    epoch      the current stream's epoch, mixed into every trailer (receiver)
    // + 16   attached   the sender connection attached to the stream, 0 while the ring is open (the
    //                   sender's compare-and-swap from 0 attaches; the receiver's reopening clears it)
    // + 24   resume     the stream position where the next attached sender starts (receiver)
    // + 32   request    a sender connection asking the receiver to reopen the ring, 0 if none (sender)
    // + 40   reopening  the epoch a reopening in progress stamps the kept messages with (receiver)
    // + 48   log start  where the consumed counter is about to move (receiver; see below)
    // ```
    // The receiver zeroes the frames it moves the consumed counter over before it moves it (a
    // sender may reuse the space at once), so a process killed between the two would leave the
    // counter at zeroed bytes, and a scan of the log from it would end there, missing every record
    // after: kept LOCKs whose locks are held, COMMIT-BACKUPs whose coordinator reported the commit.
    // So the receiver first stores the counter's next value as the log start, and a scan starts
    // from whichever of the two is further on (between the two stores everything before the log
    // start is released or a wrap word).
    // A fresh (zeroed) control line is open, epoch 0, resuming at 0.
    /// Where the control line keeps the current stream's epoch (written by the receiver).
    public static let epochOffset = 8
    /// Where the control line keeps the sender connection attached to the stream, 0 while the
    /// ring is open.
    public static let attachedOffset = 16
    /// Where the control line keeps the stream position at which the next attached sender starts
    /// (written by the receiver).
    public static let resumeOffset = 24
    /// Where a sender connection asks the receiver to reopen the ring (0: no request).
    public static let requestOffset = 32
    /// Where the control line keeps the epoch that a reopening in progress stamps the kept
    /// messages with (written by the receiver).
    public static let reopeningOffset = 40
    /// Where the control line keeps the stream position a scan of the log starts from when it is
    /// past the consumed counter: the receiver stores the counter's next value here before it
    /// zeroes the frames the counter moves over (written by the receiver).
    public static let logStartOffset = 48

    /// Where a scan of a ring's log starts: the consumed counter, or the log start if a move of the
    /// counter was cut short after it began zeroing the frames it passes over.
    @inlinable static func scanStart(control: UnsafeMutableRawPointer) -> UInt64 {
        max(control.load(as: UInt64.self), control.load(fromByteOffset: logStartOffset, as: UInt64.self))
    }
    /// Calls `body` with the ring offsets and lengths (at most `maximum` each) of a ring's free
    /// space: stream positions `start` (the receiver's cursor, where a reopened stream resumes) to
    /// `end` (the consumed counter plus the capacity), from the header word of the line at `start`,
    /// since the word before it is the trailer of the last message kept before the cursor.
    public static func forEachFreeSegment<E: Error>(from start: UInt64, to end: UInt64, ringCapacity: Int, maximum: Int = .max,
                                                   _ body: (_ offset: Int, _ count: Int) throws(E) -> Void) throws(E) {
        var position = start &+ UInt64(headerOffset)
        while position < end {
            let offset = Int(position & UInt64(ringCapacity - 1))
            let count = min(Int(end - position), ringCapacity - offset, maximum)
            try body(offset, count)
            position &+= UInt64(count)
        }
    }

    /// The mailbox-header word that senders add 1 to after posting a reopening request, so that a
    /// poller learns of requests with one load per round instead of one per ring. On a line of
    /// its own in the header page.
    public static let attentionOffset = 2112

    /// The mailbox-header word that tells senders the receiver's process is a new one: 0 in a new
    /// mailbox file, and one more each time a process opens the file again (a restart, a node
    /// that rejoins), before it clears the rings. A sender over shared memory compares it, on
    /// every send, with its value when it attached (``Transport/peerGeneration(of:)``), and
    /// attaches again before writing into a ring whose reader is gone. On a line of its own.
    public static let incarnationOffset = 2176

    /// Offset of sender `s`'s control line inside the mailbox region.
    @inlinable public static func controlOffset(sender: NodeID, ringCapacity: Int, kind: RingKind = .log) -> Int {
        RegionFormat.headerBytes + kind.ring(of: sender) * (controlBytes + ringCapacity)
    }

    /// The size of a mailbox region with rings of `ringCapacity` bytes.
    public static func mailboxSize(ringCapacity: Int) -> Int {
        var size = RegionFormat.minimumSize
        let needed = RegionFormat.headerBytes + RingKind.ringsPerMailbox * (controlBytes + ringCapacity)
        while size < needed { size <<= 1 }
        return size
    }
}

/// Which of the two rings a sender has in a receiver's mailbox. As in FaRM, a pair of nodes has a
/// log and a message queue: records that the receiver may keep until later ones release them (a
/// transaction's LOCK, COMMIT-BACKUP and COMMIT-PRIMARY, until TRUNCATE) go to the log, and
/// messages the receiver is done with at once (replies) to the queue, so that a reply never waits
/// behind a kept record.
public enum RingKind: Int, Sendable {
    /// The log: records the receiver may keep until later ones release them.
    case log = 0
    /// The message queue: messages the receiver is done with at once (replies).
    case messages = 1

    /// Rings in a mailbox: a log and a message queue per possible sender.
    public static let ringsPerMailbox = 2 * NodeID.limit

    /// The index of `sender`'s ring of this kind in a mailbox.
    @inlinable public func ring(of sender: NodeID) -> Int { rawValue &* NodeID.limit &+ sender.index }
}

/// A node's mailbox: the receive side of all of its message channels, in a region of its own that
/// senders write with one-sided writes.
///
/// Each ring is a lane: one thread at a time receives from it, holding the lane's claim
/// (``withLaneIfAvailable(_:kind:_:)``) and polling that ring through the ``MailboxPoller`` it is
/// lent, with no further locking; different lanes are served by different threads at once. The
/// poll claim (``withPollerIfAvailable(_:)``, ``withPoller(_:)``) takes every lane, for what must
/// see the whole mailbox still (recovery's drain, a configuration change).
///
/// `@unchecked Sendable`: every stored property is immutable after `init` except `claim` and the
/// lane words, atomics; a ring's receive state (its cursor, its consumed counter in its control
/// line, its lane's flags) is written only by the holder of its lane.
public final class Mailbox: @unchecked Sendable {
    /// The node that receives through this mailbox.
    public let node: NodeID
    /// The mailbox region (`RegionID.mailbox(of:)`), mapped in this process.
    public let region: Region
    /// The capacity of each ring, in bytes (a power of two).
    public let ringCapacity: Int
    /// `region.base`, for the inlinable poll paths.
    @usableFromInline let base: UnsafeMutableRawPointer
    /// Held by the thread receiving from this mailbox.
    @usableFromInline let claim = Atomic<Bool>(false)
    /// The thread that took the claim last (`pthread_t` bits), for diagnostics.
    @usableFromInline let claimHolder = Atomic<UInt>(0)
    /// Per sender ring: the stream position of the next message to hand over (the receiver's
    /// progress, in this process's memory). The consumed counter in the ring's control line
    /// (what senders see) lags it while messages are kept (``MailboxPoller/poll(from:kind:limit:keeping:)``).
    /// Written only by the holder of the ring's lane; read by anyone (relaxed) to see if a ring may
    /// hold a message.
    /// One cache line per ring (``stride`` words; the first is the cursor): the lanes' cursors
    /// are written by different threads.
    @usableFromInline let cursors: UnsafeMutablePointer<Atomic<UInt64>>
    /// One cache line per ring, a lane (``stride`` words, at ``RingKind/ring(of:)``): the lane's
    /// claim (``claimWord``, 0 or 1), the thread that took it last (``holderWord``), whether the
    /// log has messages released behind its head since its consumed counter last moved
    /// (``releasedWord``, moved by ``advanceReleased(from:)``), whether the ring was reopened
    /// (``reopenedWord``, ``takeReopened(from:kind:)``), and where and when a header or trailer was
    /// first seen part-written (``landingWord``: the stream position plus one, then the time; see
    /// ``MailboxPoller/stillLanding(ring:head:)``). All but the claim are touched only by the
    /// lane's holder.
    @usableFromInline let lanes: UnsafeMutablePointer<Atomic<UInt64>>
    @usableFromInline static let stride = 8
    @usableFromInline static let claimWord = 0, holderWord = 1, releasedWord = 2, reopenedWord = 3, landingWord = 4

    /// Whether `GRANARY_CRASH_ON_UNANSWERED` is set: then a wait that should take microseconds
    /// and lasts seconds (a poll claim never given back, a LOCK never answered) crashes the
    /// process instead of going on, for a backtrace.
    public static let crashOnStall = getenv("GRANARY_CRASH_ON_UNANSWERED") != nil

    /// The thread that took the poll claim last, if the claim is held now.
    public var claimHolderThread: pthread_t? {
        claim.load(ordering: .relaxed) ? pthread_t(claimHolder.load(ordering: .relaxed)) : nil
    }

    /// Creates the mailbox of `node` in `directory`, or opens the one a previous run of the node left:
    /// cleared, unless `preservingLog` (then its rings, which hold the records kept as the node's
    /// log, are left as they are for recovery to read; ``resetRings()`` clears them after).
    ///
    /// - Throws: `RegionError.invalidSize(bytes:reason:)` for a ring capacity that is not a power of two
    ///   of at least 4 KiB and at most 1 GiB; `RegionError` for a file that is not this
    ///   mailbox.
    public init(node: NodeID, directory: RegionDirectory, cluster: ClusterID,
                ringCapacity: Int = ChannelFormat.defaultRingCapacity, preservingLog: Bool = false) throws(RegionError) {
        guard ringCapacity >= 4096, ringCapacity <= 1 << 30, ringCapacity & (ringCapacity - 1) == 0 else {
            throw .invalidSize(bytes: ringCapacity, reason: "a ring capacity is a power of two from 4 KiB to 1 GiB")
        }
        let id = RegionID.mailbox(of: node)
        let shift = ringCapacity.trailingZeroBitCount
        let region: Region
        do {
            region = try directory.create(id, kind: .mailbox, size: ChannelFormat.mailboxSize(ringCapacity: ringCapacity),
                                          cluster: cluster, slabShift: shift)
        } catch .alreadyExists {
            region = try directory.open(id, cluster: cluster)
            guard region.kind == .mailbox, region.slabShift == shift else {
                throw .corrupt(path: region.path, reason: "mailbox ring size 2^\(region.slabShift) differs from the configured 2^\(shift)")
            }
            guard region.size == ChannelFormat.mailboxSize(ringCapacity: ringCapacity) else {
                throw .corrupt(path: region.path, reason: "mailbox of \(region.size) bytes, expected \(ChannelFormat.mailboxSize(ringCapacity: ringCapacity))")
            }
            // A new process reads this mailbox: senders attached to the former one attach again.
            let incarnation = (region.base + ChannelFormat.incarnationOffset).assumingMemoryBound(to: Atomic<UInt64>.self)
            let next = incarnation.pointee.load(ordering: .relaxed) &+ 1
            incarnation.pointee.store(next == 0 ? 1 : next, ordering: .releasing)
            if !preservingLog { Self.clear(region) }
        }
        self.node = node
        self.region = region
        self.base = region.base
        self.ringCapacity = ringCapacity
        cursors = .allocate(capacity: RingKind.ringsPerMailbox * Self.stride)
        for ring in 0..<RingKind.ringsPerMailbox {
            let control = region.base + RegionFormat.headerBytes + ring * (ChannelFormat.controlBytes + ringCapacity)
            for word in 0..<Self.stride { (cursors + ring * Self.stride + word).initialize(to: Atomic(word == 0 ? control.load(as: UInt64.self) : 0)) }
        }
        lanes = .allocate(capacity: RingKind.ringsPerMailbox * Self.stride)
        for word in 0..<RingKind.ringsPerMailbox * Self.stride { (lanes + word).initialize(to: Atomic(0)) }
    }

    deinit {
        cursors.deinitialize(count: RingKind.ringsPerMailbox * Self.stride)
        cursors.deallocate()
        lanes.deinitialize(count: RingKind.ringsPerMailbox * Self.stride)
        lanes.deallocate()
    }

    /// Clears every ring (messages and consumed counters), as a new mailbox. For a whole-cluster
    /// restart, after recovery has read the logs and before any sender starts.
    public func resetRings() {
        withPoller { _ in
            Self.clear(region)
            for ring in 0..<RingKind.ringsPerMailbox { cursors[ring * Self.stride].store(0, ordering: .relaxed) }
            for lane in 0..<RingKind.ringsPerMailbox {
                for word in Self.releasedWord..<Self.stride { lanes[lane * Self.stride + word].store(0, ordering: .relaxed) }
            }
        }
    }

    /// Zeroes every ring of a mailbox region, writing only the lines that are not zero already:
    /// most of a large mailbox was never used, and writing zeros over it would dirty (and, in a
    /// sparse file, allocate) every page of it.
    static func clear(_ region: Region) {
        let words = (region.size - RegionFormat.headerBytes) / 8
        let base = (region.base + RegionFormat.headerBytes).assumingMemoryBound(to: UInt64.self)
        var index = 0
        while index + 8 <= words {
            if base[index] | base[index + 1] | base[index + 2] | base[index + 3]
                | base[index + 4] | base[index + 5] | base[index + 6] | base[index + 7] != 0 {
                (base + index).update(repeating: 0, count: 8)
            }
            index += 8
        }
    }

    /// Releases the kept message at stream position `position` of `sender`'s log ring (handed over by
    /// ``MailboxPoller/poll(from:kind:limit:keeping:)`` with `true`): marks it released. The consumed
    /// counter moves over it (so senders may reuse the space) at the end of the poll of that ring,
    /// or at ``advanceReleased(from:)``: once per batch of releases, not once per message. The
    /// caller holds the lane of `sender`'s log (or the poll claim).
    public func releaseMessage(from sender: NodeID, at position: UInt64) {
        guard sender.index < NodeID.limit else { return }
        let control = base + ChannelFormat.controlOffset(sender: sender, ringCapacity: ringCapacity)
        let ring = control + ChannelFormat.controlBytes
        let word = (ring + (Int(truncatingIfNeeded: position & UInt64(ringCapacity - 1)) + ChannelFormat.headerOffset))
            .assumingMemoryBound(to: Atomic<UInt64>.self)
        let header = word.pointee.load(ordering: .relaxed)
        guard header >> 48 == ChannelFormat.messageMagic else { return }  // released before, or not a message
        word.pointee.store(header & 0xFFFF_FFFF_FFFF | ChannelFormat.releasedMagic << 48, ordering: .relaxed)
        lanes[RingKind.log.ring(of: sender) * Self.stride + Self.releasedWord].store(1, ordering: .relaxed)
    }

    /// The senders whose rings were reopened since the last call (bit n: node n), cleared. The
    /// caller holds the poll claim (every lane).
    public func takeReopened() -> UInt64 {
        var reopened: UInt64 = 0
        for lane in 0..<NodeID.limit {
            for kind in [RingKind.log, .messages] where takeReopened(from: NodeID(lane), kind: kind) { reopened |= 1 << UInt64(lane) }
        }
        return reopened
    }

    /// Whether `sender`'s `kind` ring was reopened since the last call, cleared. The caller holds
    /// the ring's lane claim (or the poll claim).
    @inlinable @inline(__always)
    public func takeReopened(from sender: NodeID, kind: RingKind) -> Bool {
        let word = lanes + (kind.ring(of: sender) &* Self.stride &+ Self.reopenedWord)
        guard word.pointee.load(ordering: .relaxed) != 0 else { return false }
        word.pointee.store(0, ordering: .relaxed)
        return true
    }

    /// How many reopening requests senders have posted to this mailbox (each sender that asks adds
    /// one): a poller that sees it change polls every ring, and each poll of a ring with a request
    /// reopens it. One load of a line that changes only when a connection is re-established.
    @inlinable @inline(__always)
    public var attention: UInt64 {
        (base + ChannelFormat.attentionOffset).assumingMemoryBound(to: Atomic<UInt64>.self).pointee.load(ordering: .relaxed)
    }

    /// Moves the consumed counter of every log with released messages at its head over them. The
    /// caller holds the poll claim (every lane).
    public func advanceReleased() {
        for lane in 0..<NodeID.limit { advanceReleased(from: NodeID(lane)) }
    }

    /// ``advanceReleased()`` for `sender`'s log only. The caller holds the sender's lane claim (or
    /// the poll claim).
    @inlinable @inline(__always)
    public func advanceReleased(from sender: NodeID) {
        poller.advanceIfReleased(from: sender, kind: .log)
    }

    @inlinable var poller: MailboxPoller {
        MailboxPoller(base: base, receiver: node, ringCapacity: ringCapacity, cursors: cursors, lanes: lanes)
    }

    /// The messages kept in `sender`'s ring of a mailbox region as a previous run left it (the
    /// node's log, for recovery): every complete message from the scan start (the consumed
    /// counter, see ``ChannelFormat/logStartOffset``) on that was not released, with its stream
    /// position, in the order sent, up to one ring's length.
    ///
    /// A message the sender reserved but had not finished writing when its process was killed
    /// is not complete; messages reserved after it by the sender's other threads may be, and
    /// their coordinators may have acted on them (reported a commit after its COMMIT-BACKUP
    /// landed). So the scan does not stop there: it looks for the next complete message on each
    /// later line. A complete message is one whose header names the sender and whose trailer is
    /// the one its stream position and the ring's epoch give: stale bytes of earlier laps or
    /// streams, and payload bytes, never pass for one.
    public static func keptMessages(in region: Region, ringCapacity: Int, from sender: NodeID,
                                    _ body: (UInt64, UnsafeRawBufferPointer) throws -> Void) rethrows {
        guard region.size >= ChannelFormat.mailboxSize(ringCapacity: ringCapacity) else { return }
        let control = region.base + ChannelFormat.controlOffset(sender: sender, ringCapacity: ringCapacity)
        let ring = control + ChannelFormat.controlBytes
        let start = ChannelFormat.scanStart(control: control)
        // A reopening that a crash interrupted may have restamped some kept messages only.
        let epoch = control.load(fromByteOffset: ChannelFormat.epochOffset, as: UInt64.self)
        let reopening = control.load(fromByteOffset: ChannelFormat.reopeningOffset, as: UInt64.self)
        let mask = UInt64(ringCapacity - 1)
        let maximum = ChannelFormat.maximumMessage(ringCapacity: ringCapacity)
        let end = start &+ UInt64(ringCapacity)
        var head = start
        // Whether the scan is past bytes that were not a complete message: a wrap word is then
        // not followed (it could be payload bytes); the lines up to the ring's end are looked at
        // one by one instead, which reaches the same place.
        var searching = false
        while head < end {
            let position = Int(head & mask)
            let header = (ring + position + ChannelFormat.headerOffset).load(as: UInt64.self)
            if header == ChannelFormat.wrap(sender: sender), !searching {
                head &+= UInt64(ringCapacity - position)
                continue
            }
            if let length = frameLength(header, at: position, sender: sender, ringCapacity: ringCapacity, maximum: maximum),
               head &+ UInt64(ChannelFormat.stride(length)) <= end {
                let trailer = (ring + position + ChannelFormat.trailerOffset(length)).load(as: UInt64.self)
                if trailer == ChannelFormat.trailer(position: head, epoch: epoch)
                    || trailer == ChannelFormat.trailer(position: head, epoch: reopening) {
                    if header >> 48 == ChannelFormat.messageMagic {
                        try body(head, UnsafeRawBufferPointer(start: ring + position + 64, count: length))
                    }
                    head &+= UInt64(ChannelFormat.stride(length))
                    searching = false
                    continue
                }
            }
            // Not a complete message: the end of the log, or a write a kill cut short.
            searching = true
            head &+= 64
        }
    }

    /// Walks the frames of `sender`'s ring from stream position `start` up to `end`, skipping
    /// wrap words: calls `body` with each message's stream position, ring offset, header and
    /// length, kept or released. Stops at the first bytes that are not such a message (another
    /// sender's, too long, or crossing the ring's end with its trailer line), or when `body`
    /// returns false.
    static func forEachFrame(in ring: UnsafeMutableRawPointer, ringCapacity: Int, sender: NodeID, from start: UInt64, to end: UInt64,
                             _ body: (_ head: UInt64, _ position: Int, _ header: UInt64, _ length: Int) throws -> Bool) rethrows {
        let mask = UInt64(ringCapacity - 1)
        let maximum = ChannelFormat.maximumMessage(ringCapacity: ringCapacity)
        var head = start
        while head < end {
            let position = Int(head & mask)
            let header = (ring + position + ChannelFormat.headerOffset).load(as: UInt64.self)
            if header == ChannelFormat.wrap(sender: sender) {
                head &+= UInt64(ringCapacity - position)
                continue
            }
            guard let length = frameLength(header, at: position, sender: sender, ringCapacity: ringCapacity, maximum: maximum),
                  try body(head, position, header, length) else { return }
            head &+= UInt64(ChannelFormat.stride(length))
        }
    }

    /// The length of the message whose header word is `header`, at ring offset `position`, if it
    /// is a message of `sender` (kept or released) that fits the ring with its trailer line.
    static func frameLength(_ header: UInt64, at position: Int, sender: NodeID, ringCapacity: Int, maximum: Int) -> Int? {
        let length = Int(header & 0xFFFF_FFFF)
        let magic = header >> 48
        guard magic == ChannelFormat.messageMagic || magic == ChannelFormat.releasedMagic,
              UInt16(truncatingIfNeeded: header >> 32) == sender.rawValue, length <= maximum,
              position + ChannelFormat.stride(length) + 64 <= ringCapacity else { return nil }
        return length
    }

    /// The receive side of the channel from `sender`.
    public func receiver(from sender: NodeID, kind: RingKind = .log) -> ChannelReceiver { ChannelReceiver(mailbox: self, sender: sender, kind: kind) }

    /// Runs `body` with the right to receive from every ring of this mailbox (the poll claim and
    /// every lane's), unless another thread holds one of them now (then returns nil at once).
    @inlinable
    public func withPollerIfAvailable<R, E: Error>(_ body: (borrowing MailboxPoller) throws(E) -> R) throws(E) -> R? {
        guard claim.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged else { return nil }
        for ring in 0..<RingKind.ringsPerMailbox
        where !lanes[ring * Self.stride + Self.claimWord].compareExchange(expected: 0, desired: 1, ordering: .acquiring).exchanged {
            // A lane is being served: give back what was taken.
            for taken in 0..<ring { lanes[taken * Self.stride + Self.claimWord].store(0, ordering: .releasing) }
            claim.store(false, ordering: .releasing)
            return nil
        }
        return try lendPoller(body)
    }

    /// Runs `body` with the right to receive from every ring of this mailbox (the poll claim and
    /// every lane's claim), yielding the CPU while another thread holds one of them.
    @inlinable
    public func withPoller<R, E: Error>(_ body: (borrowing MailboxPoller) throws(E) -> R) throws(E) -> R {
        if !claim.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged { waitForClaim() }
        for ring in 0..<RingKind.ringsPerMailbox { waitForLane(ring) }
        return try lendPoller(body)
    }

    /// With the claim and every lane's just taken: records the holder, runs `body` with the
    /// poller, gives the claims back.
    @inlinable @inline(__always)
    func lendPoller<R, E: Error>(_ body: (borrowing MailboxPoller) throws(E) -> R) throws(E) -> R {
        claimHolder.store(UInt(pthread_self()), ordering: .relaxed)
        defer {
            for ring in 0..<RingKind.ringsPerMailbox { lanes[ring * Self.stride + Self.claimWord].store(0, ordering: .releasing) }
            claim.store(false, ordering: .releasing)
        }
        return try body(poller)
    }

    /// Runs `body` with the right to receive from `sender`'s `kind` ring (its lane), unless
    /// another thread holds it now (then returns nil at once). Different lanes are served by
    /// different threads at once; ``withPoller(_:)`` takes every lane.
    @inlinable @inline(__always)
    public func withLaneIfAvailable<R, E: Error>(_ sender: NodeID, kind: RingKind,
                                                 _ body: (borrowing MailboxPoller) throws(E) -> R) throws(E) -> R? {
        let block = kind.ring(of: sender) &* Self.stride
        let claimWord = lanes + (block &+ Self.claimWord)
        guard claimWord.pointee.compareExchange(expected: 0, desired: 1, ordering: .acquiring).exchanged else { return nil }
        lanes[block &+ Self.holderWord].store(UInt64(UInt(pthread_self())), ordering: .relaxed)
        defer { claimWord.pointee.store(0, ordering: .releasing) }
        return try body(poller)
    }

    /// The thread that took the lane of `sender`'s `kind` ring last, if the lane is held now.
    public func laneHolderThread(_ sender: NodeID, kind: RingKind) -> pthread_t? {
        let block = kind.ring(of: sender) * Self.stride
        guard lanes[block + Self.claimWord].load(ordering: .relaxed) != 0 else { return nil }
        return pthread_t(UInt(lanes[block + Self.holderWord].load(ordering: .relaxed)))
    }

    /// Takes ring `ring`'s lane claim, yielding the CPU while another thread holds it.
    @usableFromInline
    func waitForLane(_ ring: Int) {
        let claimWord = lanes + (ring * Self.stride + Self.claimWord)
        waitUntil("lane of ring \(ring)") { claimWord.pointee.compareExchange(expected: 0, desired: 1, ordering: .acquiring).exchanged }
    }

    /// Takes the poll claim, yielding the CPU while another thread holds it.
    @usableFromInline
    func waitForClaim() {
        waitUntil("poll claim") { claim.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged }
    }

    /// Calls `taken` until it returns true, yielding the CPU in between; with
    /// `GRANARY_CRASH_ON_UNANSWERED` set, crashes once `what` has been held for 5 s.
    private func waitUntil(_ what: @autoclosure () -> String, _ taken: () -> Bool) {
        let start = monotonicNanoseconds()
        var reported = false
        while !taken() {
            sched_yield()
            if !reported, monotonicNanoseconds() - start > 5_000_000_000 {
                reported = true
                if Self.crashOnStall {
                    fatalError("\(node)'s mailbox \(what()) held for 5 s (GRANARY_CRASH_ON_UNANSWERED is set)")
                }
            }
        }
    }

    /// Whether the ring of `sender` may hold a message now: its word at the receiver's published
    /// head is not zero. No lock and no reference counting, so a poller can skip empty rings
    /// cheaply; false while a message is only partly written is fine, the next look sees it.
    @inlinable @inline(__always)
    public func mayHaveMessage(from sender: NodeID, kind: RingKind = .log) -> Bool {
        headerWord(from: sender, kind: kind, acquiring: false).word.pointee.load(ordering: .relaxed) != 0
    }

    /// The consumed counter of `sender`'s ring (loaded with acquire ordering or relaxed), and the
    /// word where the next message has its header.
    @inlinable @inline(__always)
    func headerWord(from sender: NodeID, kind: RingKind = .log, acquiring: Bool) -> (head: UInt64, word: UnsafeMutablePointer<Atomic<UInt64>>) {
        let control = base + ChannelFormat.controlOffset(sender: sender, ringCapacity: ringCapacity, kind: kind)
        let cursor = cursors + kind.ring(of: sender) &* Mailbox.stride
        let head = acquiring ? cursor.pointee.load(ordering: .acquiring) : cursor.pointee.load(ordering: .relaxed)
        let position = Int(head & UInt64(ringCapacity - 1))
        return (head, (control + ChannelFormat.controlBytes + position + ChannelFormat.headerOffset).assumingMemoryBound(to: Atomic<UInt64>.self))
    }

    /// The ring of `sender` as it is now, for diagnostics: bytes consumed, and the words at the
    /// head (the header, and the trailer the header's length points to).
    public func ringState(from sender: NodeID, kind: RingKind = .log) -> String {
        let (head, headerWord) = headerWord(from: sender, kind: kind, acquiring: true)
        let frame = UnsafeMutableRawPointer(headerWord)
        let header = headerWord.pointee.load(ordering: .acquiring)
        let durable = (base + ChannelFormat.controlOffset(sender: sender, ringCapacity: ringCapacity, kind: kind)).load(as: UInt64.self)
        var text = "\(kind == .log ? "log" : "queue") from \(sender): handled \(head), consumed \(durable), header 0x\(String(header, radix: 16))"
        let length = Int(header & 0xFFFF_FFFF)
        if header >> 48 == ChannelFormat.messageMagic, length <= ChannelFormat.maximumMessage(ringCapacity: ringCapacity) {
            let trailer = (frame - ChannelFormat.headerOffset + ChannelFormat.trailerOffset(length)).assumingMemoryBound(to: Atomic<UInt64>.self).pointee.load(ordering: .acquiring)
            let epoch = (base + ChannelFormat.controlOffset(sender: sender, ringCapacity: ringCapacity, kind: kind) + ChannelFormat.epochOffset).load(as: UInt64.self)
            text += ", trailer 0x\(String(trailer, radix: 16)) (expected 0x\(String(ChannelFormat.trailer(position: head, epoch: epoch), radix: 16)))"
        }
        if let holder = claimHolderThread { text += ", poll claim held by thread 0x\(String(UInt(holder), radix: 16))" }
        guard let holder = laneHolderThread(sender, kind: kind) else { return text }
        return text + ", lane held by thread 0x\(String(UInt(holder), radix: 16))"
    }

    /// Whether no message (not even a partly written one) waits at the head of `sender`'s ring:
    /// a snapshot, for quiescence checks.
    public func isEmpty(from sender: NodeID, kind: RingKind = .log) -> Bool {
        headerWord(from: sender, kind: kind, acquiring: true).word.pointee.load(ordering: .acquiring) == 0
    }

    /// Whether a connection of `sender` is attached to its `kind` ring here. The mailbox is
    /// cleared when it is opened, so a sender attached now learnt this mailbox's stream positions:
    /// one that attached to a former process of this node and had not noticed its restart is not.
    public func hasAttachedSender(_ sender: NodeID, kind: RingKind = .log) -> Bool {
        let control = base + ChannelFormat.controlOffset(sender: sender, ringCapacity: ringCapacity, kind: kind)
        return (control + ChannelFormat.attachedOffset).assumingMemoryBound(to: Atomic<UInt64>.self).pointee.load(ordering: .acquiring) != 0
    }
}

/// The right to receive from a mailbox's rings, lent by ``Mailbox/withPollerIfAvailable(_:)`` or
/// ``Mailbox/withPoller(_:)`` for the duration of a call (it cannot be copied or kept).
///
/// Each ring's receive state is its consumed counter, in the ring's control line: only the poller
/// writes it, and the senders read it to learn how much room there is.
public struct MailboxPoller: ~Copyable {
    @usableFromInline let base: UnsafeMutableRawPointer
    /// The node whose mailbox this poller receives from.
    public let receiver: NodeID
    /// The capacity of each ring, in bytes.
    public let ringCapacity: Int
    @usableFromInline let cursors: UnsafeMutablePointer<Atomic<UInt64>>
    @usableFromInline let lanes: UnsafeMutablePointer<Atomic<UInt64>>

    @inlinable init(base: UnsafeMutableRawPointer, receiver: NodeID, ringCapacity: Int,
                    cursors: UnsafeMutablePointer<Atomic<UInt64>>, lanes: UnsafeMutablePointer<Atomic<UInt64>>) {
        self.base = base
        self.receiver = receiver
        self.ringCapacity = ringCapacity
        self.cursors = cursors
        self.lanes = lanes
    }

    /// Hands every complete message from `sender` (up to `limit`) to `handler`, in the order sent,
    /// and frees their space. The buffer is valid only during the call.
    ///
    /// Inlinable, so that a poller's handler is inlined into the loop over the ring.
    ///
    /// - Returns: the number of messages handled.
    /// - Throws: ``TransportError/corruptChannel(sender:receiver:reason:)`` if the ring holds bytes
    ///   that are not a message from this sender (nothing is consumed past them), or what
    ///   `handler` throws (the message that threw is consumed).
    @inlinable @inline(__always) @discardableResult
    public func poll(from sender: NodeID, kind: RingKind = .log, limit: Int = .max, _ handler: (UnsafeRawBufferPointer) throws -> Void) throws -> Int {
        try poll(from: sender, kind: kind, limit: limit, keeping: { bytes, _ in
            try handler(bytes)
            return false
        })
    }

    /// ``MailboxPoller/poll(from:kind:limit:_:)`` for a receiver that keeps some messages in the ring as its log:
    /// `handler` gets each message with its stream position and returns whether to keep it. A
    /// kept message stays in the ring (the sender cannot reuse its space) until
    /// ``Mailbox/releaseMessage(from:at:)``; the others are freed at once, or, behind a kept one,
    /// marked released so that a scan of the log (``Mailbox/keptMessages(in:ringCapacity:from:_:)``)
    /// skips them.
    @inlinable @inline(__always) @discardableResult
    public func poll(from sender: NodeID, kind: RingKind = .log, limit: Int = .max,
                     keeping handler: (UnsafeRawBufferPointer, UInt64) throws -> Bool) throws -> Int {
        let control = base + ChannelFormat.controlOffset(sender: sender, ringCapacity: ringCapacity, kind: kind)
        let consumed = control.assumingMemoryBound(to: Atomic<UInt64>.self)
        let logStart = (control + ChannelFormat.logStartOffset).assumingMemoryBound(to: Atomic<UInt64>.self)
        let ring = control + ChannelFormat.controlBytes
        let mask = UInt64(truncatingIfNeeded: ringCapacity &- 1)
        let maximum = ChannelFormat.maximumMessage(ringCapacity: ringCapacity)
        let expected = ChannelFormat.header(length: 0, sender: sender)
        let cursor = cursors + kind.ring(of: sender) &* Mailbox.stride
        // Only the poller writes the cursor, the consumed counter and the epoch, so its own last
        // stores are the current values.
        let epoch = (control + ChannelFormat.epochOffset).load(as: UInt64.self)
        var head = cursor.pointee.load(ordering: .relaxed)
        var handled = 0
        while handled < limit {
            // A whole ring ahead of the consumed counter (kept messages fill the ring): the words
            // at the cursor are the oldest kept message's, not a new one.
            if head &- consumed.pointee.load(ordering: .relaxed) >= UInt64(truncatingIfNeeded: ringCapacity) { break }
            let position = Int(truncatingIfNeeded: head & mask)
            let frame = ring + (position &+ ChannelFormat.headerOffset)
            let header = frame.assumingMemoryBound(to: Atomic<UInt64>.self).pointee.load(ordering: .acquiring)
            if header == 0 { break }
            let length = Int(truncatingIfNeeded: header & 0xFFFF_FFFF)
            guard header & ~0xFFFF_FFFF == expected, length <= maximum else {
                if header == ChannelFormat.wrap(sender: sender) {
                    let next = head &+ UInt64(truncatingIfNeeded: ringCapacity &- position)
                    if consumed.pointee.load(ordering: .relaxed) == head {
                        logStart.pointee.store(next, ordering: .relaxed)
                        frame.assumingMemoryBound(to: Atomic<UInt64>.self).pointee.store(0, ordering: .relaxed)
                        reachedCrashPoint(base)
                        consumed.pointee.store(next, ordering: .releasing)
                    }
                    head = next
                    cursor.pointee.store(head, ordering: .relaxed)
                    continue
                }
                // A header still landing (its magic and sender bytes not all there yet).
                let upper = header >> 32, wanted = expected >> 32, wrapped = ChannelFormat.wrap(sender: sender) >> 32
                if upper != wanted, upper != wrapped,
                   ChannelFormat.mayBeLanding(upper, wanted) || ChannelFormat.mayBeLanding(upper, wrapped),
                   stillLanding(ring: kind.ring(of: sender), head: head) { break }
                let error = corruption(from: sender, header: header, head: head, trailer: nil)
                reopen(from: sender, kind: kind)
                throw error
            }
            let stride = ChannelFormat.stride(length)
            let trailerWord = (ring + (position &+ ChannelFormat.trailerOffset(length))).assumingMemoryBound(to: Atomic<UInt64>.self)
            let trailer = trailerWord.pointee.load(ordering: .acquiring)
            if trailer == 0 { break }  // the write has not fully landed yet
            let wantedTrailer = ChannelFormat.trailer(position: head, epoch: epoch)
            guard trailer == wantedTrailer else {
                if ChannelFormat.mayBeLanding(trailer, wantedTrailer), stillLanding(ring: kind.ring(of: sender), head: head) { break }
                let error = corruption(from: sender, header: header, head: head, trailer: trailer)
                reopen(from: sender, kind: kind)
                throw error
            }
            handled &+= 1
            var keep = false
            var failure: (any Error)?
            do {
                keep = try handler(UnsafeRawBufferPointer(start: ring + (position &+ 64), count: length), head)
            } catch {
                failure = error
            }
            if !keep {
                // The handler may have released kept messages and moved the consumed counter.
                if consumed.pointee.load(ordering: .relaxed) == head {
                    logStart.pointee.store(head &+ UInt64(truncatingIfNeeded: stride), ordering: .relaxed)
                    Self.clearFrame(ring: ring, position: position, length: length)
                    reachedCrashPoint(base)
                    // Release: the zeroed words are visible before the sender may reuse the space.
                    consumed.pointee.store(head &+ UInt64(truncatingIfNeeded: stride), ordering: .releasing)
                } else {
                    frame.assumingMemoryBound(to: Atomic<UInt64>.self).pointee
                        .store(header & 0xFFFF_FFFF_FFFF | ChannelFormat.releasedMagic << 48, ordering: .relaxed)
                    if kind == .log { lanes[kind.ring(of: sender) &* Mailbox.stride &+ Mailbox.releasedWord].store(1, ordering: .relaxed) }
                }
            }
            head &+= UInt64(truncatingIfNeeded: stride)
            cursor.pointee.store(head, ordering: .relaxed)
            if let failure {
                advanceIfReleased(from: sender, kind: kind)
                throw failure
            }
        }
        advanceIfReleased(from: sender, kind: kind)
        // A reopening zeroes the ring past the cursor: not while messages that reached the ring
        // are left there for the next poll by `limit` (a COMMIT-BACKUP among them may be the
        // evidence of a commit its coordinator reported). That poll comes: the ring looks busy.
        if (control + ChannelFormat.requestOffset).assumingMemoryBound(to: Atomic<UInt64>.self).pointee.load(ordering: .acquiring) != 0,
           handled < limit || (ring + (Int(truncatingIfNeeded: head & mask) &+ ChannelFormat.headerOffset)).load(as: UInt64.self) == 0 {
            reopen(from: sender, kind: kind)
        }
        return handled
    }

    /// A header or trailer at stream position `head` of ring `ring` that may be part-written:
    /// whether to wait for it (true) or take it for foreign bytes, once it has stayed so for
    /// ``ChannelFormat/landingGraceNanoseconds`` (stale bytes can look half-written for ever).
    @usableFromInline
    func stillLanding(ring: Int, head: UInt64) -> Bool {
        let position = lanes + (ring * Mailbox.stride + Mailbox.landingWord), seen = position + 1
        let now = monotonicNanoseconds()
        if position.pointee.load(ordering: .relaxed) != head &+ 1 {
            position.pointee.store(head &+ 1, ordering: .relaxed)
            seen.pointee.store(now, ordering: .relaxed)
            return true
        }
        if now &- seen.pointee.load(ordering: .relaxed) < ChannelFormat.landingGraceNanoseconds { return true }
        position.pointee.store(0, ordering: .relaxed)
        return false
    }

    /// Reopens `sender`'s ring of `kind` for a new stream: after a sender connection asked for it
    /// (the sender restarted, or found its stream out of step), or after bytes that are not a
    /// message were found (they are refused). The messages kept in the ring stay, restamped with
    /// the new epoch (the `reopening` word tells a scan interrupted by a crash which trailers
    /// are valid); the rest of the ring is zeroed; the next sender connection attaches at the
    /// receiver's position, so stream positions of kept messages stay as they were. Marks the
    /// sender in ``Mailbox/takeReopened()``: a node that reconnects may have restarted, and the
    /// channels towards it need to be checked.
    @usableFromInline
    func reopen(from sender: NodeID, kind: RingKind) {
        let control = base + ChannelFormat.controlOffset(sender: sender, ringCapacity: ringCapacity, kind: kind)
        let ring = control + ChannelFormat.controlBytes
        func word(_ offset: Int) -> UnsafeMutablePointer<Atomic<UInt64>> {
            (control + offset).assumingMemoryBound(to: Atomic<UInt64>.self)
        }
        let consumed = word(0).pointee.load(ordering: .relaxed)
        let cursor = cursors[kind.ring(of: sender) * Mailbox.stride].load(ordering: .relaxed)
        let previous = word(ChannelFormat.epochOffset).pointee.load(ordering: .relaxed)
        var epoch = UInt64.random(in: 1...UInt64.max)
        while epoch == previous { epoch = UInt64.random(in: 1...UInt64.max) }
        word(ChannelFormat.reopeningOffset).pointee.store(epoch, ordering: .relaxed)
        // Restamp what lies between the consumed counter and the cursor: kept messages, and
        // released ones behind them (the poller validated every one of them).
        Mailbox.forEachFrame(in: ring, ringCapacity: ringCapacity, sender: sender, from: consumed, to: cursor) { head, position, _, length in
            (ring + position + ChannelFormat.trailerOffset(length)).assumingMemoryBound(to: Atomic<UInt64>.self).pointee
                .store(ChannelFormat.trailer(position: head, epoch: epoch), ordering: .relaxed)
            return true
        }
        // Zero the free part of the ring: the new stream starts on clean bytes.
        ChannelFormat.forEachFreeSegment(from: cursor, to: consumed &+ UInt64(ringCapacity), ringCapacity: ringCapacity) { offset, count in
            memset(ring + offset, 0, count)
        }
        word(ChannelFormat.resumeOffset).pointee.store(cursor, ordering: .relaxed)
        word(ChannelFormat.epochOffset).pointee.store(epoch, ordering: .relaxed)
        word(ChannelFormat.requestOffset).pointee.store(0, ordering: .relaxed)
        // Release: a sender whose compare-and-swap attaches sees all of the above.
        word(ChannelFormat.attachedOffset).pointee.store(0, ordering: .releasing)
        lanes[kind.ring(of: sender) * Mailbox.stride + Mailbox.reopenedWord].store(1, ordering: .relaxed)
    }

    /// At the end of a poll of `sender`'s log: moves its consumed counter over the messages
    /// released at its head during the poll.
    @inlinable @inline(__always)
    func advanceIfReleased(from sender: NodeID, kind: RingKind) {
        guard kind == .log else { return }
        let released = lanes + (kind.ring(of: sender) &* Mailbox.stride &+ Mailbox.releasedWord)
        guard released.pointee.load(ordering: .relaxed) != 0 else { return }
        released.pointee.store(0, ordering: .relaxed)
        advanceConsumed(from: sender)
    }

    /// Zeroes the header, the trailer, and the last two words of every line the payload fills up
    /// to its end, of the message of `length` bytes at ring offset `position`: the only words a
    /// later message's header or trailer can use.
    @inlinable @inline(__always)
    static func clearFrame(ring: UnsafeMutableRawPointer, position: Int, length: Int) {
        let stride = ChannelFormat.stride(length)
        (ring + (position &+ ChannelFormat.headerOffset)).storeBytes(of: 0, as: UInt64.self)
        (ring + (position &+ ChannelFormat.trailerOffset(length))).assumingMemoryBound(to: Atomic<UInt64>.self).pointee
            .store(0, ordering: .relaxed)
        var line = ring + (position &+ 64 &+ 48)
        let end = ring + (position &+ stride)
        while line < end {
            line.storeBytes(of: (0, 0) as (UInt64, UInt64), as: (UInt64, UInt64).self)
            line += 64
        }
    }

    /// Moves `sender`'s consumed counter over the released messages and wrap words at its head,
    /// up to the cursor, clearing them.
    @usableFromInline
    func advanceConsumed(from sender: NodeID) {
        let control = base + ChannelFormat.controlOffset(sender: sender, ringCapacity: ringCapacity)
        let consumed = control.assumingMemoryBound(to: Atomic<UInt64>.self)
        let ring = control + ChannelFormat.controlBytes
        let mask = UInt64(ringCapacity - 1)
        let cursor = cursors[sender.index * Mailbox.stride].load(ordering: .relaxed)
        let start = consumed.pointee.load(ordering: .relaxed)
        // How far the counter moves: over released frames and wrap words, up to the cursor.
        var end = start
        while end < cursor {
            let position = Int(end & mask)
            let header = (ring + position + ChannelFormat.headerOffset).load(as: UInt64.self)
            if header == ChannelFormat.wrap(sender: sender) {
                end &+= UInt64(ringCapacity - position)
            } else if header >> 48 == ChannelFormat.releasedMagic {
                end &+= UInt64(ChannelFormat.stride(Int(header & 0xFFFF_FFFF)))
            } else {
                break
            }
        }
        guard end != start else { return }
        // The log start first, then the zeroing, then the counter (see the control line's layout).
        (control + ChannelFormat.logStartOffset).assumingMemoryBound(to: Atomic<UInt64>.self).pointee.store(end, ordering: .relaxed)
        var head = start
        while head < end {
            let position = Int(head & mask)
            let frame = ring + position + ChannelFormat.headerOffset
            let header = frame.load(as: UInt64.self)
            if header == ChannelFormat.wrap(sender: sender) {
                frame.storeBytes(of: 0, as: UInt64.self)
                head &+= UInt64(ringCapacity - position)
            } else {
                let length = Int(header & 0xFFFF_FFFF)
                Self.clearFrame(ring: ring, position: position, length: length)
                head &+= UInt64(ChannelFormat.stride(length))
            }
            reachedCrashPoint(base)
        }
        consumed.pointee.store(end, ordering: .releasing)
    }

    /// What is wrong with the ring of `sender` at stream position `head`, whose header word is
    /// `header` (and trailer word `trailer`, when the header was good).
    @usableFromInline
    func corruption(from sender: NodeID, header: UInt64, head: UInt64, trailer: UInt64?) -> TransportError {
        let offset = Int(head & UInt64(ringCapacity - 1)) + ChannelFormat.headerOffset
        let from = NodeID(rawValue: UInt16(truncatingIfNeeded: header >> 32))
        let reason: String
        if from != sender {
            reason = "a message at ring offset \(offset) claims to come from node \(from)"
        } else if let trailer {
            let at = offset - ChannelFormat.headerOffset + ChannelFormat.trailerOffset(Int(header & 0xFFFF_FFFF))
            reason = "the message at stream position \(head) has a foreign trailer 0x\(String(trailer, radix: 16)) at ring offset \(at)"
        } else {
            reason = "bad header 0x\(String(header, radix: 16)) at ring offset \(offset)"
        }
        return .corruptChannel(sender: sender, receiver: receiver, reason: reason)
    }

}

/// The receive side of the channel from one sender: a ring in the local mailbox.
///
/// Each call takes the mailbox's poll claim (every lane) for its duration (see ``Mailbox/withPoller(_:)``); a
/// poller that serves many rings takes the claim once and polls through ``MailboxPoller``.
public struct ChannelReceiver: Sendable {
    /// The local mailbox holding the ring.
    public let mailbox: Mailbox
    /// The node whose messages this ring carries.
    public let sender: NodeID
    /// Which of the sender's two rings this is.
    public let kind: RingKind
    /// This node: the mailbox's owner.
    public var receiver: NodeID { mailbox.node }
    /// The ring's capacity, in bytes.
    public var ringCapacity: Int { mailbox.ringCapacity }

    /// Whether no message (not even a partly written one) waits at the head of the ring.
    public var isEmpty: Bool { mailbox.isEmpty(from: sender, kind: kind) }

    /// ``MailboxPoller/poll(from:kind:limit:_:)`` on this ring, waiting for the poll claim if another
    /// thread holds it.
    @discardableResult
    public func poll(limit: Int = .max, _ handler: (UnsafeRawBufferPointer) throws -> Void) throws -> Int {
        try mailbox.withPoller { poller in try poller.poll(from: sender, kind: kind, limit: limit, handler) }
    }
}

/// The send side of a channel to one receiver: one-sided writes into the receiver's ring.
///
/// Senders on several threads share it. Where the transport maps the receiver's ring into this
/// process (shared memory), each send reserves its bytes with one compare-and-swap on the
/// channel's tail and writes them straight into the ring: no lock. Otherwise (verbs) sends build
/// the message in a staging buffer and are serialised by its lock.
public final class ChannelSender: Sendable {
    /// Set while the receiver is being removed from the configuration: a send waiting for ring
    /// space (or for the ring to be reopened) gives up at once instead of after the send timeout.
    private let givenUp = Atomic<Bool>(false)

    /// Makes sends that would wait for this receiver fail at once (`true`), or wait again (`false`).
    public func giveUpWaiting(_ giveUp: Bool) { givenUp.store(giveUp, ordering: .relaxed) }

    /// The sending node: this one.
    public let sender: NodeID
    /// The node whose mailbox the channel writes.
    public let receiver: NodeID
    /// The capacity of the receiver's ring, in bytes.
    public let ringCapacity: Int
    /// The largest message this channel carries.
    public let maximumMessage: Int
    /// How long ``send(_:usingReserve:)`` waits for a receiver that does not free ring space.
    public let sendTimeoutNanoseconds: UInt64
    /// Which of the receiver's rings this channel writes.
    public let kind: RingKind
    /// This connection's identity in the ring's control line: random, never 0.
    public let connection: UInt64
    private let transport: any Transport
    private let controlAddress: GlobalAddress
    private let ringAddress: GlobalAddress
    /// Serialises attaching (``attach(wait:)``): one thread re-establishes the stream while the
    /// others wait in the slow path.
    /// Serialises attaching; holds whether the receiver's ring geometry has been read and found
    /// to be the one this sender uses (false only for a sender made with an assumed geometry
    /// while its receiver was unreachable: the first attach checks it).
    private let attachment = Mutex<Bool>(true)
    /// Where the transport maps the receiver's control line and ring into this process (shared
    /// memory), as bit patterns; 0 where it does not (verbs). With a mapping a message is written
    /// straight into the ring, with the same ordering as a one-sided write (trailer last).
    private let mappedControl: UInt
    @usableFromInline let mappedRing: UInt
    /// Where the transport maps the receiver's incarnation word (``ChannelFormat/incarnationOffset``),
    /// with the ring; 0 where it does not.
    @usableFromInline let mappedIncarnation: UInt
    /// One cache line of its own, so that the senders' compare-and-swaps do not evict the fields
    /// above: word 0 is the tail (ring bytes reserved so far; ``detached`` while this connection
    /// is not attached to the ring), word 1 the receiver's consumed counter as last read (never
    /// ahead of the real one: a stale value only makes a sender look again), word 2 the epoch of
    /// the stream (mixed into trailers), word 3 the bytes promised to commits under way
    /// (``promise(_:)``), word 4 the transport's ``Transport/peerGeneration(of:)`` of the receiver
    /// when this connection last attached. Bit patterns of the pointer, as `Sendable` requires.
    @usableFromInline let counters: UInt
    /// The staging buffer of the unmapped path, and the lock that serialises it.
    private let staging: Mutex<UInt>

    /// The tail of a connection that is not attached to the receiver's ring: far beyond any
    /// consumed counter, so that every reservation fails and sends take the slow path, which attaches.
    @usableFromInline static let detached: UInt64 = 1 << 62

    /// Opens the channel from `transport.localNode` to `receiver`: reads the receiver's ring
    /// geometry from its mailbox header (one read) and attaches to the ring if it is open (one
    /// compare-and-swap, one read). A ring still attached to another connection (this node
    /// before a restart) is asked to reopen; the first send waits for that.
    ///
    /// - Parameters:
    ///   - transport: this node's transport (the sender is its local node).
    ///   - receiver: the node whose mailbox holds the ring.
    ///   - kind: which of the sender's rings in that mailbox: the log or the message queue.
    ///   - sendTimeout: how long a send waits for ring space or for the receiver to reopen the ring.
    ///   - assumedRingCapacity: for a receiver that may not be running yet (a client member over
    ///     verbs, whose transport answers only while its program runs): the ring capacity to use
    ///     if its mailbox cannot be read now (the peer is unreachable, or has not registered its
    ///     mailbox). The sender then starts detached, and its first send reads the receiver's
    ///     geometry and fails with ``TransportError/corruptChannel(sender:receiver:reason:)`` if
    ///     it differs.
    public init(transport: any Transport, to receiver: NodeID, kind: RingKind = .log, sendTimeout: Duration = .seconds(10),
                assumedRingCapacity: Int? = nil) throws(TransportError) {
        let mailbox = RegionID.mailbox(of: receiver)
        var shift: UInt32
        var verified = true
        do throws(TransportError) {
            shift = try Self.ringShift(transport, of: receiver)
        } catch {
            // Not running, or running without its mailbox registered yet.
            var absent = false
            if case .peerUnreachable = error { absent = true }
            if case .unknownRegion(_, mailbox, _) = error { absent = true }
            guard let assumedRingCapacity, absent,
                  assumedRingCapacity >= 4096, assumedRingCapacity & (assumedRingCapacity - 1) == 0 else { throw error }
            shift = UInt32(assumedRingCapacity.trailingZeroBitCount)
            verified = false
        }
        self.transport = transport
        self.sender = transport.localNode
        self.receiver = receiver
        self.kind = kind
        self.connection = UInt64.random(in: 1...UInt64.max)
        self.ringCapacity = 1 << Int(shift)
        self.maximumMessage = ChannelFormat.maximumMessage(ringCapacity: ringCapacity)
        let control = ChannelFormat.controlOffset(sender: transport.localNode, ringCapacity: ringCapacity, kind: kind)
        self.controlAddress = GlobalAddress(region: mailbox, offset: UInt32(control))
        self.ringAddress = GlobalAddress(region: mailbox, offset: UInt32(control + ChannelFormat.controlBytes))
        let (seconds, attoseconds) = sendTimeout.components
        self.sendTimeoutNanoseconds = UInt64(seconds) * 1_000_000_000 + UInt64(attoseconds / 1_000_000_000)
        let counters = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 64)
        counters.initializeMemory(as: UInt64.self, repeating: 0, count: 8)
        self.counters = UInt(bitPattern: counters)
        let mappedControlLine = transport.mappedAddress(of: controlAddress, on: receiver, length: ChannelFormat.controlBytes)
        let mappedRingStart = transport.mappedAddress(of: ringAddress, on: receiver, length: ringCapacity)
        let mappedIncarnationWord = transport.mappedAddress(
            of: GlobalAddress(region: controlAddress.region, offset: UInt32(ChannelFormat.incarnationOffset)), on: receiver, length: 8)
        if let mappedControlLine, let mappedRingStart, let mappedIncarnationWord {
            mappedControl = UInt(bitPattern: mappedControlLine)
            mappedRing = UInt(bitPattern: mappedRingStart)
            mappedIncarnation = UInt(bitPattern: mappedIncarnationWord)
            staging = Mutex(0)
        } else {
            mappedControl = 0
            mappedRing = 0
            mappedIncarnation = 0
            staging = Mutex(UInt(bitPattern: UnsafeMutableRawPointer.allocate(byteCount: ChannelFormat.stride(maximumMessage), alignment: 64)))
        }
        tail.pointee.store(Self.detached, ordering: .relaxed)
        attachment.withLock { $0 = verified }
        if verified { _ = try attach(wait: false) }
    }

    /// The ring size exponent in `receiver`'s mailbox header (one read).
    private static func ringShift(_ transport: any Transport, of receiver: NodeID) throws(TransportError) -> UInt32 {
        let mailbox = RegionID.mailbox(of: receiver)
        var geometry: (UInt32, UInt32) = (0, 0)
        try withUnsafeMutableBytes(of: &geometry) { (buffer) throws(TransportError) in
            try transport.read(from: receiver, GlobalAddress(region: mailbox, offset: 16), into: buffer)
        }
        guard geometry.0 == mailbox.rawValue, geometry.1 >= 12, geometry.1 < 32 else {
            throw .corruptChannel(sender: transport.localNode, receiver: receiver,
                                  reason: "node \(receiver)'s mailbox header is not a mailbox (region 0x\(String(geometry.0, radix: 16)), ring 2^\(geometry.1))")
        }
        return geometry.1
    }

    deinit {
        UnsafeMutableRawPointer(bitPattern: counters)!.deallocate()
        staging.withLock { buffer in UnsafeMutableRawPointer(bitPattern: buffer)?.deallocate() }
    }

    @inlinable var tail: UnsafeMutablePointer<Atomic<UInt64>> {
        UnsafeMutablePointer(bitPattern: counters)!
    }

    @inlinable var knownHead: UnsafeMutablePointer<Atomic<UInt64>> {
        UnsafeMutablePointer<Atomic<UInt64>>(bitPattern: counters)! + 1
    }

    @inlinable var epoch: UnsafeMutablePointer<Atomic<UInt64>> {
        UnsafeMutablePointer<Atomic<UInt64>>(bitPattern: counters)! + 2
    }

    @inlinable var promised: UnsafeMutablePointer<Atomic<UInt64>> {
        UnsafeMutablePointer<Atomic<UInt64>>(bitPattern: counters)! + 3
    }

    /// The receiver's ``Transport/peerGeneration(of:)`` when this connection last attached.
    @inlinable var attachedGeneration: UnsafeMutablePointer<Atomic<UInt64>> {
        UnsafeMutablePointer<Atomic<UInt64>>(bitPattern: counters)! + 4
    }

    /// On the mapped path: whether the receiver's mailbox was opened by a new process since this
    /// connection attached (one load of a line that changes only then).
    @inlinable var mappedReceiverRestarted: Bool {
        UnsafeMutablePointer<Atomic<UInt64>>(bitPattern: mappedIncarnation)!.pointee.load(ordering: .relaxed)
            != attachedGeneration.pointee.load(ordering: .relaxed)
    }

    /// Detaches this connection if it is attached and `restarted` says the receiver restarted
    /// since it attached: the new process has a new, zeroed ring, where this stream's position
    /// and epoch would write foreign bytes (its requests would get replies it never sees). The
    /// next reservation attaches again (``reserve``).
    private func detachIfReceiverRestarted(_ restarted: () -> Bool) {
        let current = tail.pointee.load(ordering: .relaxed)
        if current < Self.detached, restarted() {
            _ = tail.pointee.compareExchange(expected: current, desired: Self.detached, ordering: .relaxed)
        }
    }

    /// Whether the transport found the receiver restarted since this connection attached: its
    /// stream position and epoch are the former process's, and the ring it wrote is gone.
    private var receiverRestarted: Bool {
        attachedGeneration.pointee.load(ordering: .relaxed) != transport.peerGeneration(of: receiver)
    }

    /// Whether this connection is attached to the receiver's ring as far as it knows (a receiver
    /// that reopened the ring since is noticed at the next ``checkConnection(wait:)`` or slow send).
    public var isAttached: Bool { tail.pointee.load(ordering: .relaxed) < Self.detached }

    /// Attaches this connection to the receiver's ring: a compare-and-swap of the ring's
    /// `attached` word from 0 (open) to ``connection``, then one read of where to start. If the
    /// ring is attached to another connection, or to this one with a stream this side has lost
    /// track of, posts a reopening request (and bumps the mailbox's attention word) and, with
    /// `wait`, waits up to the send timeout for the receiver to reopen it, repeating the request
    /// now and then (a receiver that restarted meanwhile lost it).
    ///
    /// - Returns: whether the connection is attached.
    /// - Throws: ``TransportError/peerUnreachable(node:detail:)`` when the receiver does not reopen
    ///   the ring in time, or the transport's error.
    private func attach(wait: Bool) throws(TransportError) -> Bool {
        try attachment.withLock { verified throws(TransportError) -> Bool in
            if tail.pointee.load(ordering: .acquiring) < Self.detached { return true }  // attached meanwhile
            if !verified {
                let shift = try Self.ringShift(transport, of: receiver)
                guard 1 << Int(shift) == ringCapacity else {
                    throw .corruptChannel(sender: sender, receiver: receiver,
                                          reason: "node \(receiver)'s rings are 2^\(shift) bytes, and this node assumed \(ringCapacity) (the ring capacity of its own mailbox) while node \(receiver) was not running: give every member the same ring capacity")
                }
                verified = true
            }
            let attached = controlAddress.advanced(by: ChannelFormat.attachedOffset)
            var requestedAt: UInt64 = 0
            let start = monotonicNanoseconds()
            var backoff = Backoff(maximumSleepMicroseconds: 500)
            while true {
                // Read before the ring's control line: a restart found after this is seen by the
                // next send (``receiverRestarted``).
                let generation = transport.peerGeneration(of: receiver)
                if try transport.compareAndSwap(at: receiver, attached, expected: 0, desired: connection) == 0 {
                    var words: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
                    try withUnsafeMutableBytes(of: &words) { (buffer) throws(TransportError) in
                        try transport.read(from: receiver, controlAddress, into: buffer)
                    }
                    let (consumed, epoch, _, resume) = words
                    guard resume >= consumed, resume - consumed <= UInt64(ringCapacity), resume < Self.detached else {
                        throw .corruptChannel(sender: sender, receiver: receiver,
                                              reason: "the receiver's \(kind) ring says to resume at \(resume) with \(consumed) bytes consumed")
                    }
                    try clearFreeSpace(from: resume, to: consumed &+ UInt64(ringCapacity))
                    self.epoch.pointee.store(epoch, ordering: .relaxed)
                    attachedGeneration.pointee.store(generation, ordering: .relaxed)
                    knownHead.pointee.store(consumed, ordering: .releasing)
                    tail.pointee.store(resume, ordering: .releasing)
                    return true
                }
                let now = monotonicNanoseconds()
                if requestedAt == 0 || now - requestedAt > 50_000_000 {
                    var request = connection
                    try withUnsafeBytes(of: &request) { (buffer) throws(TransportError) in
                        try transport.write(to: receiver, controlAddress.advanced(by: ChannelFormat.requestOffset), from: buffer)
                    }
                    _ = try transport.fetchAndAdd(at: receiver, GlobalAddress(region: controlAddress.region, offset: UInt32(ChannelFormat.attentionOffset)), 1)
                    requestedAt = now
                }
                if !wait { return false }
                if now - start > sendTimeoutNanoseconds || givenUp.load(ordering: .relaxed) {
                    throw .peerUnreachable(node: receiver, detail: "its \(kind == .log ? "log" : "message queue") ring for \(sender) was not reopened for this connection within \((now - start) / 1_000_000) ms (is it polling?)")
                }
                backoff.pause()
            }
        }
    }

    /// Zeroes the ring's free space, stream positions `start` to `end` (``ChannelFormat/forEachFreeSegment(from:to:ringCapacity:maximum:_:)``):
    /// bytes a connection wrote after the receiver cleared or reopened the ring, and before it
    /// learned that it was detached, must not pass for messages of the new stream. One write per
    /// 64 KiB.
    private func clearFreeSpace(from start: UInt64, to end: UInt64) throws(TransportError) {
        try ChannelFormat.forEachFreeSegment(from: start, to: end, ringCapacity: ringCapacity, maximum: 64 << 10) { (offset, count) throws(TransportError) in
            if mappedRing != 0 {
                memset(UnsafeMutableRawPointer(bitPattern: mappedRing)! + offset, 0, count)
            } else {
                let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 64)
                defer { zeros.deallocate() }
                zeros.initializeMemory(as: UInt8.self, repeating: 0)
                try transport.write(to: receiver, ringAddress.advanced(by: offset), from: UnsafeRawBufferPointer(zeros))
            }
        }
    }

    /// Checks that the receiver's ring is still attached to this connection (one read); if the
    /// receiver reopened it (it restarted, or refused bytes it could not read), or the transport
    /// found it restarted, attaches again, waiting for the receiver if `wait`. Messages sent
    /// between the reopening and now are lost: the caller learns it from what they were for (a
    /// reply that does not come).
    ///
    /// Off the mapped path this takes the staging lock, so that no write of the stream being
    /// left is in flight while attaching clears the ring's free space (a write landing after the
    /// clear would stay in the new stream as foreign bytes, and the receiver would refuse the
    /// stream when it reached them). Without `wait`, a staging buffer in use by another thread
    /// skips the check: that thread's send checks for a restart itself, and the next check
    /// comes.
    ///
    /// - Returns: whether the connection is attached (without `wait`, with the staging buffer in
    ///   use: as far as it knows).
    @discardableResult
    public func checkConnection(wait: Bool = true) throws(TransportError) -> Bool {
        if mappedRing != 0 { return try checkAttachment(wait: wait) }
        func attempt() -> Result<Bool, TransportError> {
            do throws(TransportError) {
                return .success(try checkAttachment(wait: wait))
            } catch {
                return .failure(error)
            }
        }
        if wait { return try staging.withLock { _ in attempt() }.get() }
        guard let result = staging.withLockIfAvailable({ _ in attempt() }) else { return isAttached }
        return try result.get()
    }

    private func checkAttachment(wait: Bool) throws(TransportError) -> Bool {
        let reserved = tail.pointee.load(ordering: .relaxed)
        if reserved < Self.detached {
            if !receiverRestarted, try readControl().attached == connection { return true }
            _ = tail.pointee.compareExchange(expected: reserved, desired: Self.detached, ordering: .relaxed)
        }
        return try attach(wait: wait)
    }

    /// The channel's send state, for diagnostics: bytes reserved, and the receiver's consumed
    /// counter as last read.
    public var sendState: String {
        "channel to \(receiver): reserved \(tail.pointee.load(ordering: .relaxed)), consumed as last read \(knownHead.pointee.load(ordering: .relaxed))"
    }

    /// The receiver's consumed counter and the connection its ring is attached to (one one-sided read).
    private func readControl() throws(TransportError) -> (consumed: UInt64, attached: UInt64) {
        if mappedControl != 0 {
            let words = UnsafeMutablePointer<Atomic<UInt64>>(bitPattern: mappedControl)!
            return (words.pointee.load(ordering: .acquiring), (words + 2).pointee.load(ordering: .relaxed))
        }
        let words = try readWhole(ControlWords())
        return (words.consumed, words.attached)
    }

    /// The first three words of a ring's control line, as one read brings them.
    private struct ControlWords: BitwiseCopyable, Equatable {
        var consumed: UInt64 = 0
        var epoch: UInt64 = 0
        var attached: UInt64 = 0
    }

    /// The receiver's consumed counter (one one-sided read, or more, see ``readWhole(_:)``).
    private func readHead() throws(TransportError) -> UInt64 {
        if mappedControl != 0 {
            return UnsafeMutablePointer<Atomic<UInt64>>(bitPattern: mappedControl)!.pointee.load(ordering: .acquiring)
        }
        return try readWhole(UInt64(0))
    }

    /// Reads the words at the start of the receiver's control line into a value shaped like
    /// `initial`; where the transport's reads may tear words (``Transport/readsMayTearWords``),
    /// again until two reads in a row agree. A one-sided read of a software device
    /// (rxe copies with the kernel's `memcpy`, a byte at a time under emulation) can tear a word
    /// the receiver stores at that moment: a consumed counter torn between its value before and
    /// after a store can be larger than both, and a sender that believed it would overwrite
    /// messages not yet taken. The second read starts after the first ends, so when both agree no
    /// store fell inside the first. (Used only when the control line is not mapped: the sender
    /// reads it when its ring looks full and when it checks its connection.)
    private func readWhole<Words: BitwiseCopyable & Equatable>(_ initial: Words) throws(TransportError) -> Words {
        func read() throws(TransportError) -> Words {
            var words = initial
            try withUnsafeMutableBytes(of: &words) { (buffer) throws(TransportError) in
                try transport.read(from: receiver, controlAddress, into: buffer)
            }
            return words
        }
        var last = try read()
        guard transport.readsMayTearWords else { return last }
        while true {
            let next = try read()
            if next == last { return next }
            last = next
        }
    }

    /// Sends `message` (one one-sided write, plus one for a wrap and one read of the receiver's
    /// progress when the ring looks full). Waits, backing off, while the receiver's ring is full.
    ///
    /// Inlinable: on shared memory a send with room in the ring is one compare-and-swap and the
    /// stores of the message, in the caller's code.
    ///
    /// - Throws: ``TransportError/messageTooLarge(bytes:maximum:)``,
    ///   ``TransportError/channelFull(receiver:waitedMilliseconds:)`` after the send timeout, or the
    ///   transport's error.
    /// With `usingReserve`, the message may use the last eighth of the ring, which other messages
    /// leave free: a receiver that keeps messages in its ring as a log (``MailboxPoller/poll(from:kind:limit:keeping:)``)
    /// frees their space only when later messages (a truncation, say) arrive, and those must find
    /// room even when the kept ones have filled the rest.
    @inlinable @inline(__always)
    public func send(_ message: UnsafeRawBufferPointer, usingReserve: Bool = false) throws(TransportError) {
        _ = try send(message, limit: limit(usingReserve: usingReserve), wait: true)
    }

    /// The bytes of the ring a message may fill: all of it with `usingReserve`, else seven eighths
    /// less what is promised (``ordinaryLimit``).
    @inlinable func limit(usingReserve: Bool) -> Int { usingReserve ? ringCapacity : Self.ordinaryLimit }

    /// The limit of an ordinary message: seven eighths of the ring less the bytes promised to
    /// commits under way, looked up at each reservation (the promises change while a send waits).
    @usableFromInline static let ordinaryLimit = -1

    /// Every send: the message within `limit` bytes of the ring, inline when the ring has room on
    /// the mapped path, else through ``sendSlowly(_:wait:limit:)`` (waiting for room with `wait`).
    /// Returns false if nothing was sent.
    @inlinable @inline(__always)
    func send(_ message: UnsafeRawBufferPointer, limit: Int, wait: Bool) throws(TransportError) -> Bool {
        if mappedRing != 0, message.count <= maximumMessage, !mappedReceiverRestarted,
           let reservation = reserveIfRoom(length: message.count, limit: limit) {
            writeMapped(message, at: reservation)
            return true
        }
        return try sendSlowly(message, wait: wait, limit: limit)
    }

    // MARK: Log space promised to commits (FaRM reserves log space before a commit starts)
    //
    // A commit's records stay in the receivers' logs until its TRUNCATE, so a commit that found a
    // log full half-way (its LOCKs sent, a COMMIT-BACKUP with no room) would wait for the
    // TRUNCATEs of other commits that may be waiting the same way. So before it sends anything, a
    // commit promises itself the space of every record it may send to each receiver (LOCK,
    // COMMIT-BACKUP, COMMIT-PRIMARY); promises are granted while the ring's bytes in use and
    // promised stay within ``promiseLimit``; ordinary messages leave the promised bytes free
    // (``ordinaryLimit``); a promised record may use the whole ring. The quarter above the limit
    // holds the one wrap there can be in a ring's length of stream (a record that does not fit
    // before the ring's end leaves the rest unused: less than the largest frame, a quarter of
    // the ring and a line). So a promised record finds room unless ABORT and TRUNCATE records
    // (which use the reserve, and free space once the receiver takes them) hold it for a moment.
    // ABORT and TRUNCATE need no promise. One commit alone always gets its promise: its records
    // to one receiver (a LOCK and a COMMIT-BACKUP, each at most a quarter, and a COMMIT-PRIMARY)
    // fit within the limit of an empty ring.

    /// How much of the ring the bytes in use and the promises may fill together: three quarters,
    /// less a line.
    @inlinable public var promiseLimit: Int { ringCapacity &- ringCapacity >> 2 &- 64 }

    /// Bytes promised now, for diagnostics and tests.
    public var promisedBytes: Int { Int(truncatingIfNeeded: promised.pointee.load(ordering: .relaxed)) }

    /// Promises `bytes` of the ring to a commit's later records, if the bytes in use (after one
    /// look at the receiver's progress when the ring looks full) and those already promised leave
    /// room within ``promiseLimit``; false otherwise (nothing promised).
    public func promise(_ bytes: Int) -> Bool {
        var refreshed = false
        var current = promised.pointee.load(ordering: .relaxed)
        while true {
            // The receiver's progress is read at most once (a one-sided read off the mapped path).
            if bytesInUse &+ Int(truncatingIfNeeded: current) &+ bytes > promiseLimit {
                if refreshed { return false }
                refreshed = true
                _ = refreshedBytesInUse()
                continue
            }
            let (exchanged, found) = promised.pointee.compareExchange(expected: current, desired: current &+ UInt64(bytes), ordering: .relaxed)
            if exchanged { return true }
            current = found
        }
    }

    /// Gives back `bytes` of a promise (records the commit did not send, or sent).
    @inlinable @inline(__always)
    public func releasePromise(_ bytes: Int) {
        promised.pointee.subtract(UInt64(truncatingIfNeeded: bytes), ordering: .relaxed)
    }

    /// Sends a record `promise(_:)` promised space to, anywhere in the ring (waiting, with
    /// `waiting`, for room that ABORT and TRUNCATE records may hold for a moment; else returning
    /// false at once). The promise stays until the commit gives it back.
    @inlinable @inline(__always)
    public func sendPromised(_ message: UnsafeRawBufferPointer, waiting: Bool) throws(TransportError) -> Bool {
        try send(message, limit: ringCapacity, wait: waiting)
    }

    /// Bytes of the ring in use as this sender last learned (reserved, not yet freed by the
    /// receiver): two loads of the sender's own counters, no round trip. May overstate.
    @inlinable
    public var bytesInUse: Int {
        let reserved = tail.pointee.load(ordering: .relaxed)
        return reserved >= Self.detached ? 0 : Int(truncatingIfNeeded: reserved &- knownHead.pointee.load(ordering: .relaxed))
    }

    /// ``bytesInUse`` after learning the receiver's progress (one load on shared memory, one
    /// one-sided read otherwise); ``bytesInUse`` if that read fails.
    public func refreshedBytesInUse() -> Int {
        if let head = try? readHead() {
            // Never move the known head backwards (another thread may have stored a newer one).
            var known = knownHead.pointee.load(ordering: .relaxed)
            while known < head {
                let (exchanged, found) = knownHead.pointee.compareExchange(expected: known, desired: head, ordering: .releasing)
                if exchanged { break }
                known = found
            }
        }
        return bytesInUse
    }

    /// Sends `message` only if that needs no waiting: the ring has room (after one read of the
    /// receiver's progress) and, on the unmapped path, the staging buffer is not in use by another
    /// thread. A poller answers with this, so that it never blocks on a peer that may be blocked on it.
    ///
    /// - Returns: false if nothing was sent.
    @inlinable
    public func trySend(_ message: UnsafeRawBufferPointer, usingReserve: Bool = false) throws(TransportError) -> Bool {
        try send(message, limit: limit(usingReserve: usingReserve), wait: false)
    }

    /// The sends that ``send(_:usingReserve:)`` and ``trySend(_:)`` do not finish inline: a message too large,
    /// a ring that looks full, and the unmapped path.
    @usableFromInline
    func sendSlowly(_ message: UnsafeRawBufferPointer, wait: Bool, limit: Int) throws(TransportError) -> Bool {
        guard message.count <= maximumMessage else {
            throw .messageTooLarge(bytes: message.count, maximum: maximumMessage)
        }
        if mappedRing != 0 {
            detachIfReceiverRestarted { mappedReceiverRestarted }
            guard let reservation = try reserve(length: message.count, wait: wait, limit: limit) else { return false }
            writeMapped(message, at: reservation)
            return true
        }
        // The caller's buffer is only read inside the lock, during this call: pass it as an address.
        let start = UInt(bitPattern: message.baseAddress)
        let count = message.count
        func attempt(_ buffer: UInt) -> Result<Bool, TransportError> {
            do throws(TransportError) {
                return .success(try sendStaged(UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: start), count: count),
                                               staging: buffer, wait: wait, limit: limit))
            } catch {
                return .failure(error)
            }
        }
        if wait { return try staging.withLock { attempt($0) }.get() }
        guard let result = staging.withLockIfAvailable({ attempt($0) }) else { return false }
        return try result.get()
    }

    /// Ring bytes reserved for one message: `start` is the message's stream position; when the
    /// message did not fit before the end of the ring, `wrap` is the ring offset where the wrap
    /// word goes (the message then starts at offset 0).
    @usableFromInline
    struct Reservation {
        @usableFromInline var start: UInt64
        /// -1: no wrap.
        @usableFromInline var wrap: Int
        /// The tail before the reservation.
        @usableFromInline var previous: UInt64

        @inlinable init(start: UInt64, wrap: Int, previous: UInt64) {
            self.start = start
            self.wrap = wrap
            self.previous = previous
        }
    }

    /// Reserves room for a message of `length` bytes, and for the wrap before it if needed, by
    /// advancing the tail with a compare-and-swap, if the receiver's consumed counter as last read
    /// shows room; nil otherwise (``reserve(length:wait:)`` then reads it again, and waits).
    @inlinable @inline(__always)
    func reserveIfRoom(length: Int, limit: Int) -> Reservation? {
        let capacity = UInt64(truncatingIfNeeded: ringCapacity)
        let stride = ChannelFormat.stride(length)
        // The message and the line after it, where its trailer goes.
        let frameEnd = stride &+ 64
        while true {
            // Acquire: a tail stored by ``attach(wait:)`` comes with the stream's epoch.
            let reserved = tail.pointee.load(ordering: .acquiring)
            let position = Int(truncatingIfNeeded: reserved & (capacity &- 1))
            let wraps = position &+ frameEnd > ringCapacity
            let needed = UInt64(truncatingIfNeeded: wraps ? stride &+ ringCapacity &- position : stride)
            // Acquire: pairs with the release of whoever stored it, itself after an acquiring read
            // of the receiver's counter, so the receiver's zeroing happens before our writes.
            let head = knownHead.pointee.load(ordering: .acquiring)
            if reserved < head { continue }  // the tail moved on since we loaded it
            let room = limit >= 0 ? limit
                : ringCapacity &- ringCapacity >> 3 &- Int(truncatingIfNeeded: promised.pointee.load(ordering: .relaxed))
            if Int(truncatingIfNeeded: reserved &- head &+ needed) > room { return nil }
            if tail.pointee.compareExchange(expected: reserved, desired: reserved &+ needed, ordering: .relaxed).exchanged {
                return wraps ? Reservation(start: reserved &+ capacity &- UInt64(truncatingIfNeeded: position), wrap: position, previous: reserved)
                             : Reservation(start: reserved, wrap: -1, previous: reserved)
            }
        }
    }

    /// ``reserveIfRoom(length:)``, reading the receiver's consumed counter when the ring looks
    /// full, and waiting while it is, unless `wait` is false (then returns nil).
    private func reserve(length: Int, wait: Bool, limit: Int) throws(TransportError) -> Reservation? {
        var waitingSince: UInt64 = 0
        var backoff = Backoff(maximumSleepMicroseconds: 200)
        while true {
            if let reservation = reserveIfRoom(length: length, limit: limit) { return reservation }
            let reserved = tail.pointee.load(ordering: .relaxed)
            if reserved >= Self.detached {
                if try !attach(wait: wait) { return nil }
                continue
            }
            let (head, attached) = try readControl()
            if attached != connection || reserved < head || reserved - head > UInt64(ringCapacity) {
                // The receiver reopened the ring (it restarted, or refused what it read), or its
                // counter is out of step with this stream: attach again.
                _ = tail.pointee.compareExchange(expected: reserved, desired: Self.detached, ordering: .relaxed)
                continue
            }
            knownHead.pointee.store(head, ordering: .releasing)
            if let reservation = reserveIfRoom(length: length, limit: limit) { return reservation }
            if !wait { return nil }
            let now = monotonicNanoseconds()
            if waitingSince == 0 { waitingSince = now }
            if now - waitingSince > sendTimeoutNanoseconds || givenUp.load(ordering: .relaxed) {
                throw .channelFull(receiver: receiver, waitedMilliseconds: Int((now - waitingSince) / 1_000_000))
            }
            backoff.pause()
        }
    }

    /// Writes `message` into the mapped ring at `reservation`: header, payload, then the trailer
    /// with release ordering, so that a receiver that sees the trailer sees the whole message.
    @inlinable @inline(__always)
    func writeMapped(_ message: UnsafeRawBufferPointer, at reservation: Reservation) {
        let ring = UnsafeMutableRawPointer(bitPattern: mappedRing)!
        if reservation.wrap >= 0 {
            (ring + (reservation.wrap &+ ChannelFormat.headerOffset)).assumingMemoryBound(to: Atomic<UInt64>.self).pointee
                .store(ChannelFormat.wrap(sender: sender), ordering: .releasing)
        }
        let offset = Int(truncatingIfNeeded: reservation.start & UInt64(truncatingIfNeeded: ringCapacity &- 1))
        let count = message.count
        (ring + (offset &+ ChannelFormat.headerOffset)).assumingMemoryBound(to: Atomic<UInt64>.self).pointee
            .store(ChannelFormat.header(length: count, sender: sender), ordering: .relaxed)
        if let source = message.baseAddress { (ring + (offset &+ 64)).copyMemory(from: source, byteCount: count) }
        (ring + (offset &+ ChannelFormat.trailerOffset(count))).assumingMemoryBound(to: Atomic<UInt64>.self).pointee
            .store(ChannelFormat.trailer(position: reservation.start, epoch: epoch.pointee.load(ordering: .relaxed)), ordering: .releasing)
    }

    /// The unmapped path (the caller holds the staging lock): the message is built in the staging
    /// buffer, from its header to its trailer (the bytes between payload and trailer zero), and
    /// written with one one-sided write, whose last word, the trailer, lands last; after a
    /// one-sided write of the wrap word if there is one. The write starts after the previous
    /// message's trailer and ends before the next message's header.
    private func sendStaged(_ message: UnsafeRawBufferPointer, staging: UInt, wait: Bool, limit: Int) throws(TransportError) -> Bool {
        let count = message.count
        let total = ChannelFormat.stride(count)  // header .. trailer
        detachIfReceiverRestarted { receiverRestarted }
        guard let reservation = try reserve(length: message.count, wait: wait, limit: limit) else { return false }
        // Under the staging lock no other thread reserves on this channel, so a write that fails
        // gives back what it did not write: the receiver never waits at a hole.
        if reservation.wrap >= 0 {
            var marker = ChannelFormat.wrap(sender: sender)
            do {
                try withUnsafeBytes(of: &marker) { (buffer) throws(TransportError) in
                    try transport.write(to: receiver, ringAddress.advanced(by: reservation.wrap + ChannelFormat.headerOffset), from: buffer)
                }
            } catch {
                tail.pointee.store(reservation.previous, ordering: .relaxed)
                throw error
            }
        }
        let frame = UnsafeMutableRawPointer(bitPattern: staging)!
        frame.storeBytes(of: ChannelFormat.header(length: count, sender: sender), as: UInt64.self)
        if let source = message.baseAddress { (frame + 8).copyMemory(from: source, byteCount: count) }
        memset(frame + 8 + count, 0, total - 16 - count)
        (frame + total - 8).storeBytes(of: ChannelFormat.trailer(position: reservation.start, epoch: epoch.pointee.load(ordering: .relaxed)), as: UInt64.self)
        let position = Int(reservation.start & UInt64(ringCapacity - 1)) + ChannelFormat.headerOffset
        do {
            try transport.write(to: receiver, ringAddress.advanced(by: position), from: UnsafeRawBufferPointer(start: frame, count: total))
        } catch {
            tail.pointee.store(reservation.start, ordering: .relaxed)
            throw error
        }
        // Had the transport found the receiver restarted during the write (it connected to the
        // new process), the message may have landed in the new ring as foreign bytes: lost, as any
        // message sent into a reopened ring, and cleared by the attach the next send or check
        // makes when it sees the restart.
        return true
    }
}
