import Foundation
import GranaryMemory
import GranaryTestSupport
@testable import GranaryTransport
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Node 1 sends to node 0 over shared memory; either side can be "restarted" (a new sender
/// connection for node 1, a fresh mailbox object over node 0's cleared file).
private struct Link {
    let tmp = TemporaryDirectory("granary-epochs")
    let cluster = ClusterID.random()
    let receiverDirectory: RegionDirectory
    let senderTransport: any Transport
    var mailbox: Mailbox
    static let ringCapacity = 4096

    /// - Parameter transport: given the sender's shared-memory transport, the transport node 1
    ///   sends through (by default that one).
    init(transport: (SharedMemoryTransport) -> any Transport = { $0 }) throws {
        receiverDirectory = try RegionDirectory(tmp.path.appending("n0"))
        mailbox = try Mailbox(node: NodeID(0), directory: receiverDirectory, cluster: cluster, ringCapacity: Self.ringCapacity)
        let senderDirectory = try RegionDirectory(tmp.path.appending("n1"))
        let sharedMemory = SharedMemoryTransport(localNode: NodeID(1), cluster: cluster, directory: senderDirectory)
        sharedMemory.addPeer(NodeID(0), endpoint: receiverDirectory)
        senderTransport = transport(sharedMemory)
    }

    /// A new connection from node 1, as after node 1 restarted.
    func connect() throws -> ChannelSender { try ChannelSender(transport: senderTransport, to: NodeID(0)) }

    /// Node 0 restarted: its mailbox file opened again, cleared.
    mutating func restartReceiver() throws {
        mailbox = try Mailbox(node: NodeID(0), directory: receiverDirectory, cluster: cluster, ringCapacity: Self.ringCapacity)
    }

    /// Polls node 1's log ring once; returns the messages (as their first byte) and the error, if any.
    func poll(keeping keep: Set<UInt8> = [], limit: Int = .max) -> (messages: [UInt8], error: (any Error)?) {
        var messages: [UInt8] = []
        do {
            try mailbox.withPoller { poller in
                _ = try poller.poll(from: NodeID(1), limit: limit, keeping: { bytes, _ in
                    messages.append(bytes[0])
                    return keep.contains(bytes[0])
                })
            }
            return (messages, nil)
        } catch {
            return (messages, error)
        }
    }

    /// The messages node 0's log ring keeps, as a recovery scan of the file finds them.
    func kept() -> [UInt8] {
        var found: [UInt8] = []
        Mailbox.keptMessages(in: mailbox.region, ringCapacity: Self.ringCapacity, from: NodeID(1)) { _, bytes in found.append(bytes[0]) }
        return found
    }

    /// A link whose node 1 sends through a ``VerbsLikeTransport``, and that transport.
    static func verbsLike() throws -> (Link, VerbsLikeTransport) {
        var wrapped: VerbsLikeTransport?
        let link = try Link { let transport = VerbsLikeTransport($0); wrapped = transport; return transport }
        return (link, try #require(wrapped))
    }

    func remove() { tmp.remove() }
}

/// Node 1's shared-memory transport seen as the verbs transport is: no mapped ring (each message
/// goes through the channel's staging buffer and one one-sided write), a restart generation that
/// the test moves (``Transport/peerGeneration(of:)``: verbs learns of a restarted peer from its
/// connection request), and a write that can be held before it copies anything.
private final class VerbsLikeTransport: Transport {
    let base: SharedMemoryTransport
    let generation = Atomic<UInt64>(0)
    let holdNextWrite = Atomic<Bool>(false)
    let writeHeld = DispatchSemaphore(value: 0)
    let releaseWrite = DispatchSemaphore(value: 0)

    init(_ base: SharedMemoryTransport) { self.base = base }

    var localNode: NodeID { base.localNode }
    func register(_ region: Region) throws(TransportError) { try base.register(region) }
    func localPointer(_ region: RegionID) throws(TransportError) -> UnsafeMutableRawPointer { try base.localPointer(region) }
    func read(from node: NodeID, _ address: GlobalAddress, into buffer: UnsafeMutableRawBufferPointer) throws(TransportError) {
        try base.read(from: node, address, into: buffer)
    }
    func write(to node: NodeID, _ address: GlobalAddress, from buffer: UnsafeRawBufferPointer) throws(TransportError) {
        if holdNextWrite.exchange(false, ordering: .acquiringAndReleasing) {
            writeHeld.signal()
            releaseWrite.wait()
        }
        try base.write(to: node, address, from: buffer)
    }
    func compareAndSwap(at node: NodeID, _ address: GlobalAddress, expected: UInt64, desired: UInt64) throws(TransportError) -> UInt64 {
        try base.compareAndSwap(at: node, address, expected: expected, desired: desired)
    }
    func fetchAndAdd(at node: NodeID, _ address: GlobalAddress, _ delta: UInt64) throws(TransportError) -> UInt64 {
        try base.fetchAndAdd(at: node, address, delta)
    }
    func execute(_ batch: inout OperationBatch) throws(TransportError) { try base.execute(&batch) }
    func peerGeneration(of node: NodeID) -> UInt64 { generation.load(ordering: .acquiring) }
}

private func send(_ value: UInt8, on sender: ChannelSender) throws {
    let message = [UInt8](repeating: value, count: 40)
    try message.withUnsafeBytes { try sender.send($0) }
}

@Suite("Channel epochs: restarts and corrupt messages resynchronise a channel")
struct ChannelEpochTests {
    @Test("a sender restarted with the same node id reattaches, after the messages its receiver keeps")
    func senderRestart() throws {
        let link = try Link()
        defer { link.remove() }
        let first = try link.connect()
        for value: UInt8 in 1...3 { try send(value, on: first) }
        let before = link.poll(keeping: [1])
        #expect(before.messages == [1, 2, 3] && before.error == nil, "\(before)")
        #expect(link.kept() == [1])

        // Node 1 restarts: its new connection finds the ring attached to the old one and asks
        // node 0 to reopen it; node 0 does at its next poll.
        let second = try link.connect()
        #expect(!second.isAttached, "the ring was still attached to the first connection")
        let reopening = link.poll()
        #expect(reopening.messages.isEmpty && reopening.error == nil, "\(reopening)")
        for value: UInt8 in 4...6 { try send(value, on: second) }
        #expect(second.isAttached)
        let after = link.poll()
        #expect(after.messages == [4, 5, 6] && after.error == nil, "the restarted sender's messages: \(after)")
        // The kept message survived the reopening, restamped: a recovery scan still finds it.
        #expect(link.kept() == [1], "kept after the reopening: \(link.kept())")
    }

    /// Over shared memory the sender writes straight into the receiver's mapped ring; a receiver
    /// process that restarts opens the same mailbox file and clears its rings. The first message
    /// after the restart, sent before any connection check, must reach the new process: the
    /// mailbox's incarnation word tells the sender to attach again first (without it the message
    /// lands at the former stream's position, unseen, and its request waits for a timeout).
    @Test("over shared memory, the first message after the receiver's restart reaches the new process")
    func mappedReceiverRestart() throws {
        var link = try Link()
        defer { link.remove() }
        let sender = try link.connect()
        #expect(sender.mappedRing != 0, "the sender writes into the mapped ring")
        try send(1, on: sender)
        try send(2, on: sender)
        #expect(link.poll().messages == [1, 2])

        try link.restartReceiver()
        try send(3, on: sender)
        let after = link.poll()
        #expect(after.messages == [3] && after.error == nil,
                "the first message after the receiver's restart: \(after) (stream position \(sender.sendState))")
        #expect(try sender.checkConnection(wait: false), "the sender is not attached to the new ring")
        for value: UInt8 in 4...5 { try send(value, on: sender) }
        let later = link.poll()
        #expect(later.messages == [4, 5] && later.error == nil, "after the receiver's restart: \(later)")
    }

    /// Over verbs a restarted receiver connects to the sender's transport before it can send
    /// anything, so the transport knows of the restart before the sender answers the new
    /// process; answering from the former stream's position would write where the new process
    /// never looks (seen over two soft-RoCE hosts: a client started again got no answer to its
    /// first request, and later refused its channel for a foreign trailer).
    @Test("a receiver the transport found restarted is reattached before the next send, which is not lost")
    func receiverRestartSeenByTransport() throws {
        var (link, transport) = try Link.verbsLike()
        defer { link.remove() }
        let sender = try link.connect()
        #expect(sender.mappedRing == 0, "the sender writes through its staging buffer, as over verbs")
        try send(1, on: sender)
        try send(2, on: sender)
        #expect(link.poll().messages == [1, 2])

        try link.restartReceiver()
        transport.generation.add(1, ordering: .releasing)
        try send(3, on: sender)
        let after = link.poll()
        #expect(after.messages == [3] && after.error == nil,
                "the first message after the receiver's restart, with the transport knowing of it: \(after) (stream position \(sender.sendState))")
    }

    /// A connection check (the engine's poller makes one every 10 ms) that attaches again while
    /// another thread's write of the former stream is under way: the write lands after the
    /// attach cleared the ring, and stays in the new stream as a message of it (same epoch, a
    /// fresh mailbox's 0) or as foreign bytes that make the receiver refuse the ring.
    @Test("a connection check never attaches while a write of the former stream is under way")
    func checkDuringWrite() throws {
        var (link, transport) = try Link.verbsLike()
        defer { link.remove() }
        let sender = try link.connect()
        try send(1, on: sender)
        try send(2, on: sender)
        #expect(link.poll().messages == [1, 2])

        // Message 3's write holds before it copies; meanwhile the receiver restarts (unnoticed
        // by the transport, as a receiver's own reopening is) and the poller checks the channel.
        transport.holdNextWrite.store(true, ordering: .releasing)
        let written = DispatchSemaphore(value: 0)
        let writeError = Mutex<(any Error)?>(nil)
        Thread.detachNewThread {
            do { try send(3, on: sender) } catch { writeError.withLock { $0 = error } }
            written.signal()
        }
        transport.writeHeld.wait()
        try link.restartReceiver()
        _ = try sender.checkConnection(wait: false)
        transport.releaseWrite.signal()
        written.wait()
        #expect(writeError.withLock { $0 } == nil)
        // The next check attaches (the write is over).
        #expect(try sender.checkConnection(wait: false), "the sender did not reattach to the restarted receiver")
        // Two messages: the new stream's third would overwrite message 3's frame (ring offset 128).
        for value: UInt8 in 4...5 { try send(value, on: sender) }
        var received: [UInt8] = []
        var failure: (any Error)?
        for _ in 0..<3 {
            let seen = link.poll()
            received += seen.messages
            if let error = seen.error { failure = error }
        }
        #expect(received == [4, 5] && failure == nil,
                "after the restart: \(received), refused: \(failure.map { "\($0)" } ?? "nothing") (message 3 belongs to the former stream)")
    }

    /// rxe copies a WRITE with the kernel's `memcpy`, which under emulation moves a byte at a
    /// time: a poller can see a header whose length landed but not its sender and magic, or a
    /// trailer half written. (Seen in the two-host soft-RoCE stage: "a message at ring offset
    /// 10296 claims to come from node n0", the ring refused, the reply in it lost.)
    @Test("a header or trailer seen part-written is waited for, not refused; one that stays so past the grace is refused")
    func partWrittenWords() throws {
        let link = try Link()
        defer { link.remove() }
        let sender = try link.connect()
        try send(1, on: sender)
        #expect(link.poll().messages == [1])
        try send(2, on: sender)
        // Message 2's frame starts at ring offset 64 (message 1 took one frame).
        let ring = link.mailbox.region.base + ChannelFormat.controlOffset(sender: NodeID(1), ringCapacity: Link.ringCapacity) + ChannelFormat.controlBytes
        let headerWord = ring + 64 + ChannelFormat.headerOffset
        let header = headerWord.load(as: UInt64.self)
        let length = Int(header & 0xFFFF_FFFF)
        let trailerWord = ring + 64 + ChannelFormat.trailerOffset(length)
        let trailer = trailerWord.load(as: UInt64.self)
        // The length landed, not the sender and magic; then all but the magic's last byte.
        for partial in [header & 0xFFFF_FFFF, header & 0x00FF_FFFF_FFFF_FFFF] {
            headerWord.storeBytes(of: partial, as: UInt64.self)
            let seen = link.poll()
            #expect(seen.messages.isEmpty && seen.error == nil, "header 0x\(String(partial, radix: 16)): \(seen)")
        }
        headerWord.storeBytes(of: header, as: UInt64.self)
        // The trailer's low half landed.
        trailerWord.storeBytes(of: trailer & 0xFFFF_FFFF, as: UInt64.self)
        let halfTrailer = link.poll()
        #expect(halfTrailer.messages.isEmpty && halfTrailer.error == nil, "\(halfTrailer)")
        trailerWord.storeBytes(of: trailer, as: UInt64.self)
        #expect(link.poll().messages == [2], "the message did not arrive once its words had landed")

        // Bytes that look half-written for longer than a write takes are refused.
        try send(3, on: sender)
        let third = ring + 128 + ChannelFormat.headerOffset
        third.storeBytes(of: third.load(as: UInt64.self) & 0xFFFF_FFFF, as: UInt64.self)
        #expect(link.poll().error == nil)
        usleep(UInt32(ChannelFormat.landingGraceNanoseconds / 1_000) + 20_000)
        let refused = link.poll()
        guard case .corruptChannel? = refused.error as? TransportError else {
            Issue.record("a header part-written past the grace was not refused: \(refused)")
            return
        }
    }

    @Test("a corrupt message is refused once; the sender reattaches and the channel carries on")
    func corruptMessage() throws {
        let link = try Link()
        defer { link.remove() }
        let sender = try link.connect()
        try send(1, on: sender)
        #expect(link.poll().messages == [1])
        // Foreign bytes where the next message's header goes (message 1 took one 64-byte frame,
        // so the next starts at ring offset 64, its header in that line's last word).
        let ring = link.mailbox.region.base + ChannelFormat.controlOffset(sender: NodeID(1), ringCapacity: Link.ringCapacity) + ChannelFormat.controlBytes
        (ring + 64 + 56).storeBytes(of: UInt64(8) | 7 << 32 | 0x474D << 48, as: UInt64.self)
        let refused = link.poll()
        #expect(refused.messages.isEmpty)
        #expect(refused.error as? TransportError == .corruptChannel(sender: NodeID(1), receiver: NodeID(0),
                                                                     reason: "a message at ring offset 120 claims to come from node n7"),
                "\(String(describing: refused.error))")
        // Refused once: the ring is not broken for ever.
        let again = link.poll()
        #expect(again.messages.isEmpty && again.error == nil, "\(again)")
        // The sender's next check (the engine's poller checks every 10 ms) reattaches it.
        #expect(try sender.checkConnection(wait: false))
        for value: UInt8 in 2...40 { try send(value, on: sender) }  // several laps of the 4 KiB ring
        var received: [UInt8] = []
        for _ in 0..<10 { received += link.poll().messages }
        #expect(received == Array(2...40), "after the refused message: \(received)")
    }

    /// A reopening zeroes the ring past the receiver's cursor. A poll cut short by its limit
    /// leaves messages there that reached the ring: they are the log too (a COMMIT-BACKUP whose
    /// coordinator reported the commit), so the reopening waits for the poll that takes them.
    @Test("a reopening request waits for the messages a poll left in the ring by its limit")
    func reopeningAfterLimitedPoll() throws {
        let link = try Link()
        defer { link.remove() }
        let first = try link.connect()
        for value: UInt8 in 1...3 { try send(value, on: first) }
        let second = try link.connect()
        #expect(!second.isAttached, "the ring was still attached to the first connection")
        let limited = link.poll(keeping: [1, 2, 3], limit: 1)
        #expect(limited.messages == [1] && limited.error == nil, "\(limited)")
        #expect(link.kept() == [1, 2, 3], "the log after a poll limited to one message, with a reopening requested: \(link.kept())")
        let rest = link.poll(keeping: [1, 2, 3])
        #expect(rest.messages == [2, 3] && rest.error == nil, "\(rest)")
        #expect(link.kept() == [1, 2, 3])
        // Reopened by that poll: the second connection attaches and sends.
        #expect(try second.checkConnection(wait: true))
        try send(4, on: second)
        #expect(link.poll(keeping: [1, 2, 3]).messages == [4])
    }

    @Test("a reopening interrupted by a crash leaves every kept message findable")
    func interruptedReopening() throws {
        let link = try Link()
        defer { link.remove() }
        let sender = try link.connect()
        for value: UInt8 in 1...4 { try send(value, on: sender) }
        #expect(link.poll(keeping: [1, 2, 3, 4]).messages == [1, 2, 3, 4])
        // A crash in the middle of a reopening: the new epoch is in the `reopening` word and
        // only the first two kept messages were restamped with it.
        let control = link.mailbox.region.base + ChannelFormat.controlOffset(sender: NodeID(1), ringCapacity: Link.ringCapacity)
        let epoch: UInt64 = 0x5EED
        control.storeBytes(of: epoch, toByteOffset: ChannelFormat.reopeningOffset, as: UInt64.self)
        let ring = control + ChannelFormat.controlBytes
        for index in 0..<2 {
            // A 40-byte message takes one 64-byte frame; its trailer is in the next line.
            let position = index * 64
            (ring + position + 64 + 48).storeBytes(of: ChannelFormat.trailer(position: UInt64(position), epoch: epoch), as: UInt64.self)
        }
        #expect(link.kept() == [1, 2, 3, 4], "kept messages found after the interrupted reopening: \(link.kept())")
        // Without the `reopening` word, the restamped ones would be lost to a scan.
        control.storeBytes(of: UInt64(0x1234), toByteOffset: ChannelFormat.reopeningOffset, as: UInt64.self)
        #expect(link.kept() == [3, 4], "a trailer of neither epoch is not a message: \(link.kept())")
    }
}

