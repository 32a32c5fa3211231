import GranaryMemory
import GranaryTransport
import Testing

/// Two nodes reached through one transport backend: `local` acts on `remote`'s memory.
public struct TransportPair: Sendable {
    public let local: any Transport
    public let remote: any Transport
    /// A data region owned by the remote node.
    public let region: RegionID
    public let regionSize: Int
    /// The remote node's mailbox (for channels to it).
    public let remoteMailbox: Mailbox
    public let teardown: @Sendable () -> Void

    public init(local: any Transport, remote: any Transport, region: RegionID, regionSize: Int,
                remoteMailbox: Mailbox, teardown: @escaping @Sendable () -> Void) {
        self.local = local
        self.remote = remote
        self.region = region
        self.regionSize = regionSize
        self.remoteMailbox = remoteMailbox
        self.teardown = teardown
    }

    public var remoteNode: NodeID { remote.localNode }
}

/// A backend under test: builds fresh ``TransportPair``s.
public protocol TransportFixture: Sendable, CustomStringConvertible {
    func makePair() throws -> TransportPair
}

/// The transport conformance suite, written once against the ``Transport`` protocol. Every backend's
/// tests call each of these with their own fixture.
public enum TransportConformance {
    static func pattern(_ count: Int, seed: UInt8) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) } }

    /// Writes then reads back: small unaligned, word, whole cache lines, and 4 KiB.
    public static func readWriteRoundTrip(_ pair: TransportPair) throws {
        for (offset, count) in [(8195, 5), (8192, 8), (16384, 256), (65536 - 64, 64), (20480, 4096)] {
            let address = GlobalAddress(region: pair.region, offset: UInt32(offset))
            let written = pattern(count, seed: UInt8(truncatingIfNeeded: offset))
            try written.withUnsafeBytes { try pair.local.write(to: pair.remoteNode, address, from: $0) }
            var read = [UInt8](repeating: 0, count: count)
            try read.withUnsafeMutableBytes { try pair.local.read(from: pair.remoteNode, address, into: $0) }
            #expect(read == written, "read back differs at \(address), \(count) bytes")
            if offset % 64 == 0, count % 64 == 0 {
                // Whole lines that are no object (line first words differ): readObject still
                // returns exactly the bytes.
                var object = [UInt8](repeating: 0, count: count)
                try object.withUnsafeMutableBytes { try pair.local.readObject(from: pair.remoteNode, address, into: $0) }
                #expect(object == written, "readObject differs from what was written at \(address), \(count) bytes")
            }
        }
        // A committed 3-line object written through the transport: readObject returns it, and the
        // layout accepts it at its version.
        let objectAddress = GlobalAddress(region: pair.region, offset: 24576)
        let header = ObjectHeader(version: 7, incarnation: 2, allocated: true)
        var image = pattern(3 * 64, seed: 9)
        image.withUnsafeMutableBytes { raw in
            for line in 0..<3 { raw.storeBytes(of: header.rawValue, toByteOffset: line * 64, as: UInt64.self) }
        }
        try image.withUnsafeBytes { try pair.local.write(to: pair.remoteNode, objectAddress, from: $0) }
        var snapshot = [UInt8](repeating: 0, count: 3 * 64)
        try snapshot.withUnsafeMutableBytes { try pair.local.readObject(from: pair.remoteNode, objectAddress, into: $0) }
        #expect(snapshot == image, "readObject of a quiet object differs from its bytes")
        snapshot.withUnsafeBytes { raw in
            #expect(ObjectLayout.check(snapshot: raw.baseAddress!, lines: 3) == .consistent(header))
        }
    }

    /// Compare-and-swap returns the word found and swaps only on a match.
    public static func compareAndSwap(_ pair: TransportPair) throws {
        let address = GlobalAddress(region: pair.region, offset: 12288)
        var initial: UInt64 = 5
        try withUnsafeBytes(of: &initial) { try pair.local.write(to: pair.remoteNode, address, from: $0) }
        let miss = try pair.local.compareAndSwap(at: pair.remoteNode, address, expected: 4, desired: 9)
        #expect(miss == 5)
        let hit = try pair.local.compareAndSwap(at: pair.remoteNode, address, expected: 5, desired: 9)
        #expect(hit == 5)
        var now: UInt64 = 0
        try withUnsafeMutableBytes(of: &now) { try pair.local.read(from: pair.remoteNode, address, into: $0) }
        #expect(now == 9)
    }

    /// Fetch-and-add returns the old word and adds, wrapping.
    public static func fetchAndAdd(_ pair: TransportPair) throws {
        let address = GlobalAddress(region: pair.region, offset: 12296)
        var initial: UInt64 = .max - 1
        try withUnsafeBytes(of: &initial) { try pair.local.write(to: pair.remoteNode, address, from: $0) }
        #expect(try pair.local.fetchAndAdd(at: pair.remoteNode, address, 1) == .max - 1)
        #expect(try pair.local.fetchAndAdd(at: pair.remoteNode, address, 3) == .max)
        #expect(try pair.local.fetchAndAdd(at: pair.remoteNode, address, 0) == 2)
    }

    /// A batch of every kind of operation completes with one wait, results in place.
    public static func batch(_ pair: TransportPair) throws {
        let base = GlobalAddress(region: pair.region, offset: 32768)
        let data = pattern(128, seed: 3)
        var readBack = [UInt8](repeating: 0, count: 128)
        var batch = OperationBatch(capacity: 8)
        var counter: UInt64 = 100
        try withUnsafeBytes(of: &counter) { try pair.local.write(to: pair.remoteNode, base.advanced(by: 256), from: $0) }
        try data.withUnsafeBytes { source in
            try readBack.withUnsafeMutableBytes { destination in
                batch.write(to: pair.remoteNode, base, from: source)
                let cas = batch.compareAndSwap(at: pair.remoteNode, base.advanced(by: 256), expected: 100, desired: 200)
                let faa = batch.fetchAndAdd(at: pair.remoteNode, base.advanced(by: 256), 7)
                batch.read(from: pair.remoteNode, base, into: destination)
                try pair.local.execute(&batch)
                #expect(batch.result(cas) == 100)
                #expect(batch.result(faa) == 200)
            }
        }
        #expect(readBack == data)
        var final: UInt64 = 0
        try withUnsafeMutableBytes(of: &final) { try pair.local.read(from: pair.remoteNode, base.advanced(by: 256), into: $0) }
        #expect(final == 207)
        batch.removeAll()
        #expect(batch.count == 0)
    }

    /// Bad addresses give errors that name the problem, never crashes.
    public static func badAddresses(_ pair: TransportPair) throws {
        let node = pair.remoteNode
        var word: UInt64 = 0
        let end = GlobalAddress(region: pair.region, offset: UInt32(pair.regionSize - 4))
        #expect(throws: TransportError.outOfBounds(node: node, address: end, length: 8, regionSize: pair.regionSize)) {
            try withUnsafeMutableBytes(of: &word) { try pair.local.read(from: node, end, into: $0) }
        }
        #expect(throws: TransportError.self) {
            try withUnsafeBytes(of: &word) { try pair.local.write(to: node, end, from: $0) }
        }
        let lastLine = GlobalAddress(region: pair.region, offset: UInt32(pair.regionSize - 64))
        var lines = [UInt8](repeating: 0, count: 128)
        #expect(throws: TransportError.outOfBounds(node: node, address: lastLine, length: 128, regionSize: pair.regionSize)) {
            try lines.withUnsafeMutableBytes { try pair.local.readObject(from: node, lastLine, into: $0) }
        }
        let unknownRegion = GlobalAddress(region: RegionID(4000), offset: 4096)
        do {
            try withUnsafeMutableBytes(of: &word) { try pair.local.read(from: node, unknownRegion, into: $0) }
            Issue.record("reading an unknown region succeeded")
        } catch let error as TransportError {
            guard case .unknownRegion(let n, let r, _) = error, n == node, r == RegionID(4000) else {
                Issue.record("unexpected error \(error)")
                return
            }
        }
        let misaligned = GlobalAddress(region: pair.region, offset: 8196)
        #expect(throws: TransportError.misaligned(node: node, address: misaligned, operation: "compare-and-swap")) {
            _ = try pair.local.compareAndSwap(at: node, misaligned, expected: 0, desired: 1)
        }
        #expect(throws: TransportError.misaligned(node: node, address: misaligned, operation: "fetch-and-add")) {
            _ = try pair.local.fetchAndAdd(at: node, misaligned, 1)
        }
        let stranger = NodeID(NodeID.limit - 1)
        #expect(throws: TransportError.unknownNode(stranger)) {
            try withUnsafeMutableBytes(of: &word) { try pair.local.read(from: stranger, GlobalAddress(region: pair.region, offset: 4096), into: $0) }
        }
        var batch = OperationBatch(capacity: 2)
        batch.fetchAndAdd(at: node, GlobalAddress(region: pair.region, offset: 4096), 1)
        batch.fetchAndAdd(at: node, end, 1)
        #expect(throws: TransportError.self) { try pair.local.execute(&batch) }
        // A prefetch is a hint: at any of these addresses it returns, and the read reports them.
        pair.local.prefetch(from: node, end, length: 8)
        pair.local.prefetch(from: node, lastLine, length: 128)
        pair.local.prefetch(from: node, GlobalAddress(region: pair.region, offset: UInt32.max - 63), length: 1 << 20)
        pair.local.prefetch(from: node, unknownRegion, length: 64)
        pair.local.prefetch(from: stranger, GlobalAddress(region: pair.region, offset: 4096), length: 64)
        pair.local.prefetch(from: node, GlobalAddress(region: pair.region, offset: 4096), length: 0)
    }

    /// A prefetch changes nothing a read returns: before and after writes, unaligned, over lines.
    public static func prefetch(_ pair: TransportPair) throws {
        for (offset, count) in [(8195, 5), (16384, 256), (20480, 4096)] {
            let address = GlobalAddress(region: pair.region, offset: UInt32(offset))
            for seed: UInt8 in [7, 99] {
                pair.local.prefetch(from: pair.remoteNode, address, length: count)
                let written = pattern(count, seed: seed)
                try written.withUnsafeBytes { try pair.local.write(to: pair.remoteNode, address, from: $0) }
                pair.local.prefetch(from: pair.remoteNode, address, length: count)
                var read = [UInt8](repeating: 0, count: count)
                try read.withUnsafeMutableBytes { try pair.local.read(from: pair.remoteNode, address, into: $0) }
                #expect(read == written, "\(count) bytes at \(address) after a prefetch (seed \(seed))")
            }
        }
    }

    /// Messages sent over a channel built on the transport arrive whole and in order.
    public static func channel(_ pair: TransportPair) throws {
        let sender = try ChannelSender(transport: pair.local, to: pair.remoteNode)
        let receiver = pair.remoteMailbox.receiver(from: pair.local.localNode)
        var received: [[UInt8]] = []
        let messages = (0..<50).map { pattern($0 * 13 % 300, seed: UInt8($0)) }
        // Several messages in flight at a time, fewer than fill the ring.
        for (index, message) in messages.enumerated() {
            try message.withUnsafeBytes { try sender.send($0) }
            if index % 4 == 3 { try receiver.poll { received.append(Array($0)) } }
        }
        try receiver.poll { received.append(Array($0)) }
        #expect(received == messages)
    }
}

