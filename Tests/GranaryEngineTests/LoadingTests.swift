import Granary
import GranaryEngine
import GranaryWorkloads
import Synchronization
import Testing

/// The benchmark loaders meet an unknown outcome as any client must: a load stopped by one (a
/// member whose lease lapsed while it committed, a failed send) is a benchmark that fails at
/// random.
@Suite("Loading through unknown outcomes")
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
