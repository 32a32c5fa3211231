import Granary
@testable import GranaryEngine
import Testing

@Suite("Transactions: configuration ids")
struct ConfigurationIDTests {
    @Test("a LOCK record from another configuration is rejected: nothing locked, a failure reply, a count")
    func foreignConfigurationRejected() async throws {
        let cluster = try await testCluster()
        let object = try await cluster.nodes[0].transaction { try $0.allocate(Int64(5)) }
        try await cluster.quiesce()  // the primary has installed the allocation
        let primary = cluster.nodes[cluster.configuration.placement(of: object.region)!.primary.index].engine
        let header = ObjectLayout.loadHeader(primary.replica(of: object.region)!.base + Int(object.offset))
        let coordinator = cluster.nodes.first { $0.engine !== primary }!.engine
        // A well-formed LOCK of the object, stamped with configuration 7 instead of 1.
        let id = coordinator.replies.acquire(node: coordinator.node, replies: 1)!
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 256, alignment: 8)
        defer { buffer.deallocate() }
        var writer = RecordWriter(into: buffer, capacity: 256, kind: .lock, configuration: ConfigurationID(rawValue: 7), transaction: id)
        var value: Int64 = 99
        writer.appendEntry(address: object, expected: header, new: header.nextVersion, lines: 0, operation: .write, payload: &value, length: 8)
        let before = primary.statistics.snapshot.rejectedRecords
        try coordinator.send(writer.bytes, to: primary.node)
        let failure = coordinator.replies.wait(id, timeoutNanoseconds: 5_000_000_000) {
            primary.pollOnce() + coordinator.pollOnce()
        }
        coordinator.replies.release(id)
        #expect(failure == AbortCause.wrongConfiguration.rawValue, "reply cause \(String(describing: failure))")
        #expect(primary.statistics.snapshot.rejectedRecords == before + 1)
        #expect(ObjectLayout.loadHeader(primary.replica(of: object.region)!.base + Int(object.offset)) == header, "the object changed")
        #expect(try await cluster.nodes[2].transaction { try $0.read(object, as: Int64.self) } == 5)
        #expect(ConfigurationError.wrongConfiguration(found: ConfigurationID(rawValue: 7), expected: ConfigurationID(rawValue: 1), from: coordinator.node)
            .description.contains("config#7"))
        try await cluster.shutdown()
    }
}
