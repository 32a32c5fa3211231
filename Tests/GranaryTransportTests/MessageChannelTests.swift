import GranaryMemory
import GranaryTestSupport
import GranaryTransport
import Synchronization
import Testing

/// A message that proves its own identity: (stream, sequence) then a body derived from both.
private func makeMessage(stream: Int, sequence: Int, size: Int, into buffer: UnsafeMutableRawBufferPointer) -> UnsafeRawBufferPointer {
    let count = max(16, size)
    buffer.storeBytes(of: UInt64(stream), toByteOffset: 0, as: UInt64.self)
    buffer.storeBytes(of: UInt64(sequence), toByteOffset: 8, as: UInt64.self)
    for i in 16..<count { buffer[i] = UInt8(truncatingIfNeeded: i &* 7 &+ sequence &+ stream) }
    return UnsafeRawBufferPointer(rebasing: buffer[0..<count])
}

/// Checks a received message's body; returns (stream, sequence) or a description of the damage.
private func decode(_ message: UnsafeRawBufferPointer) -> Result<(Int, Int), ChannelDamage> {
    guard message.count >= 16 else { return .failure(ChannelDamage("short message of \(message.count) bytes")) }
    let stream = Int(message.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
    let sequence = Int(message.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
    for i in 16..<message.count where message[i] != UInt8(truncatingIfNeeded: i &* 7 &+ sequence &+ stream) {
        return .failure(ChannelDamage("message \(sequence) of stream \(stream) has a damaged byte at \(i)"))
    }
    return .success((stream, sequence))
}

/// Sends `count` messages of `stream` on `sender`, of sizes `size(sequence)`; records the first
/// failure in `failure` and stops.
private func sendStream(_ stream: Int, count: Int, on sender: ChannelSender, failure: borrowing Mutex<String?>, size: (Int) -> Int) {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1024, alignment: 8)
    defer { buffer.deallocate() }
    for sequence in 0..<count {
        do { try sender.send(makeMessage(stream: stream, sequence: sequence, size: size(sequence), into: buffer)) } catch {
            failure.withLock { $0 = "stream \(stream) send \(sequence): \(error)" }
            return
        }
    }
}

private struct ChannelDamage: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

@Suite("Message channels")
struct MessageChannelTests {
    @Test("a channel to a receiver not there yet (a client not started) assumes a ring size, checks it at the first send, and delivers")
    func receiverNotThereYet() throws {
        let tmp = TemporaryDirectory("granary-shm")
        defer { tmp.remove() }
        let cluster = ClusterID.random()
        let dirA = try RegionDirectory(tmp.path.appending("n0"))
        let dirB = try RegionDirectory(tmp.path.appending("n1"))
        let dirC = try RegionDirectory(tmp.path.appending("n2"))
        let a = SharedMemoryTransport(localNode: NodeID(0), cluster: cluster, directory: dirA)
        a.addPeer(NodeID(1), endpoint: dirB)
        a.addPeer(NodeID(2), endpoint: dirC)
        // Without an assumed size, a missing mailbox fails the channel at once, as before.
        #expect(throws: TransportError.self) { _ = try ChannelSender(transport: a, to: NodeID(1)) }
        let sender = try ChannelSender(transport: a, to: NodeID(1), assumedRingCapacity: 8192)
        let mismatched = try ChannelSender(transport: a, to: NodeID(2), assumedRingCapacity: 8192)
        #expect(sender.ringCapacity == 8192)
        // The receivers start: n1 with the assumed ring size, n2 with another.
        let b = SharedMemoryTransport(localNode: NodeID(1), cluster: cluster, directory: dirB)
        let mailbox = try Mailbox(node: NodeID(1), directory: dirB, cluster: cluster, ringCapacity: 8192)
        try b.register(mailbox.region)
        let c = SharedMemoryTransport(localNode: NodeID(2), cluster: cluster, directory: dirC)
        let other = try Mailbox(node: NodeID(2), directory: dirC, cluster: cluster, ringCapacity: 16384)
        try c.register(other.region)
        var word: UInt64 = 0xC0FFEE
        try withUnsafeBytes(of: &word) { try sender.send($0) }
        var received: [UInt64] = []
        _ = try mailbox.receiver(from: NodeID(0)).poll { received.append($0.loadUnaligned(as: UInt64.self)) }
        #expect(received == [0xC0FFEE])
        do {
            try withUnsafeBytes(of: &word) { try mismatched.send($0) }
            Issue.record("a send into rings of another size than assumed went through")
        } catch {
            guard let error = error as? TransportError, case .corruptChannel(_, NodeID(2), let reason) = error else {
                Issue.record("expected corruptChannel naming n2, got \(error)")
                return
            }
            #expect(reason.contains("16384") || reason.contains("2^14"), "\(reason)")
        }
    }

    @Test("order is kept across many wrap-arounds of a small ring")
    func orderAndWrapAround() async throws {
        let pair = try SharedMemoryFixture().makePair()
        defer { pair.teardown() }
        let sender = try ChannelSender(transport: pair.local, to: pair.remoteNode)
        let receiver = pair.remoteMailbox.receiver(from: pair.local.localNode)
        let total = 20_000
        let failure = Mutex<String?>(nil)
        let received = Atomic<Int>(0)
        await runThreads(2) { thread in
            if thread == 0 {
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 2048, alignment: 8)
                defer { buffer.deallocate() }
                for sequence in 0..<total {
                    // Sizes sweep 16..<1000 so wrap points land everywhere in the 4 KiB ring.
                    let message = makeMessage(stream: 0, sequence: sequence, size: 16 + (sequence * 37) % 984, into: buffer)
                    do { try sender.send(message) } catch {
                        failure.withLock { $0 = "send \(sequence): \(error)" }
                        return
                    }
                }
            } else {
                var expected = 0
                var backoff = Backoff()
                while expected < total, failure.withLock({ $0 == nil }) {
                    let handled = try! receiver.poll { message in
                        switch decode(message) {
                        case .failure(let damage): throw damage
                        case .success((_, let sequence)):
                            if sequence != expected { throw ChannelDamage("expected message \(expected), got \(sequence)") }
                            expected += 1
                        }
                    }
                    if handled == 0 { backoff.pause() } else { backoff.reset() }
                }
                received.store(expected, ordering: .relaxed)
            }
        }
        #expect(failure.withLock { $0 } == nil, "\(failure.withLock { $0 } ?? "")")
        #expect(received.load(ordering: .relaxed) == total)
    }

    @Test("a full ring blocks the sender; nothing is lost or overwritten, and sending resumes")
    func backPressure() throws {
        let pair = try SharedMemoryFixture().makePair()
        defer { pair.teardown() }
        let sender = try ChannelSender(transport: pair.local, to: pair.remoteNode, sendTimeout: .milliseconds(50))
        let receiver = pair.remoteMailbox.receiver(from: pair.local.localNode)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 512, alignment: 8)
        defer { buffer.deallocate() }
        var sent = 0
        var blocked: TransportError?
        while blocked == nil, sent < 1000 {
            do {
                try sender.send(makeMessage(stream: 1, sequence: sent, size: 200, into: buffer))
                sent += 1
            } catch {
                blocked = error
            }
        }
        guard case .channelFull(let node, let waited)? = blocked else {
            Issue.record("the sender was never held back; sent \(sent) messages into a 4 KiB ring, error \(String(describing: blocked))")
            return
        }
        #expect(node == pair.remoteNode && waited >= 50)
        #expect(sent > 0 && sent * 256 <= 4096, "sent \(sent) messages of 256 ring bytes (200 of payload) into a 4096-byte ring")
        var sequences: [Int] = []
        try receiver.poll { message in sequences.append(try decode(message).get().1) }
        #expect(sequences == Array(0..<sent), "the ring lost or reordered messages under back-pressure")
        try sender.send(makeMessage(stream: 1, sequence: sent, size: 200, into: buffer))
        try receiver.poll { message in sequences.append(try decode(message).get().1) }
        #expect(sequences == Array(0...sent))
    }

    @Test("three sender nodes with two threads each: every stream complete and in order")
    func concurrentSenders() async throws {
        let tmp = TemporaryDirectory("granary-channels")
        defer { tmp.remove() }
        let cluster = ClusterID.random()
        let receiverDir = try RegionDirectory(tmp.path.appending("n0"))
        let receiverTransport = SharedMemoryTransport(localNode: NodeID(0), cluster: cluster, directory: receiverDir)
        let mailbox = try Mailbox(node: NodeID(0), directory: receiverDir, cluster: cluster, ringCapacity: 8192)
        try receiverTransport.register(mailbox.region)
        let senders: [ChannelSender] = try (1...3).map { index in
            let dir = try RegionDirectory(tmp.path.appending("n\(index)"))
            let transport = SharedMemoryTransport(localNode: NodeID(index), cluster: cluster, directory: dir)
            transport.addPeer(NodeID(0), endpoint: receiverDir)
            return try ChannelSender(transport: transport, to: NodeID(0))
        }
        let perStream = 3_000
        let streams = 6
        let failure = Mutex<String?>(nil)
        let next = Mutex([Int](repeating: 0, count: streams))
        await runThreads(streams + 1) { thread in
            if thread < streams {
                sendStream(thread, count: perStream, on: senders[thread / 2], failure: failure) { 16 + $0 % 500 }
            } else {
                var backoff = Backoff()
                var seen = [Int](repeating: 0, count: streams)
                while seen.reduce(0, +) < streams * perStream, failure.withLock({ $0 == nil }) {
                    var handled = 0
                    for node in 1...3 {
                        do {
                            handled += try mailbox.receiver(from: NodeID(node)).poll { message in
                                let (stream, sequence) = try decode(message).get()
                                guard stream / 2 == node - 1 else { throw ChannelDamage("stream \(stream) arrived on the channel from n\(node)") }
                                guard sequence == seen[stream] else {
                                    throw ChannelDamage("stream \(stream): expected \(seen[stream]), got \(sequence)")
                                }
                                seen[stream] += 1
                            }
                        } catch {
                            failure.withLock { $0 = "receive: \(error)" }
                        }
                    }
                    if handled == 0 { backoff.pause() } else { backoff.reset() }
                }
                next.withLock { $0 = seen }
            }
        }
        #expect(failure.withLock { $0 } == nil, "\(failure.withLock { $0 } ?? "")")
        #expect(next.withLock { $0 } == [Int](repeating: perStream, count: streams))
    }

    @Test("four threads on one sender into a 4 KiB ring: reservations never overlap, every stream whole and in order")
    func contendedSender() async throws {
        let pair = try SharedMemoryFixture().makePair()
        defer { pair.teardown() }
        let sender = try ChannelSender(transport: pair.local, to: pair.remoteNode)
        let receiver = pair.remoteMailbox.receiver(from: pair.local.localNode)
        let streams = 4
        let perStream = 5_000
        let failure = Mutex<String?>(nil)
        let seen = Mutex([Int](repeating: 0, count: streams))
        await runThreads(streams + 1) { thread in
            if thread < streams {
                // Sizes 16..<1000 (up to four lines), so wraps and full rings are frequent.
                sendStream(thread, count: perStream, on: sender, failure: failure) { 16 + ($0 * 131 + thread * 17) % 984 }
            } else {
                var next = [Int](repeating: 0, count: streams)
                var backoff = Backoff()
                while next.reduce(0, +) < streams * perStream, failure.withLock({ $0 == nil }) {
                    do {
                        let handled = try receiver.poll { message in
                            let (stream, sequence) = try decode(message).get()
                            guard stream < streams, sequence == next[stream] else {
                                throw ChannelDamage("stream \(stream): expected \(stream < streams ? next[stream] : -1), got \(sequence)")
                            }
                            next[stream] += 1
                        }
                        if handled == 0 { backoff.pause() } else { backoff.reset() }
                    } catch {
                        failure.withLock { $0 = "receive: \(error)" }
                    }
                }
                seen.withLock { $0 = next }
            }
        }
        #expect(failure.withLock { $0 } == nil, "\(failure.withLock { $0 } ?? "")")
        #expect(seen.withLock { $0 } == [Int](repeating: perStream, count: streams))
    }

    @Test("bytes in a ring that are not a message from its sender are reported, not delivered")
    func foreignBytes() throws {
        let pair = try SharedMemoryFixture().makePair()
        defer { pair.teardown() }
        let receiver = pair.remoteMailbox.receiver(from: pair.local.localNode)
        let ring = GlobalAddress(region: RegionID.mailbox(of: pair.remoteNode),
                                 offset: UInt32(RegionFormat.headerBytes + pair.local.localNode.index * (64 + 4096) + 64 + 56))
        // The first message's header is at ring offset 56 (its payload starts the next line).
        // A header claiming to come from node 9 in node 0's ring.
        var forged: UInt64 = 8 | 9 << 32 | 0x474D << 48
        try withUnsafeBytes(of: &forged) { try pair.local.write(to: pair.remoteNode, ring, from: $0) }
        var delivered = 0
        #expect(throws: TransportError.corruptChannel(sender: pair.local.localNode, receiver: pair.remoteNode,
                                                      reason: "a message at ring offset 56 claims to come from node n9")) {
            try receiver.poll { _ in delivered += 1 }
        }
        // A well-formed header (8 bytes of payload, in the next line) with a trailer that is not
        // the one expected at stream position 0; the trailer sits in the line after the payload's
        // start line, in its second-to-last word: ring offset 64 + 48.
        let words: [UInt64] = [8 | 0 << 32 | 0x474D << 48, 0xAAAA]
        try words.withUnsafeBytes { try pair.local.write(to: pair.remoteNode, ring, from: $0) }
        var trailer: UInt64 = 0x1234
        try withUnsafeBytes(of: &trailer) { try pair.local.write(to: pair.remoteNode, ring.advanced(by: 112 - 56), from: $0) }
        #expect(throws: TransportError.corruptChannel(sender: pair.local.localNode, receiver: pair.remoteNode,
                                                      reason: "the message at stream position 0 has a foreign trailer 0x1234 at ring offset 112")) {
            try receiver.poll { _ in delivered += 1 }
        }
        #expect(delivered == 0)
    }
}
