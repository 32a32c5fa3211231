import Foundation
import Granary
import GranaryEngine
import GranaryTestSupport
import Testing

@Suite("Rejoin in an embedded cluster")
struct EmbeddedRejoinTests {
    /// A node whose lease thread is held off (a false suspicion on a loaded host) is removed
    /// while it runs; it must come back as a new incarnation in the same process: a member again,
    /// its regions' replicas copied back, and its ``Node`` serving transactions that see every
    /// committed value.
    @Test("a node removed while alive (its lease thread held off) rejoins in the same process: a member again, replicas copied back and equal, its Node serving and reading every committed value")
    func removedNodeRejoins() async throws {
        let (cluster, cm) = try await managedTestCluster()
        var written: [(GlobalAddress, Int64)] = []
        for node in cluster.nodes {
            let values = (0..<50).map { Int64(node.id.index * 1_000 + $0) }
            let addresses = try await node.transaction { tx in try values.map { try tx.allocate($0) } }
            written += zip(addresses, values)
        }
        try await cluster.quiesce()
        try await waitForRenewals(cluster, manager: cm)
        let victim = cluster.nodes.first { $0.id != cm }!
        let before = victim.engine
        cluster.membership.first { $0.node == victim.id }!.haltLeases()
        let manager = cluster.nodes[cm.index]
        try await eventually("\(victim.id) removed", timeout: .seconds(30)) { !manager.engine.configuration.contains(victim.id) }
        let deadline = ContinuousClock.now + .seconds(30)
        while true {
            let configuration = manager.engine.configuration
            if configuration.contains(victim.id) && victim.isServing
                && configuration.regions.allSatisfy({ $0.replicas.count == 3 && $0.copying.isEmpty }) { break }
            guard ContinuousClock.now < deadline else {
                let states = cluster.nodes.map { node in
                    let service = cluster.membership.first { $0.node == node.id }
                    return "\(node.id): in \(node.engine.configuration.id), \(node.isServing ? "serving" : "not serving")\(service?.mustRejoin == true ? ", must rejoin" : "")"
                }
                Issue.record("after 30 s \(victim.id) is not back with every region complete: \(configuration); \(states.joined(separator: "; "))")
                try await cluster.shutdown()
                return
            }
            try await Task.sleep(for: .milliseconds(5))
        }
        #expect(victim.engine !== before, "\(victim.id) serves again on the engine it had before its removal")
        let addresses = written.map(\.0)
        let read = try await victim.transaction { tx in try addresses.map { try tx.read($0, as: Int64.self) } }
        let lost = zip(written, read).filter { $0.0.1 != $0.1 }.map { "\($0.0.0): \($0.1), not \($0.0.1)" }
        #expect(lost.isEmpty, "read through the rejoined \(victim.id): \(lost.prefix(5))")
        let more = try await victim.transaction { tx in try tx.allocate(Int64(-1)) }
        #expect(try await manager.transaction { tx in try tx.read(more, as: Int64.self) } == -1)
        try await cluster.quiesce()
        let differences = replicaDifferences(cluster, in: manager.engine.configuration)
        #expect(differences.isEmpty, "\(differences.joined(separator: "\n")); \(cluster.nodes.map { "\($0.engine.channelReport), rejected \($0.statistics.rejectedRecords)" }.joined(separator: "\n"))")
        try await cluster.shutdown()
    }
}
