import GranaryMemory
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The wire format of a message ring, shared by senders and receivers.
///
/// A node's mailbox region holds one ring per possible sender. Ring of sender `s`:
/// ```
/// mailbox + 4096 + s * (64 + capacity)   control line: word 0 = bytes consumed (written by the receiver)
///            ... + 64                     ring: `capacity` bytes (a power of two)
/// ```
/// A message at ring position `p` (8-byte aligned):
/// ```
/// p                 header   length (bits 0..31) | sender (bits 32..47) | magic "GM" (bits 48..63)
/// p + 8             payload  `length` bytes, zero-padded to a multiple of 8
/// p + 8 + padded    trailer  a non-zero word derived from the message's sequence number
/// ```
/// A message never straddles the end of the ring: the sender writes a wrap word
/// (magic "GW") and continues at 0. The receiver accepts a message when its trailer holds the
/// expected value (the transport makes a write's last word visible last), hands it over, zeroes its
/// bytes and publishes how far it has consumed; the sender never writes past that point.
public enum ChannelFormat {
    public static let controlBytes = 64
    public static let messageMagic: UInt64 = 0x474D
    public static let wrapMagic: UInt64 = 0x4757
    public static let defaultRingCapacity = 64 << 10

    /// The largest message a ring of `capacity` bytes carries.
    @inlinable public static func maximumMessage(ringCapacity capacity: Int) -> Int { capacity / 4 - 16 }

    @inlinable static func padded(_ length: Int) -> Int { (length + 7) & ~7 }

    @inlinable static func header(length: Int, sender: NodeID) -> UInt64 {
        UInt64(length) | UInt64(sender.rawValue) << 32 | messageMagic << 48
    }

    @inlinable static func wrap(sender: NodeID) -> UInt64 { UInt64(sender.rawValue) << 32 | wrapMagic << 48 }

    @inlinable static func trailer(sequence: UInt64) -> UInt64 { (sequence &* 0x9E37_79B9_7F4A_7C15) | 1 }

    /// Offset of sender `s`'s control line inside the mailbox region.
    @inlinable static func controlOffset(sender: NodeID, ringCapacity: Int) -> Int {
        RegionFormat.headerBytes + sender.index * (controlBytes + ringCapacity)
    }

    /// The size of a mailbox region with rings of `ringCapacity` bytes.
    public static func mailboxSize(ringCapacity: Int) -> Int {
        var size = RegionFormat.minimumSize
        let needed = RegionFormat.headerBytes + NodeID.limit * (controlBytes + ringCapacity)
        while size < needed { size <<= 1 }
        return size
    }
}

/// A node's mailbox: the receive side of all of its message channels, in a region of its own that
/// senders write with one-sided writes.
///
/// `@unchecked Sendable`: every stored property is immutable after `init`; `receiverTable` holds
/// unretained references to the receivers that `receivers` keeps alive.
public final class Mailbox: @unchecked Sendable {
    public let node: NodeID
    public let region: Region
    public let ringCapacity: Int
    private let receivers: [ChannelReceiver]

    /// Creates the mailbox of `node` in `directory`, or opens and clears the one a previous run of the
    /// node left (messages are not kept across restarts; the regions' data is).
    public init(node: NodeID, directory: RegionDirectory, cluster: ClusterID,
                ringCapacity: Int = ChannelFormat.defaultRingCapacity) throws(RegionError) {
        precondition(ringCapacity >= 4096 && ringCapacity & (ringCapacity - 1) == 0, "ring capacity must be a power of two >= 4096")
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
            memset(region.base + RegionFormat.headerBytes, 0, region.size - RegionFormat.headerBytes)
        }
        self.node = node
        self.region = region
        self.ringCapacity = ringCapacity
        let receivers = (0..<NodeID.limit).map { index in
            ChannelReceiver(mailbox: region, receiver: node, sender: NodeID(index), ringCapacity: ringCapacity)
        }
        self.receivers = receivers
        self.receiverTable = .allocate(capacity: NodeID.limit)
        self.receiverTable.initialize(from: receivers.map { Unmanaged.passUnretained($0) }, count: NodeID.limit)
    }

    /// The receive side of the channel from `sender`.
    public func receiver(from sender: NodeID) -> ChannelReceiver { receivers[sender.index] }

    /// Polls the channel from `sender` (see ``ChannelReceiver/poll(limit:_:)``) without reference
    /// counting: for pollers that look at every ring many times a second.
    @inline(__always)
    public func poll(from sender: NodeID, limit: Int = .max, _ handler: (UnsafeRawBufferPointer) throws -> Void) throws -> Int {
        try receiverTable[sender.index]._withUnsafeGuaranteedRef { receiver in try receiver.poll(limit: limit, handler) }
    }

    /// ``receivers`` again, unretained (the array keeps them alive as long as the mailbox).
    private let receiverTable: UnsafeMutablePointer<Unmanaged<ChannelReceiver>>

    deinit { receiverTable.deallocate() }

    /// Whether the ring of `sender` may hold a message now: its word at the receiver's published
    /// head is not zero. No lock and no reference counting, so a poller can skip empty rings
    /// cheaply; false while a message is only partly written is fine, the next look sees it.
    @inline(__always)
    public func mayHaveMessage(from sender: NodeID) -> Bool {
        let control = region.base + ChannelFormat.controlOffset(sender: sender, ringCapacity: ringCapacity)
        let head = control.assumingMemoryBound(to: Atomic<UInt64>.self).pointee.load(ordering: .relaxed)
        let position = Int(head & UInt64(ringCapacity - 1))
        return (control + ChannelFormat.controlBytes + position)
            .assumingMemoryBound(to: Atomic<UInt64>.self).pointee.load(ordering: .relaxed) != 0
    }
}

