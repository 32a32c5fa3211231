import Granary
import GranaryEngine
import GranaryCheck
import GranaryWorkloads
import Testing

/// `granary check run`'s workload on an embedded cluster, judged by the checker: clean with the
/// faults that exist, and caught when the protocol is broken on purpose (a checker that cannot
/// fail proves nothing).
@Suite("Check runs: the workload, the faults and the checker together", .serialized)
struct CheckRunTests {
    func run(_ workload: CheckWorkload, seconds: Double, faults: Set<CheckFault> = [], sabotage: ProtocolSabotage? = nil) async throws -> (CheckReport, CheckRunSummary) {
        var options = CheckRunOptions()
        options.workload = workload
        options.seconds = seconds
        options.faults = faults
        options.faultInterval = 0.4
        options.faultProbability = 0.05
        options.sabotage = sabotage
        options.regionSize = 8 << 20
        options.totalKeys = 200
        let cluster = try await Cluster.local(nodes: options.nodes, replicas: options.replicas, options: options.clusterOptions)
        let keys = try await CheckKeys.prepare(cluster, directory: nil, options: options)
        let history = HistoryWriter.inMemory()
        let summary = await CheckRunner.run(cluster, keys: keys, options: options, history: history)
        try await cluster.shutdown()
        return (GranaryCheck.check(history: try history.history()), summary)
    }

    @Test("failing and slowed sends: every transaction ok, failed or unknown as the data shows; no anomaly",
          arguments: [CheckWorkload.listAppend, .rwRegister])
    func cleanUnderFaults(workload: CheckWorkload) async throws {
        let (report, summary) = try await run(workload, seconds: 2, faults: [.faults, .slow])
        #expect(report.okCount > 100, "only \(report.okCount) transactions committed: \(summary)")
        #expect(summary.faults > 0, "no fault window was opened")
        #expect(report.isValid, "anomalies in a run of the real protocol:\n\(report.description)")
    }

    @Test("VALIDATE skipped: the checker finds G-single or G2-item within a few seconds")
    func skippedValidationIsCaught() async throws {
        var found: Set<AnomalyKind> = []
        var rounds = 0
        while found.isDisjoint(with: [.gSingle, .g2Item, .gSingleRealtime, .g2ItemRealtime]), rounds < 3 {
            let (report, _) = try await run(.listAppend, seconds: 2, sabotage: .skipValidation)
            found.formUnion(report.anomalyKinds)
            rounds += 1
        }
        #expect(!found.isDisjoint(with: [.gSingle, .g2Item, .gSingleRealtime, .g2ItemRealtime]),
                "the checker saw nothing wrong with a protocol that never validates (found: \(found))")
    }
}
