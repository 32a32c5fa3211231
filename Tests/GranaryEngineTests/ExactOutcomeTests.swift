import GranaryEngine
import Granary
import GranaryTestSupport
import GranaryMemory
import Synchronization
import Testing

/// Every outcome is exact: nothing reaches a caller unvalidated, a failed commit leaves no lock
/// and no half of itself, and the caller is told committed, failed or unknown as the data shows.
@Suite("Exact outcomes", .serialized)
struct ExactOutcomeTests {
    struct Refused: Error, Equatable {}

    /// FaRM's read skew through an absence: a read-only transaction reads G, another transaction
    /// frees X and writes G, then the first reads X and sees it gone. Seeing G = 0 and X gone is a
    /// state no serial order gives; the attempt must not commit it.
    @Test("read skew through an absence: an error a body catches is validated like a read")
    func readSkewThroughAbsence() async throws {
        let cluster = try await testCluster()
        var seen: [String] = []
        for round in 0..<20 {
            let x = try await cluster.nodes[0].transaction { try $0.allocate(Int64(5)) }
            let g = try await cluster.nodes[1].transaction { try $0.allocate(Int64(0)) }
            let interfered = Atomic<Bool>(false)
            let (gValue, xValue) = try cluster.nodes[2].transactionSync { tx -> (Int64, Int64?) in
                let gValue = try tx.read(g, as: Int64.self)
                if !interfered.exchange(true, ordering: .relaxed) {
                    try cluster.nodes[0].transactionSync { other in
                        try other.free(x)
                        try other.write(g, Int64(1))
                    }
                }
                do {
                    return (gValue, try tx.read(x, as: Int64.self))
                } catch TransactionError.notAllocated {
                    return (gValue, nil)
                }
            }
            // Serial orders: before the other transaction (G = 0, X = 5) or after it (G = 1, X gone).
            let consistent = (gValue == 0 && xValue == 5) || (gValue == 1 && xValue == nil)
            if !consistent { seen.append("round \(round): G = \(gValue), X = \(xValue.map(String.init) ?? "gone")") }
        }
        #expect(seen.isEmpty, "read-only transactions committed impossible states: \(seen)")
        try await cluster.shutdown()
    }