/// The receive side of the channel from one sender: a ring in the local mailbox.
///
/// One poller at a time: ``poll(limit:_:)`` holds the channel's lock while it hands messages over.
public final class ChannelReceiver: Sendable {
    public let receiver: NodeID
    public let sender: NodeID
    public let ringCapacity: Int
    private let region: Region
    private let controlOffset: Int

    private struct State {
        var head: UInt64 = 0
        var sequence: UInt64 = 0
    }
    private let state = Mutex(State())

    init(mailbox: Region, receiver: NodeID, sender: NodeID, ringCapacity: Int) {
        self.region = mailbox
        self.receiver = receiver
        self.sender = sender
        self.ringCapacity = ringCapacity
        self.controlOffset = ChannelFormat.controlOffset(sender: sender, ringCapacity: ringCapacity)
    }

    @inline(__always) private func word(_ offset: Int) -> UnsafeMutablePointer<Atomic<UInt64>> {
        (region.base + offset).assumingMemoryBound(to: Atomic<UInt64>.self)
    }

    /// Whether no message (not even a partly written one) waits at the head of the ring.
    public var isEmpty: Bool {
        state.withLock { state in
            let position = Int(state.head & UInt64(ringCapacity - 1))
            return word(controlOffset + ChannelFormat.controlBytes + position).pointee.load(ordering: .acquiring) == 0
        }
    }

    /// Hands every complete message (up to `limit`) to `handler`, in the order sent, and frees
    /// their space. The buffer is valid only during the call.
    ///
    /// - Returns: the number of messages handled.
    /// - Throws: ``TransportError/corruptChannel(sender:receiver:reason:)`` if the ring holds bytes
    ///   that are not a message from this sender (nothing is consumed past them), or what
    ///   `handler` throws (the message that threw is consumed).
    @discardableResult
    public func poll(limit: Int = .max, _ handler: (UnsafeRawBufferPointer) throws -> Void) throws -> Int {
        try state.withLock { state throws -> Int in
            let ring = controlOffset + ChannelFormat.controlBytes
            let capacity = UInt64(ringCapacity)
            var handled = 0
            while handled < limit {
                let position = Int(state.head & (capacity - 1))
                let header = word(ring + position).pointee.load(ordering: .acquiring)
                if header == 0 { break }
                let magic = header >> 48
                let from = NodeID(rawValue: UInt16(truncatingIfNeeded: header >> 32))
                guard from == sender else {
                    throw TransportError.corruptChannel(sender: sender, receiver: receiver,
                                                        reason: "a message at ring offset \(position) claims to come from node \(from)")
                }
                if magic == ChannelFormat.wrapMagic {
                    word(ring + position).pointee.store(0, ordering: .relaxed)
                    state.head += capacity - UInt64(position)
                    word(controlOffset).pointee.store(state.head, ordering: .releasing)
                    continue
                }
                let length = Int(header & 0xFFFF_FFFF)
                guard magic == ChannelFormat.messageMagic,
                      length <= ChannelFormat.maximumMessage(ringCapacity: ringCapacity) else {
                    throw TransportError.corruptChannel(sender: sender, receiver: receiver,
                                                        reason: "bad header 0x\(String(header, radix: 16)) at ring offset \(position)")
                }
                let total = 16 + ChannelFormat.padded(length)
                let trailer = word(ring + position + total - 8).pointee.load(ordering: .acquiring)
                if trailer == 0 { break }  // the write has not fully landed yet
                guard trailer == ChannelFormat.trailer(sequence: state.sequence) else {
                    throw TransportError.corruptChannel(sender: sender, receiver: receiver,
                                                        reason: "message \(state.sequence) has a foreign trailer at ring offset \(position)")
                }
                defer {
                    memset(region.base + ring + position, 0, total)
                    state.head += UInt64(total)
                    state.sequence += 1
                    // Release: the zeroed bytes are visible before the sender may reuse them.
                    word(controlOffset).pointee.store(state.head, ordering: .releasing)
                }
                handled += 1
                try handler(UnsafeRawBufferPointer(start: region.base + ring + position + 8, count: length))
            }
            return handled
        }
    }
}