@Suite("Message channels: a log ring full of kept messages")
struct FullLogRingTests {
    /// A receiver that keeps every message lets the sender fill the ring to the last byte (the
    /// reserve is for messages that free log space). The cursor then stands a whole ring ahead of
    /// the consumed counter, on the oldest kept message's header: that is not a new message. (It
    /// was read as one, with a "foreign trailer", and the channel was dropped.)
    @Test("a ring filled to the last byte with kept messages is not read past its end")
    func fullRingOfKeptMessages() throws {
        let link = try Link()
        defer { link.remove() }
        let sender = try link.connect()
        // Four messages consumed at once: the kept ones then start at stream position 256; 59 of
        // them (64 bytes each) reach the ring's last line, where the 60th does not fit with its
        // trailer line and wraps; 4 more end exactly one ring later, on the first one's line.
        for value: UInt8 in 1...4 { try send(value, on: sender) }
        #expect(link.poll().messages == [1, 2, 3, 4])
        let message = [UInt8](repeating: 0, count: 40)
        for value in 0..<63 {
            var bytes = message
            bytes[0] = UInt8(10 + value)
            try bytes.withUnsafeBytes { try sender.send($0, usingReserve: true) }
        }
        let all = Set((0..<63).map { UInt8(10 + $0) })
        let first = link.poll(keeping: all)
        #expect(first.messages == (0..<63).map { UInt8(10 + $0) }, "\(first.messages)")
        #expect(first.error == nil, "a full ring was read past its end: \(String(describing: first.error))")
        let again = link.poll(keeping: all)
        #expect(again.messages.isEmpty && again.error == nil, "\(again)")
        #expect(link.kept().count == 63)
        // The ring is full: a send that needs no waiting finds no room, and nothing is overwritten.
        #expect(try !message.withUnsafeBytes { try sender.trySend($0, usingReserve: true) })
        #expect(link.kept().count == 63)
    }
}

