import Granary
import GranaryEngine
import GranaryWorkloads
import Synchronization
import Testing

/// The benchmark loaders meet unknown outcomes as any client must: a member whose lease lapsed
/// while it committed cannot say whether the commit took effect, and a load stopped by that is a
/// benchmark that fails at random.
@Suite("Loading through unknown outcomes")
struct LoadingTests {
    enum Kind: String, CaseIterable, CustomStringConvertible {
        case smallBank, tatp, transfer
        var description: String { rawValue }
    }

    /// Counts the commits made to report an unknown outcome.
    final class Fences: Sendable {
        let sends = Atomic<Int>(0)
        let fenced = Atomic<Int>(0)
    }

    @Test("a load whose commits end with an unknown outcome (the lease lapsed while they committed) completes, each of its rows present once and the totals as loaded, and those commits are truncated: the logs empty out and the replicas are equal",
          arguments: Kind.allCases)
    func loadThroughUnknownOutcomes(_ kind: Kind) async throws {
        let cluster = try await testCluster(nodes: 3, replicas: 3) { $0.regionSize = 16 << 20 }
        let node = cluster.nodes[0]
        let engine = node.engine
        let fences = Fences()
        // Every 7th COMMIT-PRIMARY send of node 0 from its 40th on (the hash tables are made
        // before; transfer, a few large batches, every 2nd) is delivered, but node 0's lease
        // "lapses" while it goes out (as when the configuration manager's grant came late) and is
        // renewed 2 ms later: the commit took effect, and its coordinator reports outcomeUnknown.
        let (first, every) = kind == .transfer ? (2, 2) : (40, 7)
        engine.injectFaults { point, _ in
            guard point == .commitPrimarySend, fences.fenced.load(ordering: .relaxed) < 3 else { return false }
            let send = fences.sends.add(1, ordering: .relaxed).newValue
            guard send >= first, send % every == 0 else { return false }
            fences.fenced.add(1, ordering: .relaxed)
            engine.setFenced(true)
            Task.detached {
                try? await Task.sleep(for: .milliseconds(2))
                engine.setFenced(false)
            }
            return false
        }
        var workload: any Workload = switch kind {
        case .smallBank: SmallBankWorkload(accounts: 3_000, hotAccounts: 100)
        case .tatp: TATPWorkload(scale: 0.01)
        case .transfer: TransferWorkload(accounts: 3_000)
        }
        do {
            try await workload.load(into: cluster)
        } catch {
            Issue.record("the \(kind) load failed after \(fences.fenced.load(ordering: .relaxed)) commits with an unknown outcome: \(error)")
        }
        engine.injectFaults(nil)
        #expect(fences.fenced.load(ordering: .relaxed) == 3, "the load made \(fences.fenced.load(ordering: .relaxed)) commits with an unknown outcome, not 3")
        let violations = try await workload.check(cluster, committedDelta: 0, inDoubt: [])
        #expect(violations.isEmpty, "after a load through unknown outcomes: \(violations)")
        // The commits reported unknown were truncated like any other: the logs empty out, and
        // every backup applied them.
        var quiesced = true
        do {
            try await cluster.quiesce(timeout: .seconds(10))
        } catch {
            quiesced = false
            Issue.record("a load with commits reported unknown left records in the logs: \(error)")
        }
        let differences = replicaDifferences(cluster)
        #expect(differences.isEmpty, "replicas differ after a load with commits reported unknown:\n\(differences.joined(separator: "\n"))")
        if quiesced { try await cluster.shutdown() } else { cluster.abandon() }
    }
}