/// The send side of a channel to one receiver: one-sided writes into the receiver's ring.
///
/// Senders on several threads share it; sends are serialised by its lock.
public final class ChannelSender: Sendable {
    public let sender: NodeID
    public let receiver: NodeID
    public let ringCapacity: Int
    /// The largest message this channel carries.
    public let maximumMessage: Int
    /// How long ``send(_:)`` waits for a receiver that does not free ring space.
    public let sendTimeoutNanoseconds: UInt64
    private let transport: any Transport
    private let controlAddress: GlobalAddress
    private let ringAddress: GlobalAddress
    /// Where the transport maps the receiver's control line and ring into this process (shared
    /// memory), as bit patterns; 0 where it does not (verbs). With a mapping a message is written
    /// straight into the ring, with the same ordering as a one-sided write (trailer last).
    private let mappedControl: UInt
    private let mappedRing: UInt

    private struct State: ~Copyable {
        var tail: UInt64 = 0
        var head: UInt64 = 0
        var sequence: UInt64 = 0
        let staging: UnsafeMutableRawPointer
        init(bytes: Int) { staging = .allocate(byteCount: bytes, alignment: 64) }
        deinit { staging.deallocate() }
    }
    private let state: Mutex<State>

    /// Opens the channel from `transport.localNode` to `receiver`, reading the receiver's ring
    /// geometry from its mailbox header (one read).
    public init(transport: any Transport, to receiver: NodeID, sendTimeout: Duration = .seconds(10)) throws(TransportError) {
        let mailbox = RegionID.mailbox(of: receiver)
        var geometry: (UInt32, UInt32) = (0, 0)
        try withUnsafeMutableBytes(of: &geometry) { (buffer) throws(TransportError) in
            try transport.read(from: receiver, GlobalAddress(region: mailbox, offset: 16), into: buffer)
        }
        guard geometry.0 == mailbox.rawValue, geometry.1 >= 12, geometry.1 < 32 else {
            throw .corruptChannel(sender: transport.localNode, receiver: receiver,
                                  reason: "node \(receiver)'s mailbox header is not a mailbox (region 0x\(String(geometry.0, radix: 16)), ring 2^\(geometry.1))")
        }
        self.transport = transport
        self.sender = transport.localNode
        self.receiver = receiver
        self.ringCapacity = 1 << Int(geometry.1)
        self.maximumMessage = ChannelFormat.maximumMessage(ringCapacity: ringCapacity)
        let control = ChannelFormat.controlOffset(sender: transport.localNode, ringCapacity: ringCapacity)
        self.controlAddress = GlobalAddress(region: mailbox, offset: UInt32(control))
        self.ringAddress = GlobalAddress(region: mailbox, offset: UInt32(control + ChannelFormat.controlBytes))
        let (seconds, attoseconds) = sendTimeout.components
        self.sendTimeoutNanoseconds = UInt64(seconds) * 1_000_000_000 + UInt64(attoseconds / 1_000_000_000)
        self.state = Mutex(State(bytes: maximumMessage + 16))
        let mappedControlLine = transport.mappedAddress(of: controlAddress, on: receiver, length: ChannelFormat.controlBytes)
        let mappedRingStart = transport.mappedAddress(of: ringAddress, on: receiver, length: ringCapacity)
        if let mappedControlLine, let mappedRingStart {
            mappedControl = UInt(bitPattern: mappedControlLine)
            mappedRing = UInt(bitPattern: mappedRingStart)
        } else {
            mappedControl = 0
            mappedRing = 0
        }
    }

    @inline(__always) private func mappedWord(_ base: UInt, _ offset: Int) -> UnsafeMutablePointer<Atomic<UInt64>> {
        (UnsafeMutableRawPointer(bitPattern: base)! + offset).assumingMemoryBound(to: Atomic<UInt64>.self)
    }

    /// The receiver's consumed counter (one one-sided read).
    private func readHead() throws(TransportError) -> UInt64 {
        if mappedControl != 0 { return mappedWord(mappedControl, 0).pointee.load(ordering: .acquiring) }
        var head: UInt64 = 0
        try withUnsafeMutableBytes(of: &head) { (buffer) throws(TransportError) in
            try transport.read(from: receiver, controlAddress, into: buffer)
        }
        return head
    }