/// What one one-sided read of a whole object, written by writers that fill every payload word
/// with one value, tells a torn-read stress test.
public enum SnapshotVerdict: Equatable {
    case locked
    case torn
    /// The layout accepted it and the payload is whole.
    case accepted
    /// The layout accepted it, but the payload mixes writes: a torn read that slipped through.
    case acceptedButTorn(String)

    /// Judges `snapshot` (`lines` whole lines read at `address`); `payload` is scratch of
    /// `words` words.
    public static func judge(_ snapshot: UnsafeRawPointer, lines: Int, words: Int, address: GlobalAddress,
                             payload: inout [UInt64]) -> SnapshotVerdict {
        payload.withUnsafeMutableBytes {
            ObjectLayout.gatherPayload(from: snapshot, into: $0.baseAddress!, count: words * 8)
        }
        switch ObjectLayout.check(snapshot: snapshot, lines: lines) {
        case .locked: return .locked
        case .torn: return .torn
        case .consistent(let header):
            guard let odd = payload.firstIndex(where: { $0 != payload[0] }) else { return .accepted }
            return .acceptedButTorn("object \(address) accepted at \(header) with word 0 = 0x\(String(payload[0], radix: 16)) but word \(odd) = 0x\(String(payload[odd], radix: 16))")
        }
    }
}
