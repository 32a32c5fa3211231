import Granary
import MetricsTestKit
import Testing

@Suite("Transactions: observability")
struct MetricsTests {
    @Test("commits, aborts by cause and every phase's timer reach swift-metrics")
    func phasesAndCounters() async throws {
        let metrics = TestMetrics()
        let cluster = try await testCluster {
            $0.engine.metricsFactory = metrics
            $0.engine.phaseTimingInterval = 1  // time every attempt (the default samples one in 8)
        }
        let node = cluster.nodes[0]
        let x = try await node.transaction { try $0.allocate(Int64(1)) }
        for _ in 0..<5 { try await node.transaction { tx in try tx.write(x, try tx.read(x, as: Int64.self) + 1) } }
        _ = try await node.transaction { tx in try tx.read(x, as: Int64.self) }
        // One forced validation abort.
        var first = true
        _ = try await node.transaction { tx -> Int64 in
            let value = try tx.read(x, as: Int64.self)
            _ = try tx.allocate(Int64(0))
            let y = try tx.read(x, as: Int64.self)
            if first {
                first = false
                try cluster.nodes[1].transactionSync { try $0.write(x, Int64(100)) }
            }
            return value + y
        }
        try await cluster.quiesce()
        let dimension = ("node", "n0")
        let committed = try metrics.expectCounter("granary_transactions_committed_total", [dimension])
        #expect(committed.totalValue == 8, "committed counter values \(committed.values)")
        let validationAborts = try metrics.expectCounter("granary_transactions_aborted_total", [dimension, ("cause", "validation-failed")])
        #expect(validationAborts.totalValue == 1, "aborts by validation-failed: \(validationAborts.values)")
        for phase in Phase.allCases {
            let timer = try metrics.expectTimer("granary_phase_nanoseconds", [dimension, ("phase", phase.description)])
            #expect(!timer.values.isEmpty, "no \(phase) timing was recorded")
        }
        #expect(node.statistics.committed == 8)
        try await cluster.shutdown()
    }
}