    /// Sends `message` (one one-sided write, plus one for a wrap and one read of the receiver's
    /// progress when the ring looks full). Waits, backing off, while the receiver's ring is full.
    ///
    /// - Throws: ``TransportError/messageTooLarge(bytes:maximum:)``,
    ///   ``TransportError/channelFull(receiver:waitedMilliseconds:)`` after the send timeout, or the
    ///   transport's error.
    public func send(_ message: UnsafeRawBufferPointer) throws(TransportError) {
        guard message.count <= maximumMessage else {
            throw .messageTooLarge(bytes: message.count, maximum: maximumMessage)
        }
        // The caller's buffer is only read inside the lock, during this call: pass it as an address.
        let start = UInt(bitPattern: message.baseAddress)
        let count = message.count
        let result: TransportError? = state.withLock { state -> TransportError? in
            do throws(TransportError) {
                try send(UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: start), count: count), state: &state)
                return nil
            } catch {
                return error
            }
        }
        if let result { throw result }
    }

    /// Sends `message` only if that needs no waiting: the channel is not in use by another thread
    /// and the ring has room (after one read of the receiver's progress). A poller answers with
    /// this, so that it never blocks on a peer that may be blocked on it.
    ///
    /// - Returns: false if nothing was sent.
    public func trySend(_ message: UnsafeRawBufferPointer) throws(TransportError) -> Bool {
        guard message.count <= maximumMessage else {
            throw .messageTooLarge(bytes: message.count, maximum: maximumMessage)
        }
        let start = UInt(bitPattern: message.baseAddress)
        let count = message.count
        let result: Result<Bool, TransportError>? = state.withLockIfAvailable { state -> Result<Bool, TransportError> in
            do throws(TransportError) {
                return .success(try send(UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: start), count: count),
                                         state: &state, wait: false))
            } catch {
                return .failure(error)
            }
        }
        guard let result else { return false }
        return try result.get()
    }

    @discardableResult
    private func send(_ message: UnsafeRawBufferPointer, state: inout State, wait: Bool = true) throws(TransportError) -> Bool {
        let capacity = UInt64(ringCapacity)
        let total = 16 + ChannelFormat.padded(message.count)
        var position = Int(state.tail & (capacity - 1))
        let wraps = position + total > ringCapacity
        let needed = UInt64(total + (wraps ? ringCapacity - position : 0))
        if capacity - (state.tail - state.head) < needed {
            var backoff = Backoff(maximumSleepMicroseconds: 200)
            let start = monotonicNanoseconds()
            while true {
                state.head = try readHead()
                if capacity - (state.tail - state.head) >= needed { break }
                if !wait { return false }
                let waited = monotonicNanoseconds() - start
                if waited > sendTimeoutNanoseconds {
                    throw .channelFull(receiver: receiver, waitedMilliseconds: Int(waited / 1_000_000))
                }
                backoff.pause()
            }
        }
        if wraps {
            var marker = ChannelFormat.wrap(sender: sender)
            if mappedRing != 0 {
                mappedWord(mappedRing, position).pointee.store(marker, ordering: .releasing)
            } else {
                try withUnsafeBytes(of: &marker) { (buffer) throws(TransportError) in
                    try transport.write(to: receiver, ringAddress.advanced(by: position), from: buffer)
                }
            }
            state.tail += capacity - UInt64(position)
            position = 0
        }
        // The message: straight into the ring where the transport maps it, else into the staging
        // buffer for one one-sided write. Header, payload, padding, then the trailer with release
        // ordering, so that a receiver that sees the trailer sees the whole message.
        let frame = mappedRing != 0 ? UnsafeMutableRawPointer(bitPattern: mappedRing)! + position : state.staging
        frame.assumingMemoryBound(to: Atomic<UInt64>.self).pointee
            .store(ChannelFormat.header(length: message.count, sender: sender), ordering: .relaxed)
        if let source = message.baseAddress { (frame + 8).copyMemory(from: source, byteCount: message.count) }
        let padding = ChannelFormat.padded(message.count) - message.count
        if padding > 0 { memset(frame + 8 + message.count, 0, padding) }
        (frame + total - 8).assumingMemoryBound(to: Atomic<UInt64>.self).pointee
            .store(ChannelFormat.trailer(sequence: state.sequence), ordering: .releasing)
        if mappedRing == 0 {
            try transport.write(to: receiver, ringAddress.advanced(by: position), from: UnsafeRawBufferPointer(start: frame, count: total))
        }
        state.tail += UInt64(total)
        state.sequence += 1
        return true
    }
}
