import Granary
import GranaryEngine
import GranaryWorkloads
import Synchronization
import Testing

/// Unknown outcomes and late lease grants: the benchmark loaders meet an unknown outcome as any
/// client must (a load stopped by one, a member whose lease lapsed while it committed or a failed
/// send, is a benchmark that fails at random), and a commit whose lease lapsed while it committed
/// reports committed once a grant proves its records counted, and unknown without one.
@Suite("Loading through unknown outcomes; late lease grants")
struct LoadingTests {
    enum Kind: String, CaseIterable, CustomStringConvertible {
        case smallBank, tatp, transfer
        var description: String { rawValue }
    }

    /// Counts the sends a rule saw and the faults it made.
    final class Faults: Sendable {
        let sends = Atomic<Int>(0)
        let made = Atomic<Int>(0)
        let burst = Atomic<Int>(0)
    }

    @Test("a load whose commits end with an unknown outcome (their COMMIT-PRIMARY sends failed, delivered later) completes, each of its rows present once and the totals as loaded, the logs empty and the replicas equal",
          arguments: Kind.allCases)
    func loadThroughUnknownOutcomes(_ kind: Kind) async throws {
        let cluster = try await testCluster(nodes: 3, replicas: 3) { $0.regionSize = 16 << 20 }
        let engine = cluster.nodes[0].engine
        let faults = Faults()
        // From node 0's 40th COMMIT-PRIMARY send on (the hash tables are made before; transfer, a
        // few large batches: from the 2nd), every 7th (2nd) starts a burst of 3 failed sends,
        // every COMMIT-PRIMARY of the transaction (3 nodes): its coordinator reports outcomeUnknown
        // and delivers the records it owes later, so the batch commits.
        let (first, every) = kind == .transfer ? (2, 2) : (40, 7)
        engine.injectFaults { point, _ in
            guard point == .commitPrimarySend else { return false }
            if faults.burst.load(ordering: .relaxed) > 0 {
                faults.burst.subtract(1, ordering: .relaxed)
                return true
            }
            guard faults.made.load(ordering: .relaxed) < 3 else { return false }
            let send = faults.sends.add(1, ordering: .relaxed).newValue
            guard send >= first, send % every == 0 else { return false }
            faults.made.add(1, ordering: .relaxed)
            faults.burst.store(2, ordering: .relaxed)
            return true
        }
        var workload: any Workload = switch kind {
        case .smallBank: SmallBankWorkload(accounts: 3_000, hotAccounts: 100)
        case .tatp: TATPWorkload(scale: 0.01)
        case .transfer: TransferWorkload(accounts: 3_000)
        }
        do {
            try await workload.load(into: cluster)
        } catch {
            Issue.record("the \(kind) load failed after \(faults.made.load(ordering: .relaxed)) commits with an unknown outcome: \(error)")
        }
        engine.injectFaults(nil)
        #expect(faults.made.load(ordering: .relaxed) == 3, "the load made \(faults.made.load(ordering: .relaxed)) commits with an unknown outcome, not 3")
        let violations = try await workload.check(cluster, committedDelta: 0, inDoubt: [])
        #expect(violations.isEmpty, "after a load through unknown outcomes: \(violations)")
        try await expectQuiescentAndEqual(cluster, "a load with commits reported unknown")
    }

    @Test("a commit whose lease lapsed while its records went out, and that the configuration manager granted again after they landed, reports committed; it is truncated like any other")
    func lateGrantCommits() async throws {
        let cluster = try await testCluster(nodes: 3, replicas: 3)
        let node = cluster.nodes[0]
        let engine = node.engine
        let address = try await node.transaction { tx in try tx.allocate(Int64(0)) }
        let faults = Faults()
        // Every 3rd COMMIT-PRIMARY send: node 0's lease "lapses" while it goes out (fenced); 2 ms
        // later the CM's grant comes (a new value in the grant word) and lifts the fence.
        engine.injectFaults { point, _ in
            guard point == .commitPrimarySend, faults.sends.add(1, ordering: .relaxed).newValue % 3 == 0 else { return false }
            faults.made.add(1, ordering: .relaxed)
            engine.lapseLease(grantedAgainAfter: .milliseconds(2))
            return false
        }
        var failures: [String] = []
        for _ in 0..<12 {
            do {
                try await node.transaction { tx in try tx.write(address, try tx.read(address, as: Int64.self) + 1) }
            } catch {
                failures.append("\(error)")
            }
        }
        engine.injectFaults(nil)
        #expect(faults.made.load(ordering: .relaxed) >= 3, "only \(faults.made.load(ordering: .relaxed)) commits were fenced")
        #expect(failures.isEmpty, "commits granted again after their records landed were not reported committed: \(failures)")
        let value = try await node.transaction { tx in try tx.read(address, as: Int64.self) }
        #expect(value == 12, "12 increments reported committed, the value is \(value)")
        try await expectQuiescentAndEqual(cluster, "commits fenced and granted again")
    }

    @Test("a commit whose lease lapsed while its records went out and that no grant followed reports an unknown outcome, not committed")
    func lapsedLeaseWithoutGrantIsUnknown() async throws {
        let cluster = try await testCluster(nodes: 3, replicas: 3) { $0.engine.replyTimeout = .milliseconds(100) }
        let node = cluster.nodes[0]
        let engine = node.engine
        let address = try await node.transaction { tx in try tx.allocate(Int64(0)) }
        let grant = engine.leaseGrantWord.pointee.load(ordering: .relaxed)
        // The lease "lapses" while the COMMIT-PRIMARY records go out, and no grant comes.
        engine.injectFaults { point, _ in
            if point == .commitPrimarySend { engine.setFenced(true) }
            return false
        }
        var outcome = "committed"
        do {
            try await node.transaction { tx in try tx.write(address, Int64(1)) }
        } catch TransactionError.outcomeUnknown(let reason) {
            outcome = "unknown: \(reason)"
        } catch {
            outcome = "\(error)"
        }
        engine.injectFaults(nil)
        #expect(outcome.hasPrefix("unknown"), "a commit fenced with no grant after its records (grant word still \(grant): \(engine.leaseGrantWord.pointee.load(ordering: .relaxed))) was reported \(outcome)")
        engine.setFenced(false)
        // Its backups keep the COMMIT-BACKUP until a recovery decides it (README's known problem):
        // the cluster is not quiescent, so it is abandoned.
        cluster.abandon()
    }

    /// The logs empty out (every commit truncated) and every backup equals its primary; then shuts
    /// the cluster down (abandons it if it does not quiesce).
    func expectQuiescentAndEqual(_ cluster: Cluster, _ what: String) async throws {
        var quiesced = true
        do {
            try await cluster.quiesce(timeout: .seconds(10))
        } catch {
            quiesced = false
            Issue.record("\(what) left records in the logs: \(error)")
        }
        let differences = replicaDifferences(cluster)
        #expect(differences.isEmpty, "replicas differ after \(what):\n\(differences.joined(separator: "\n"))")
        if quiesced { try await cluster.shutdown() } else { cluster.abandon() }
    }
}
