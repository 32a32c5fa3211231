import Granary
import GranaryTestSupport
import Testing

@Suite("Quiesce")
struct QuiesceTests {
    @Test("a quiesce that times out names the node still busy, in a ClusterError; it succeeds once that node catches up")
    func timeoutNamesTheBusyNode() async throws {
        let cluster = try await testCluster(nodes: 3, replicas: 3)
        let node = cluster.nodes[0]
        let address = try await node.transaction { tx in try tx.allocate(Int64(1)) }
        try await cluster.quiesce()
        // A backup that processes its log one round a second: the TRUNCATE quiesce sends waits there.
        let slow = cluster.nodes[1]
        slow.engine.slowRecordProcessing(microseconds: 1_000_000)
        try await node.transaction { tx in try tx.write(address, Int64(2)) }
        do {
            try await cluster.quiesce(timeout: .milliseconds(100))
            Issue.record("quiesce returned while \(slow.id) slept a second per round of its log")
        } catch let error as ClusterError {
            guard case .notQuiescent(let timeout, let nodes, _) = error else { Issue.record("\(error)"); return }
            #expect(timeout == .milliseconds(100))
            #expect(nodes.contains(slow.id), "busy nodes named: \(nodes), expected \(slow.id); \(error)")
        }
        slow.engine.slowRecordProcessing(microseconds: 0)
        try await cluster.quiesce()
        #expect(try await cluster.nodes[2].transaction { tx in try tx.read(address, as: Int64.self) } == 2)
        try await cluster.shutdown()
    }
}
