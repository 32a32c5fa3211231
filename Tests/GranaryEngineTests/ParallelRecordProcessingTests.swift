import Foundation
import Granary
@testable import GranaryEngine
import GranaryTransport
import GranaryTestSupport
import Testing

/// FaRM's parallel record processing: a node's incoming logs are served by several threads at
/// once, each ring a lane with a claim of its own, and no node-wide claim on the hot path.
@Suite("Parallel record processing")
struct ParallelRecordProcessingTests {
    @Test("a coordinator's records are handled at a primary while another coordinator's lane there is held")
    func lanesAreServedIndependently() async throws {
        let cluster = try await testCluster()
        // An object whose primary is n0 (a node allocates in the regions it leads).
        let object = try await cluster.nodes[0].transaction { try $0.allocate(Int64(0)) }
        try await cluster.quiesce()
        let primary = cluster.nodes[0].engine.mailbox
        // A thread holds the lane of n2's log at n0, as a thread stalled in it would.
        let held = Shared(false), release = Shared(false)
        let holder = Thread {
            _ = primary.withLaneIfAvailable(NodeID(2), kind: .log) { _ in
                held.withLock { $0 = true }
                while !release.value { usleep(100) }
            }
        }
        holder.start()
        while !held.value { try await Task.sleep(for: .milliseconds(1)) }
        func write(from node: Int, _ outcome: Shared<String?>, _ body: @escaping @Sendable (Transaction) throws -> Void) {
            Thread {
                do {
                    try cluster.nodes[node].engine.run(body)
                    outcome.withLock { $0 = "committed" }
                } catch {
                    outcome.withLock { $0 = "\(error)" }
                }
            }.start()
        }
        // n2's increment: its LOCK waits in the held lane. n1's write: its LOCK and
        // COMMIT-PRIMARY at n0 are in n1's lane, which nobody holds.
        let fromN2 = Shared<String?>(nil), fromN1 = Shared<String?>(nil)
        write(from: 2, fromN2) { tx in try tx.write(object, try tx.read(object, as: Int64.self) + 10) }
        try await Task.sleep(for: .milliseconds(50))
        write(from: 1, fromN1) { tx in try tx.write(object, Int64(1)) }
        let start = ContinuousClock.now
        while fromN1.value == nil, ContinuousClock.now - start < .seconds(5) { try await Task.sleep(for: .milliseconds(1)) }
        #expect(fromN1.value == "committed",
                "n1's write did not commit within 5 s while n2's lane at n0 was held: \(fromN1.value ?? "still waiting"); n0: \(cluster.nodes[0].engine.channelReport)")
        #expect(fromN2.value == nil, "n2's write ended while its lane at the primary was held: \(fromN2.value ?? "")")
        release.withLock { $0 = true }
        let released = ContinuousClock.now
        while fromN2.value == nil, ContinuousClock.now - released < .seconds(20) { try await Task.sleep(for: .milliseconds(1)) }
        #expect(fromN2.value == "committed", "n2's write after its lane was released: \(fromN2.value ?? "still waiting")")
        // n2's first attempt read 0 and its LOCK found n1's version: it ran again on 1.
        let value = try await cluster.nodes[0].transaction { try $0.read(object, as: Int64.self) }
        #expect(value == 11, "the object holds \(value), expected n1's 1 then n2's +10")
        try await cluster.quiesce()
        let differences = replicaDifferences(cluster)
        #expect(differences.isEmpty, "replicas differ after quiescence: \(differences)")
        try await cluster.shutdown()
    }
}
