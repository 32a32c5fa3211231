import Granary
@testable import GranaryEngine
import Testing

@Suite("Transactions: configuration ids")
struct ConfigurationIDTests {
    @Test("a LOCK record from a configuration before the last change of routing is rejected: nothing locked, a failure reply, a count")
    func foreignConfigurationRejected() async throws {
        let cluster = try await testCluster()
        let object = try await cluster.nodes[0].transaction { try $0.allocate(Int64(5)) }
        try await cluster.quiesce()  // the primary has installed the allocation
        let primary = cluster.nodes[cluster.configuration.placement(of: object.region)!.primary.index].engine
        let header = ObjectLayout.loadHeader(primary.replica(of: object.region)!.base + Int(object.offset))
        let coordinator = cluster.nodes.first { $0.engine !== primary }!.engine
        let before = primary.statistics.snapshot.rejectedRecords
        // A well-formed LOCK of the object, stamped with configuration 0, before configuration 1
        // (the routing this cluster has run since): recovery has drained every record before it.
        let failure = try lockRoundTrip(from: coordinator, to: primary) { buffer, id in
            var writer = RecordWriter(into: buffer, capacity: 512, kind: .lock, configuration: ConfigurationID(rawValue: 0), transaction: id)
            var value: Int64 = 99
            writer.appendEntry(address: object, expected: header, new: header.nextVersion, lines: 0, operation: .write, payload: &value, length: 8)
            return writer
        }
        #expect(failure == AbortCause.wrongConfiguration.rawValue, "reply cause \(String(describing: failure))")
        #expect(primary.statistics.snapshot.rejectedRecords == before + 1)
        #expect(ObjectLayout.loadHeader(primary.replica(of: object.region)!.base + Int(object.offset)) == header, "the object changed")
        #expect(try await cluster.nodes[2].transaction { try $0.read(object, as: Int64.self) } == 5)
        #expect(ConfigurationError.wrongConfiguration(found: ConfigurationID(rawValue: 0), expected: ConfigurationID(rawValue: 1), from: coordinator.node)
            .description.contains("config#0"))
        try await cluster.shutdown()
    }

    /// A coordinator still in the old configuration truncates transactions it committed there
    /// after the others moved on: their logs must release the kept records, not refuse the
    /// TRUNCATE and keep them (a log that is never truncated fills, and its sender stops).
    @Test("a TRUNCATE from a member still in an older configuration releases the kept records")
    func truncateFromOlderConfiguration() async throws {
        let cluster = try await testCluster { $0.engine.truncationBatch = 1_000 }
        let coordinator = cluster.nodes[2].engine
        let objects = try await cluster.nodes[0].transaction { tx in try (0..<4).map { _ in try tx.allocate(Int64(0)) } }
        try await cluster.quiesce()
        for round in 1...20 {
            try await cluster.nodes[2].transaction { tx in for object in objects { try tx.write(object, Int64(round)) } }
        }
        // Every record sent in configuration 1 is taken off its ring before the others move on
        // (a COMMIT-BACKUP still on a ring when its receiver moves on would be refused: that is
        // the recovery issue's in-flight records, not what this test is about).
        let drained = ContinuousClock.now + .seconds(5)
        while cluster.nodes.contains(where: { node in cluster.nodes.contains { !node.engine.mailbox.isEmpty(from: $0.engine.node) } }),
              ContinuousClock.now < drained {
            try await Task.sleep(for: .milliseconds(1))
        }
        var next = cluster.configuration
        next.id = ConfigurationID(rawValue: 2)
        for node in cluster.nodes where node.engine !== coordinator { try node.engine.apply(next) }
        #expect(cluster.nodes.contains { !$0.engine.isQuiescent }, "nothing was kept before the TRUNCATE")
        try coordinator.flushTruncations()  // stamped with configuration 1
        let deadline = ContinuousClock.now + .seconds(5)
        while !cluster.nodes.allSatisfy({ $0.engine.isQuiescent }), ContinuousClock.now < deadline {
            for node in cluster.nodes { _ = node.engine.pollOnce() }
            try await Task.sleep(for: .milliseconds(1))
        }
        let kept = cluster.nodes.filter { !$0.engine.isQuiescent }.map(\.engine.channelReport)
        #expect(kept.isEmpty, "records still kept after the TRUNCATE: \(kept)")
        try coordinator.apply(next)
        #expect(replicaDifferences(cluster).isEmpty, "\(replicaDifferences(cluster))")
        try await cluster.shutdown()
    }

    @Test("a LOCK record whose second entry is malformed leaves the first object unlocked and is refused at once")
    func malformedLockRecord() async throws {
        let cluster = try await testCluster()
        let (a, b) = try await cluster.nodes[0].transaction { tx in (try tx.allocate(Int64(1)), try tx.allocate(Int64(2))) }
        try await cluster.quiesce()
        // Allocations go to the allocating node's own primary regions: one LOCK record covers both.
        let primary = cluster.nodes[0].engine
        #expect(cluster.configuration.placement(of: a.region)?.primary == primary.node)
        #expect(cluster.configuration.placement(of: b.region)?.primary == primary.node)
        func header(_ address: GlobalAddress) -> ObjectHeader {
            ObjectLayout.loadHeader(primary.replica(of: address.region)!.base + Int(address.offset))
        }
        let (headerA, headerB) = (header(a), header(b))
        let coordinator = cluster.nodes[1].engine
        let rejectedBefore = primary.statistics.snapshot.rejectedRecords
        let failure = try lockRoundTrip(from: coordinator, to: primary) { buffer, id in
            var writer = RecordWriter(into: buffer, capacity: 512, kind: .lock, configuration: primary.configuration.id, transaction: id)
            var value: Int64 = 10
            writer.appendEntry(address: a, expected: headerA, new: headerA.nextVersion, lines: 0, operation: .write, payload: &value, length: 8)
            let second = writer.count
            writer.appendEntry(address: b, expected: headerB, new: headerB.nextVersion, lines: 0, operation: .write, payload: &value, length: 8)
            // The second entry's length now runs past the end of the record.
            buffer.storeBytes(of: UInt32(4096), toByteOffset: second + 24, as: UInt32.self)
            return writer
        }
        #expect(failure == AbortCause.invalidObject.rawValue, "reply cause \(String(describing: failure)) (nil: no reply within 5 s)")
        #expect(header(a) == headerA, "the first object was left locked or changed: \(header(a)) instead of \(headerA)")
        #expect(header(b) == headerB)
        #expect(primary.statistics.snapshot.rejectedRecords == rejectedBefore + 1)
        // Nothing stays locked: a transaction writes both.
        try await cluster.nodes[2].transaction { tx in
            try tx.write(a, Int64(3))
            try tx.write(b, Int64(4))
        }
        #expect(try await cluster.nodes[1].transaction { tx in [try tx.read(a, as: Int64.self), try tx.read(b, as: Int64.self)] } == [3, 4])
        try await cluster.shutdown()
    }

    /// Sends the LOCK record `build` writes (into a 512-byte buffer, for a fresh reply slot) from
    /// `coordinator` to `primary`, serves both mailboxes until the reply, and returns its cause
    /// (nil: no reply within 5 s).
    /// A stale reservation (a late ALLOCATE-RELEASE after a rebuild) could name a slot that holds
    /// a live object: the allocate entry's expected header then says allocated, and the primary
    /// must refuse it rather than lock the live object and install over it.
    @Test("a LOCK whose allocate entry expects an allocated header is refused as a lock conflict: the live object keeps its value")
    func allocateOverLiveObjectRefused() async throws {
        let cluster = try await testCluster()
        let object = try await cluster.nodes[0].transaction { try $0.allocate(Int64(5)) }
        try await cluster.quiesce()
        let primary = cluster.nodes[cluster.configuration.placement(of: object.region)!.primary.index].engine
        let header = ObjectLayout.loadHeader(primary.replica(of: object.region)!.base + Int(object.offset))
        #expect(header.isAllocated)
        let coordinator = cluster.nodes.first { $0.engine !== primary }!.engine
        let failure = try lockRoundTrip(from: coordinator, to: primary) { buffer, id in
            var writer = RecordWriter(into: buffer, capacity: 512, kind: .lock, configuration: coordinator.configuration.id, transaction: id)
            var value: Int64 = 99
            writer.appendEntry(address: object, expected: header, new: header.allocating, lines: 1, operation: .allocate, payload: &value, length: 8)
            return writer
        }
        guard failure == AbortCause.lockConflict.rawValue else {
            // (Locked, the object would stay so: nothing of this hand-made record commits or aborts it.)
            Issue.record("the primary answered \(String(describing: failure)) (nil: locked) to an allocate entry over the live object \(object), not a lock conflict")
            return
        }
        #expect(ObjectLayout.loadHeader(primary.replica(of: object.region)!.base + Int(object.offset)) == header, "the live object's header changed")
        #expect(try await cluster.nodes[2].transaction { try $0.read(object, as: Int64.self) } == 5)
        try await cluster.shutdown()
    }

    func lockRoundTrip(from coordinator: Engine, to primary: Engine,
                       _ build: (UnsafeMutableRawPointer, TransactionID) -> RecordWriter) throws -> UInt8? {
        let id = coordinator.replies.acquire(node: coordinator.node, replies: 1)!
        defer { coordinator.replies.release(id) }
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 512, alignment: 8)
        defer { buffer.deallocate() }
        try coordinator.send(build(buffer, id).bytes, to: primary.node)
        return coordinator.replies.wait(id, timeoutNanoseconds: 5_000_000_000) {
            primary.pollOnce() + coordinator.pollOnce()
        }
    }
}
