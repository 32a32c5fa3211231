import GranaryMemory
import GranaryTestSupport
import GranaryTransport
import Testing

/// Node 1 sends to node 0 over shared memory; either side can be "restarted" (a new sender
/// connection for node 1, a fresh mailbox object over node 0's cleared file).
private struct Link {
    let tmp = TemporaryDirectory("granary-epochs")
    let cluster = ClusterID.random()
    let receiverDirectory: RegionDirectory
    let senderTransport: SharedMemoryTransport
    var mailbox: Mailbox
    static let ringCapacity = 4096

    init() throws {
        receiverDirectory = try RegionDirectory(tmp.path.appending("n0"))
        mailbox = try Mailbox(node: NodeID(0), directory: receiverDirectory, cluster: cluster, ringCapacity: Self.ringCapacity)
        let senderDirectory = try RegionDirectory(tmp.path.appending("n1"))
        senderTransport = SharedMemoryTransport(localNode: NodeID(1), cluster: cluster, directory: senderDirectory)
        senderTransport.addPeer(NodeID(0), endpoint: receiverDirectory)
    }

    /// A new connection from node 1, as after node 1 restarted.
    func connect() throws -> ChannelSender { try ChannelSender(transport: senderTransport, to: NodeID(0)) }

    /// Node 0 restarted: its mailbox file opened again, cleared.
    mutating func restartReceiver() throws {
        mailbox = try Mailbox(node: NodeID(0), directory: receiverDirectory, cluster: cluster, ringCapacity: Self.ringCapacity)
    }

    /// Polls node 1's log ring once; returns the messages (as their first byte) and the error, if any.
    func poll(keeping keep: Set<UInt8> = []) -> (messages: [UInt8], error: (any Error)?) {
        var messages: [UInt8] = []
        do {
            try mailbox.withPoller { poller in
                _ = try poller.poll(from: NodeID(1), keeping: { bytes, _ in
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

    func remove() { tmp.remove() }
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

    @Test("a receiver restarted with a fresh mailbox is reattached by the sender's connection check")
    func receiverRestart() throws {
        var link = try Link()
        defer { link.remove() }
        let sender = try link.connect()
        try send(1, on: sender)
        try send(2, on: sender)
        #expect(link.poll().messages == [1, 2])

        try link.restartReceiver()
        // Sent before the sender learns of the restart: lost (the receiver starts a new stream).
        try send(3, on: sender)
        #expect(link.poll().messages.isEmpty)
        #expect(try sender.checkConnection(wait: false), "the sender did not reattach to the reopened ring")
        for value: UInt8 in 4...5 { try send(value, on: sender) }
        let after = link.poll()
        #expect(after.messages == [4, 5] && after.error == nil, "after the receiver's restart: \(after)")
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
        #expect(link.kept().isEmpty, "a scan must stop at a trailer of neither epoch")
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