/// Copies of node 0's mailbox taken at each moment between the zeroing of frames and the move of
/// the consumed counter over them (debug builds' crash points): what a kill of the receiving
/// process at that moment leaves in its file. Each copy is scanned as restart recovery scans it.
private final class CrashCopies: Sendable {
    let copies = Mutex<[[UInt8]]>([])

    /// Runs `action` with the crash point armed for `link`'s mailbox; returns the messages (first
    /// bytes) a recovery scan finds in each copy, in order.
    static func scans(_ link: Link, during action: () throws -> Void) throws -> [[UInt8]] {
        let taken = CrashCopies()
        let base = UInt(bitPattern: link.mailbox.region.base)
        let size = link.mailbox.region.size
        setReceiverCrashPoint { at in
            guard UInt(bitPattern: at) == base else { return }
            let bytes = Array(UnsafeRawBufferPointer(start: at, count: size))
            taken.copies.withLock { $0.append(bytes) }
        }
        defer { setReceiverCrashPoint(nil) }
        try action()
        let scratch = try Mailbox(node: NodeID(0), directory: RegionDirectory(link.tmp.path.appending("copy-\(UInt32.random(in: 0 ... .max))")),
                                  cluster: link.cluster, ringCapacity: Link.ringCapacity)
        return taken.copies.withLock { copies in
            copies.map { copy in
                copy.withUnsafeBytes { _ = memcpy(scratch.region.base, $0.baseAddress!, size) }
                var found: [UInt8] = []
                Mailbox.keptMessages(in: scratch.region, ringCapacity: Link.ringCapacity, from: NodeID(1)) { _, bytes in found.append(bytes[0]) }
                return found
            }
        }
    }
}

