import Granary
import GranaryTestSupport
import Synchronization
import Testing

@Suite("Transactions: protocol properties")
struct ProtocolTests {
    @Test("read-only transactions send no LOCK record and never block a writer")
    func readOnlyTakesNoLocks() async throws {
        let cluster = try await testCluster()
        let objects = try await cluster.nodes[0].transaction { tx in try (0..<20).map { try tx.allocate(Int64($0)) } }
        let reader = cluster.nodes[1]
        let before = reader.statistics.lockRecords
        var attempts = 0
        let writerDone = Shared(false)
        // The reader reads every object, then (inside its body, still open) a writer on another node
        // updates one of them: the writer must commit at once, and the reader must retry.
        let sum = try await reader.transaction { tx -> Int64 in
            attempts += 1
            var sum: Int64 = 0
            for object in objects { sum += try tx.read(object, as: Int64.self) }
            if attempts == 1 {
                try cluster.nodes[2].transactionSync { w in try w.write(objects[3], Int64(1_000)) }
                writerDone.withLock { $0 = true }
            }
            return sum
        }
        #expect(writerDone.value, "the writer did not commit while the read-only transaction was open")
        #expect(attempts == 2, "the read-only transaction should have failed validation once and retried, ran \(attempts) times")
        #expect(sum == (0..<20).reduce(0, +) - 3 + 1_000)
        #expect(reader.statistics.lockRecords == before, "a read-only transaction sent LOCK records")
        #expect(reader.statistics.aborts[.validationFailed] == 1)
        try await cluster.shutdown()
    }