    /// A body's own error after a business check is returned only once what it read validates:
    /// the first attempt saw a state that changed under it, so it runs again and fails on the
    /// current state.
    @Test("an error the body throws is retried when its reads do not validate, returned when they do")
    func bodyErrorIsValidated() async throws {
        let cluster = try await testCluster()
        let balance = try await cluster.nodes[0].transaction { try $0.allocate(Int64(10)) }
        let other = try await cluster.nodes[1].transaction { try $0.allocate(Int64(0)) }
        let runs = Atomic<Int>(0)
        let observed = Mutex<[Int64]>([])
        #expect(throws: Refused()) {
            try cluster.nodes[2].transactionSync { tx in
                let run = runs.add(1, ordering: .relaxed).newValue
                let value = try tx.read(balance, as: Int64.self)
                _ = try tx.read(other, as: Int64.self)
                observed.withLock { $0.append(value) }
                if run == 1 {
                    // Another transaction changes what this one read before it decides.
                    try cluster.nodes[0].transactionSync { try $0.write(balance, Int64(3)) }
                }
                if value < 20 { throw Refused() }
            }
        }
        // The first attempt's refusal rested on a read that no longer held: it ran again.
        #expect(runs.load(ordering: .relaxed) == 2, "the body ran \(runs.load(ordering: .relaxed)) times, reading \(observed.withLock { $0 })")
        #expect(observed.withLock { $0 } == [10, 3])
        try await cluster.shutdown()
    }

    /// Two 40,000-byte objects whose primaries differ, written by one transaction: the
    /// COMMIT-BACKUP record to the third node would hold both (80,104 bytes), more than a channel
    /// carries. The transaction is refused before anything is locked.
    @Test("a transaction whose records cannot fit is refused before anything is locked")
    func tooLargeIsRefusedBeforeLocking() async throws {
        let cluster = try await testCluster { $0.ringCapacity = 256 << 10 }
        let big = [UInt8](repeating: 7, count: 40_000)
        let a = try await cluster.nodes[0].transaction { try $0.allocate(bytes: big) }
        let b = try await cluster.nodes[1].transaction { try $0.allocate(bytes: big) }
        let limit = cluster.nodes[2].engine.maximumRecordBytes
        do {
            try await cluster.nodes[2].transaction { tx in
                try tx.write(a, bytes: [UInt8](repeating: 1, count: 40_000))
                try tx.write(b, bytes: [UInt8](repeating: 2, count: 40_000))
            }
            Issue.record("a transaction with an 80 KB COMMIT-BACKUP record committed through channels of \(limit) bytes")
        } catch TransactionError.tooLarge(let bytes, let maximum) {
            #expect(maximum == limit)
            #expect(bytes > limit)
        }
        // Nothing was locked: each object can be written alone at once, and the cluster quiesces.
        try await cluster.nodes[2].transaction { try $0.write(a, bytes: [UInt8](repeating: 3, count: 40_000)) }
        try await cluster.nodes[2].transaction { try $0.write(b, bytes: [UInt8](repeating: 4, count: 40_000)) }
        let (first, second) = try await cluster.nodes[0].transaction { tx in (try tx.read(a), try tx.read(b)) }
        #expect(first == [UInt8](repeating: 3, count: 40_000))
        #expect(second == [UInt8](repeating: 4, count: 40_000))
        try await cluster.shutdown()
    }

    /// What the caller was told about one transfer.
    enum Told: Equatable, CustomStringConvertible {
        case committed, failed(String), unknown(String)
        var description: String {
            switch self {
            case .committed: return "committed"
            case .failed(let why): return "failed (\(why))"
            case .unknown(let why): return "outcome unknown (\(why))"
            }
        }
    }

    /// For every fault point and every node it can hit: a transfer between two accounts whose
    /// primaries differ (read of a third account, so VALIDATE reads) fails there. Then, once the
    /// fault is gone and the engine has delivered what it owed: no object is locked on any
    /// replica, every backup equals its primary, and the data shows exactly what the caller was
    /// told (both writes or neither; committed means both, failed means neither).
    @Test("a failure at each send and read of each phase leaves no lock, no half transaction, and the outcome told",
          arguments: FaultPoint.commitProtocol)
    func faultAtEachPhase(point: FaultPoint) async throws {
        var evidence: [String] = []
        for target in 0..<3 {
            let cluster = try await testCluster {
                $0.engine.replyTimeout = .milliseconds(300)
                $0.engine.truncationBatch = 1
            }
            let a = try await cluster.nodes[0].transaction { try $0.allocate(Int64(100)) }
            let b = try await cluster.nodes[1].transaction { try $0.allocate(Int64(100)) }
            let c = try await cluster.nodes[2].transaction { try $0.allocate(Int64(0)) }
            let coordinator = cluster.nodes[2]
            let targetNode = NodeID(target)
            coordinator.engine.injectFaults { faultPoint, node in faultPoint == point && (node == targetNode || point == .lockReply) }
            let told: Told
            do {
                try coordinator.engine.run { tx in
                    _ = try tx.read(c, as: Int64.self)
                    try tx.write(a, try tx.read(a, as: Int64.self) - 10)
                    try tx.write(b, try tx.read(b, as: Int64.self) + 10)
                }
                told = .committed
            } catch TransactionError.outcomeUnknown(let reason) {
                told = .unknown(reason)
            } catch {
                told = .failed("\(error)")
            }
            coordinator.engine.injectFaults(nil)
            try await cluster.quiesce(timeout: .seconds(10))
            #expect(coordinator.engine.resolveOwedRecords() == 0)
            try await cluster.quiesce(timeout: .seconds(10))
            let locked = lockedObjects(cluster, [a, b, c])
            let differences = replicaDifferences(cluster)
            let (aValue, bValue) = try await cluster.nodes[0].transaction { tx in
                (try tx.read(a, as: Int64.self), try tx.read(b, as: Int64.self))
            }
            let applied = aValue == 90 && bValue == 110
            let untouched = aValue == 100 && bValue == 100
            var problems: [String] = []
            if !locked.isEmpty { problems.append("locked afterwards: \(locked)") }
            if !differences.isEmpty { problems.append("replicas differ: \(differences)") }
            let promised = cluster.nodes.map(\.engine.promisedLogBytes).reduce(0, +)
            if promised != 0 { problems.append("\(promised) bytes of log space still promised to the ended commit") }
            switch told {
            case .committed where !applied: problems.append("told committed, data a = \(aValue), b = \(bValue)")
            case .failed where !untouched: problems.append("told failed, data a = \(aValue), b = \(bValue)")
            case .unknown where !applied && !untouched: problems.append("half applied: a = \(aValue), b = \(bValue)")
            default: break
            }
            if !problems.isEmpty { evidence.append("\(point) at n\(target): told \(told); \(problems.joined(separator: "; "))") }
            try await cluster.shutdown()
        }
        #expect(evidence.isEmpty, "\(evidence.joined(separator: "\n"))")
    }

    /// Without backups the primaries keep the proof of a commit (their LOCK and COMMIT-PRIMARY
    /// records) until TRUNCATE reaches them; a reopen after an unclean stop rolls forward from it.
    @Test("without backups, primaries keep their records until TRUNCATE, and a reopen recovers from them")
    func noBackups() async throws {
        let tmp = TemporaryDirectory("granary-nobackups")
        defer { tmp.remove() }
        var options = ClusterOptions()
        options.regionSize = 4 << 20
        options.ringCapacity = 64 << 10
        options.engine.truncationBatch = 1_000  // nothing is truncated before the stop
        let directory = tmp.path.appending("c").string
        let cluster = try await Cluster.local(nodes: 3, replicas: 1, directory: .init(directory), options: options)
        let a = try await cluster.nodes[0].transaction { try $0.allocate(Int64(0)) }
        let b = try await cluster.nodes[1].transaction { try $0.allocate(Int64(0)) }
        for _ in 0..<50 {
            try await cluster.nodes[2].transaction { tx in
                try tx.write(a, try tx.read(a, as: Int64.self) + 1)
                try tx.write(b, try tx.read(b, as: Int64.self) + 1)
            }
        }
        #expect(!cluster.nodes[0].engine.isQuiescent, "the primary released the proof of commits before TRUNCATE")
        // An unclean stop: the engines stop with the TRUNCATEs unsent, and the directory reopens.
        for node in cluster.nodes { node.engine.stop() }
        let reopened = try await Cluster.local(nodes: 3, replicas: 1, directory: .init(directory), options: options)
        #expect((reopened.recovery?.committed ?? 0) >= 50, "recovery: \(String(describing: reopened.recovery))")
        let (va, vb) = try await reopened.nodes[1].transaction { tx in (try tx.read(a, as: Int64.self), try tx.read(b, as: Int64.self)) }
        #expect(va == 50 && vb == 50)
        try await reopened.shutdown()
    }

    /// A stale address, kept after its object was freed and the slot reused by another object,
    /// must not read the new object.
    @Test("a stale address of a freed and reused slot fails with notAllocated instead of reading the new object")
    func staleAddress() async throws {
        let cluster = try await testCluster()
        let node = cluster.nodes[0]
        let old = try await node.transaction { try $0.allocate(Int64(1)) }
        try await node.transaction { try $0.free(old) }
        // Allocate until the freed slot is reused (same region and offset).
        var reused: GlobalAddress?
        for _ in 0..<10_000 where reused == nil {
            let address = try await node.transaction { try $0.allocate(Int64(2)) }
            if address.untagged == old.untagged { reused = address }
        }
        let new = try #require(reused, "the freed slot of \(old) was never reused")
        #expect(new != old, "the reused slot's address \(new) equals the stale one")
        await #expect(throws: TransactionError.notAllocated(old)) {
            _ = try await cluster.nodes[1].transaction { try $0.read(old, as: Int64.self) }
        }
        await #expect(throws: TransactionError.notAllocated(old)) {
            try await cluster.nodes[1].transaction { try $0.write(old, Int64(9)) }
        }
        #expect(try await cluster.nodes[1].transaction { try $0.read(new, as: Int64.self) } == 2)
        // The slot's own address (no incarnation) still names whatever lives there.
        #expect(try await cluster.nodes[1].transaction { try $0.read(old.untagged, as: Int64.self) } == 2)
        try await cluster.shutdown()
    }

    /// A read longer than the object is refused, never answered with the next slot's bytes (nor
    /// retried as a conflict until the attempts run out).
    @Test("a read longer than the object is an invalid address, with or without a replica at the coordinator")
    func readLongerThanObject() async throws {
        for replicas in [3, 1] {
            let cluster = try await testCluster(replicas: replicas) { $0.engine.maximumAttempts = 3 }
            let (small, next) = try await cluster.nodes[0].transaction { tx in (try tx.allocate(Int64(7)), try tx.allocate(Int64(8))) }
            let reader = cluster.nodes[replicas == 1 ? 1 : 2]
            do {
                _ = try await reader.transaction { tx in
                    try withUnsafeTemporaryAllocation(byteCount: 200, alignment: 8) { buffer in
                        try tx.read(small, into: buffer)
                        return Array(buffer)
                    }
                }
                Issue.record("a 200-byte read of a 1-line object (next object \(next)) succeeded, replicas \(replicas)")
            } catch TransactionError.invalidAddress(let address, let reason) {
                #expect(address == small)
                #expect(reason.contains("longer than the object"), "\(reason)")
            }
            try await cluster.shutdown()
        }
    }

    /// A node's log ring from a coordinator gets bytes that are not a record (a foreign write).
    /// The receiver refuses them once and reopens the ring; the coordinator's poller notices
    /// within 10 ms and attaches again; transactions through that channel commit as before.
    /// (Before channel epochs, the ring was dropped for ever: every later LOCK to that node
    /// went unanswered.)
    @Test("bytes that are not a record in a node's log are refused once, and the channel carries on")
    func corruptRecordIsRefusedOnce() async throws {
        let cluster = try await testCluster { $0.engine.replyTimeout = .seconds(2) }
        // An object whose primary is n1, written by coordinators on n0.
        let counter = try await cluster.nodes[1].transaction { try $0.allocate(Int64(0)) }
        for _ in 0..<20 { try await cluster.nodes[0].transaction { tx in try tx.write(counter, try tx.read(counter, as: Int64.self) + 1) } }
        try await cluster.quiesce()
        let rejectedBefore = cluster.nodes[1].engine.statistics.snapshot.rejectedRecords
        // At n1's cursor in n0's log ring (quiescent: everything consumed), a header from node 9.
        let region = cluster.nodes[1].engine.mailboxRegion
        let control = region.base + ChannelFormat.controlOffset(sender: NodeID(0), ringCapacity: 64 << 10)
        let consumed = control.load(as: UInt64.self)
        let ring = control + ChannelFormat.controlBytes
        (ring + Int(consumed & UInt64((64 << 10) - 1)) + 56).storeBytes(of: UInt64(8) | 9 << 32 | 0x474D << 48, as: UInt64.self)
        // n1's poller refuses it; n0's poller sees the ring reopened and attaches again.
        var waited = 0
        while cluster.nodes[1].engine.statistics.snapshot.rejectedRecords == rejectedBefore, waited < 2_000 {
            try await Task.sleep(for: .milliseconds(5))
            waited += 5
        }
        #expect(cluster.nodes[1].engine.statistics.snapshot.rejectedRecords > rejectedBefore, "n1 never looked at the foreign bytes")
        try await Task.sleep(for: .milliseconds(50))
        var failures: [String] = []
        for _ in 0..<200 {
            do {
                try await cluster.nodes[0].transaction { tx in try tx.write(counter, try tx.read(counter, as: Int64.self) + 1) }
            } catch {
                failures.append("\(error)")
            }
        }
        #expect(failures.isEmpty, "transactions through the channel after the refused bytes: \(failures.prefix(3))")
        let value = try await cluster.nodes[2].transaction { try $0.read(counter, as: Int64.self) }
        #expect(value == Int64(220 - failures.count), "counter \(value) after \(220 - failures.count) acknowledged increments")
        try await cluster.shutdown()
    }

    /// An ABORT whose send failed holds the primary's lock until it is delivered. The owing
    /// node's poller retries it (every 10 ms): it must not wait for that node's next commit,
    /// which may never come (every coordinator may be blocked reading the locked object).
    @Test("an owed ABORT is delivered by the poller, without another commit on its node")
    func owedAbortIsRetriedByThePoller() async throws {
        let cluster = try await testCluster()
        let x = try await cluster.nodes[1].transaction { try $0.allocate(Int64(1)) }  // primary n1
        let y = try await cluster.nodes[2].transaction { try $0.allocate(Int64(2)) }  // primary n2
        try await cluster.quiesce()
        let coordinator = cluster.nodes[0].engine
        // VALIDATE fails after LOCK, and the ABORT that would unlock x cannot be sent.
        coordinator.injectFaults { point, _ in point == .validateRead || point == .abortSend }
        do {
            try await cluster.nodes[0].transaction { tx in
                _ = try tx.read(y, as: Int64.self)
                try tx.write(x, Int64(10))
            }
            Issue.record("the transaction committed although its VALIDATE read failed")
        } catch {}
        #expect(lockedObjects(cluster, [x]).count > 0, "x was not left locked by the undelivered ABORT")
        coordinator.injectFaults(nil)
        // No transaction runs on n0 from here on.
        let deadline = ContinuousClock.now + .seconds(2)
        while !lockedObjects(cluster, [x]).isEmpty, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        let stillLocked = lockedObjects(cluster, [x])
        #expect(stillLocked.isEmpty, "still locked 2 s after the fault ended: \(stillLocked)")
        guard stillLocked.isEmpty else { return }  // reading x, or quiescing, would wait for ever
        #expect(try await cluster.nodes[2].transaction { try $0.read(x, as: Int64.self) } == 1)
        try await cluster.shutdown()
    }

    /// Objects among `addresses` whose header has the lock bit on some replica.
    func lockedObjects(_ cluster: Cluster, _ addresses: [GlobalAddress]) -> [String] {
        var found: [String] = []
        for address in addresses {
            guard let placement = cluster.configuration.placement(of: address.region) else { continue }
            for node in placement.replicas {
                guard let region = cluster.nodes[node.index].engine.replica(of: address.region) else { continue }
                let header = ObjectLayout.loadHeader(region.base + Int(address.offset))
                if header.isLocked { found.append("\(address) on \(node): \(header)") }
            }
        }
        return found
    }
}