/// A kill of the receiving process can land between any two of its stores. The receiver zeroes
/// the frames of messages it is done with before it moves the consumed counter over them; killed
/// in between, its counter points at zeroed bytes. A scan of the log must still find every record
/// after them: the kept LOCKs (their locks are held), and the records sent but not yet polled (a
/// COMMIT-BACKUP whose coordinator reported the commit). Found by the crash-restart test: objects
/// left locked after restart recovery, backups behind their primaries.
@Suite("Message channels: a receiver killed while it frees log space", .serialized)
struct LogScanAfterKillTests {
    @Test("killed while moving the consumed counter over released records: the kept ones after them are found")
    func killedWhileAdvancing() throws {
        let link = try Link()
        defer { link.remove() }
        let sender = try link.connect()
        for value: UInt8 in 1...4 { try send(value, on: sender) }
        var positions: [UInt8: UInt64] = [:]
        try link.mailbox.withPoller { poller in
            _ = try poller.poll(from: NodeID(1), keeping: { bytes, position in
                positions[bytes[0]] = position
                return true
            })
        }
        #expect(link.kept() == [1, 2, 3, 4])
        let scans = try CrashCopies.scans(link) {
            link.mailbox.withPoller { _ in
                link.mailbox.releaseMessage(from: NodeID(1), at: positions[1]!)
                link.mailbox.releaseMessage(from: NodeID(1), at: positions[2]!)
                link.mailbox.advanceReleased()
            }
        }
        #expect(scans == [[3, 4], [3, 4]], "recovery scans of the log at each crash point: \(scans)")
        #expect(link.kept() == [3, 4])
    }