    @Test("an aborted transaction leaves no lock held and no trace in any replica")
    func abortLeavesNoTrace() async throws {
        let cluster = try await testCluster { $0.engine.maximumAttempts = 1 }
        let x = try await cluster.nodes[0].transaction { try $0.allocate(Int64(1)) }
        let y = try await cluster.nodes[1].transaction { try $0.allocate(Int64(2)) }
        let allocatedBefore = cluster.nodes.map { $0.engine.replica(of: RegionID(1)) != nil }
        _ = allocatedBefore
        // The victim reads x and y, allocates, writes both; before it commits, another transaction
        // changes x, so the victim's LOCK fails and it aborts (one attempt allowed).
        var allocated: GlobalAddress?
        await #expect(throws: TransactionError.conflict(.lockConflict, attempts: 1)) {
            try await cluster.nodes[2].transaction { tx in
                let a = try tx.read(x, as: Int64.self)
                let b = try tx.read(y, as: Int64.self)
                allocated = try tx.allocate(Int64(99))
                try tx.write(x, a + 100)
                try tx.write(y, b + 100)
                try cluster.nodes[0].transactionSync { other in try other.write(x, Int64(5)) }
            }
        }
        try await cluster.quiesce()
        // Every replica of every object is unlocked, x holds the other transaction's value, y is
        // untouched, and the victim's allocation does not exist.
        for placement in cluster.configuration.regions {
            for node in placement.replicas {
                let region = cluster.nodes[node.index].engine.replica(of: placement.region)!
                for address in [x, y] + (allocated.map { [$0] } ?? []) where address.region == placement.region {
                    let header = ObjectLayout.loadHeader(region.base + Int(address.offset))
                    #expect(!header.isLocked, "\(address) is still locked on \(node)")
                }
            }
        }
        let (vx, vy) = try await cluster.nodes[1].transaction { tx in (try tx.read(x, as: Int64.self), try tx.read(y, as: Int64.self)) }
        #expect(vx == 5 && vy == 2)
        if let allocated {
            await #expect(throws: TransactionError.notAllocated(allocated)) {
                _ = try await cluster.nodes[1].transaction { try $0.read(allocated, as: Int64.self) }
            }
        }
        #expect(replicaDifferences(cluster).isEmpty, "\(replicaDifferences(cluster))")
        try await cluster.shutdown()
    }

    @Test("after quiescence every backup's bytes equal its primary's, including allocations and frees")
    func backupsEqualPrimaries() async throws {
        let cluster = try await testCluster()
        var objects: [GlobalAddress] = []
        for (index, node) in cluster.nodes.enumerated() {
            objects += try await node.transaction { tx in
                try (0..<50).map { i in try tx.allocate(bytes: Array(repeating: UInt8(index * 50 + i), count: 200 + i % 20)) }
            }
        }
        let snapshot = objects
        try await withThrowingTaskGroup(of: Void.self) { group in
            for node in cluster.nodes {
                group.addTask {
                    for round in 0..<100 {
                        let target = snapshot[(round * 7 + node.id.index * 13) % snapshot.count]
                        try await node.transaction { tx in
                            var bytes = try tx.read(target)
                            bytes.append(UInt8(truncatingIfNeeded: round))
                            try tx.write(target, bytes: Array(bytes.suffix(200)))
                        }
                    }
                }
            }
            try await group.waitForAll()
        }
        // Free a tenth of the objects, reallocate some slots.
        try await cluster.nodes[1].transaction { tx in
            for object in snapshot.enumerated().filter({ $0.offset % 10 == 0 }).map(\.element) { try tx.free(object) }
        }
        _ = try await cluster.nodes[0].transaction { tx in try (0..<5).map { _ in try tx.allocate(bytes: [1, 2, 3]) } }
        try await cluster.quiesce()
        let differences = replicaDifferences(cluster)
        #expect(differences.isEmpty, "\(differences)")
        try await cluster.shutdown()
    }

    @Test("a freed object's incarnation changes: readers of it fail, a transaction that read it aborts")
    func freeChangesIncarnation() async throws {
        let cluster = try await testCluster()
        let object = try await cluster.nodes[0].transaction { try $0.allocate(Int64(7)) }
        let primary = cluster.configuration.placement(of: object.region)!.primary
        let before = ObjectLayout.loadHeader(cluster.nodes[primary.index].engine.replica(of: object.region)!.base + Int(object.offset))
        var attempts = 0
        // A transaction reads the object; another frees it before the first commits.
        let result: Int64? = try await cluster.nodes[1].transaction { tx in
            attempts += 1
            do {
                let value = try tx.read(object, as: Int64.self)
                if attempts == 1 { try cluster.nodes[2].transactionSync { try $0.free(object) } }
                try tx.write(object, value + 1)
                return value
            } catch TransactionError.notAllocated {
                return nil
            }
        }
        #expect(result == nil, "the second attempt must see the object freed")
        #expect(attempts == 2)
        let after = ObjectLayout.loadHeader(cluster.nodes[primary.index].engine.replica(of: object.region)!.base + Int(object.offset))
        #expect(after.incarnation == before.incarnation &+ 1 && !after.isAllocated, "before \(before), after \(after)")
        try await cluster.shutdown()
    }

    @Test("a value larger than its object is refused by the primary, not retried")
    func valueTooLarge() async throws {
        let cluster = try await testCluster()
        let object = try await cluster.nodes[0].transaction { try $0.allocate(bytes: [1, 2, 3]) }
        await #expect(throws: TransactionError.rejectedByPrimary([object], reason: "a written object is not an object at its primary, or is smaller than the value written")) {
            try await cluster.nodes[1].transaction { try $0.write(object, bytes: Array(repeating: 9, count: 500)) }
        }
        #expect(try await cluster.nodes[2].transaction { try $0.read(object) } == [1, 2, 3])
        try await cluster.shutdown()
    }

    @Test("bad addresses are errors naming the address")
    func badAddresses() async throws {
        let cluster = try await testCluster()
        let node = cluster.nodes[0]
        let unknown = GlobalAddress(region: RegionID(999), offset: 65536)
        await #expect(throws: TransactionError.invalidAddress(unknown, reason: "region r999 is not in config#1")) {
            _ = try await node.transaction { try $0.read(unknown, as: Int64.self) }
        }
        let outside = GlobalAddress(region: RegionID(1), offset: UInt32(4 << 20))
        await #expect(throws: TransactionError.invalidAddress(outside, reason: "beyond the end of region r1")) {
            _ = try await node.transaction { try $0.read(outside, as: Int64.self) }
        }
        let misaligned = GlobalAddress(region: RegionID(1), offset: 65540)
        await #expect(throws: TransactionError.invalidAddress(misaligned, reason: "objects start on a 64-byte boundary")) {
            _ = try await node.transaction { try $0.read(misaligned, as: Int64.self) }
        }
        let never = GlobalAddress(region: RegionID(2), offset: 1 << 20)
        await #expect(throws: TransactionError.notAllocated(never)) {
            _ = try await node.transaction { try $0.read(never, as: Int64.self) }
        }
        try await cluster.shutdown()
    }

    @Test("a second read of an object in one attempt returns the first read's bytes; a change in between aborts it at commit")
    func repeatableReads() async throws {
        let cluster = try await testCluster()
        let node = cluster.nodes[0]
        let x = try await node.transaction { try $0.allocate(Int64(1)) }
        let y = try await node.transaction { try $0.allocate(Int64(0)) }
        let engine = node.engine
        var seen: [Int64] = []
        let outcome = try engine.attempt(engine.makeTransaction()) { tx in
            let first = try tx.read(x, as: Int64.self)
            try cluster.nodes[1].transactionSync { try $0.write(x, Int64(2)) }
            let second = try tx.read(x, as: Int64.self)
            seen = [first, second]
            _ = try tx.read(y, as: Int64.self)  // two objects read: validated at commit
        }
        #expect(seen == [1, 1], "the second read saw another value: \(seen)")
        guard case .aborted(let cause) = outcome else {
            Issue.record("a transaction whose read was overwritten before it committed was not aborted")
            try await cluster.shutdown()
            return
        }
        #expect(cause == .validationFailed, "aborted with \(cause)")
        #expect(try await node.transaction { try $0.read(x, as: Int64.self) } == 2)
        try await cluster.shutdown()
    }
}