    @Test("killed between freeing a message and moving the counter: the records not yet polled are found")
    func killedWhilePolling() throws {
        let link = try Link()
        defer { link.remove() }
        let sender = try link.connect()
        for value: UInt8 in 1...3 { try send(value, on: sender) }
        var handed: [UInt8] = []
        let scans = try CrashCopies.scans(link) {
            try link.mailbox.withPoller { poller in
                _ = try poller.poll(from: NodeID(1), limit: 1, keeping: { bytes, _ in
                    handed.append(bytes[0])
                    return false
                })
            }
        }
        #expect(handed == [1])
        #expect(scans == [[2, 3]], "recovery scans of the log at each crash point: \(scans)")
        #expect(link.kept() == [2, 3])
    }

    @Test("killed between clearing a wrap word and moving the counter past it: the records after the wrap are found")
    func killedAtTheWrap() throws {
        let link = try Link()
        defer { link.remove() }
        let sender = try link.connect()
        // 62 messages of one 64-byte frame each, consumed; the 63rd takes the ring's last frame
        // that fits with its trailer line, the 64th wraps to offset 0.
        for batch in 0..<2 {
            for value in 0..<31 { try send(UInt8(batch * 31 + value), on: sender) }
            #expect(link.poll().messages.count == 31)
        }
        for value: UInt8 in [100, 101] { try send(value, on: sender) }
        var handed: [UInt8] = []
        let scans = try CrashCopies.scans(link) {
            try link.mailbox.withPoller { poller in
                _ = try poller.poll(from: NodeID(1), keeping: { bytes, _ in
                    handed.append(bytes[0])
                    return false
                })
            }
        }
        #expect(handed == [100, 101])
        #expect(scans == [[101], [101], []], "recovery scans of the log at each crash point (after 100, at the wrap, after 101): \(scans)")
    }

    /// Several threads of a sender reserve space in one ring and write their messages at once: a
    /// kill can leave a reserved message unwritten or half written while later ones are
    /// complete, and a coordinator may have acted on those (reported a commit).
    @Test("the log scan finds the complete records after one whose write a kill cut short", arguments: ["nothing written", "header only", "no trailer"])
    func killedWhileAnotherThreadWrote(_ cut: String) throws {
        let link = try Link()
        defer { link.remove() }
        let sender = try link.connect()
        // 40-byte messages, 64 bytes of ring each: message n's frame is at ring offset 64 (n - 1),
        // its header at +56, its trailer at +112 (the next frame's header line).
        for value: UInt8 in 1...5 { try send(value, on: sender) }
        let control = link.mailbox.region.base + ChannelFormat.controlOffset(sender: NodeID(1), ringCapacity: Link.ringCapacity)
        let ring = control + ChannelFormat.controlBytes
        let frame = 64 * 2  // message 3
        switch cut {
        case "nothing written":
            memset(ring + frame + 56, 0, 8)
            memset(ring + frame + 64, 0, 48)
        case "header only":
            memset(ring + frame + 64, 0, 48)
        default:
            break
        }
        (ring + frame + 112).storeBytes(of: 0, as: UInt64.self)
        #expect(link.kept() == [1, 2, 4, 5], "the log with message 3's write cut short (\(cut)): \(link.kept())")
    }
}

@Suite("Message channels: log space promised to commits")
struct PromisedLogSpaceTests {
    /// A 4 KiB ring: promises and bytes in use together up to three quarters less a line (3008
    /// bytes); ordinary messages up to seven eighths (3584) less what is promised; promised
    /// records and the reserve's users (ABORT, TRUNCATE) anywhere.
    @Test("promises stay within three quarters of the ring, ordinary messages leave promised space free, promised records find it")
    func promisesReserveSpace() throws {
        let link = try Link()
        defer { link.remove() }
        let sender = try link.connect()
        let message = [UInt8](repeating: 7, count: 40)  // one 64-byte frame
        #expect(sender.promise(2048))
        #expect(!sender.promise(1024), "promised beyond the limit: \(sender.promisedBytes)")
        #expect(sender.promisedBytes == 2048, "a refused promise changed the count: \(sender.promisedBytes)")
        #expect(sender.promise(960))
        var ordinary = 0
        while try message.withUnsafeBytes({ try sender.trySend($0) }) { ordinary += 1 }
        #expect(ordinary == (3584 - 3008) / 64, "ordinary messages took \(ordinary) frames beside 3008 promised bytes")
        #expect(!sender.promise(64), "a promise granted with the ring at its limit")
        var promisedSent = 0
        while promisedSent < 100, try message.withUnsafeBytes({ try sender.sendPromised($0, waiting: false) }) { promisedSent += 1 }
        // Up to the ring's last line, which holds the last frame's trailer.
        #expect(promisedSent == (4096 - 64 - 576) / 64, "promised records took \(promisedSent) frames")
        // Given back and taken by the receiver: room for all again.
        sender.releasePromise(3008)
        #expect(sender.promisedBytes == 0)
        #expect(link.poll().messages.count == ordinary + promisedSent)
        var after = 0
        while try message.withUnsafeBytes({ try sender.trySend($0) }) { after += 1 }
        // (Less the frame a wrap skips: the stream stands at the ring's last line.)
        #expect(after == 3584 / 64 - 1, "after the promises were given back, ordinary messages took \(after) frames")
    }
}
