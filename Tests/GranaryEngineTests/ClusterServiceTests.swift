import Foundation
import Granary
import GranaryTestSupport
import Logging
import ServiceLifecycle
import Testing

@Suite("Cluster as a service")
struct ClusterServiceTests {
    @Test("a ServiceGroup's graceful shutdown shuts the cluster down: nodes stop, committed data persists and reopens")
    func gracefulShutdown() async throws {
        let tmp = TemporaryDirectory("granary-service")
        defer { tmp.remove() }
        var options = ClusterOptions()
        options.regionSize = 1 << 20
        options.logger.logLevel = .error
        let directory = tmp.path.appending("cluster")
        let cluster = try await Cluster.local(directory: directory, options: options)
        let object = try await cluster.nodes[0].transaction { try $0.allocate(Int64(7)) }
        let group = ServiceGroup(configuration: .init(services: [.init(service: ClusterService(cluster: cluster))],
                                                      logger: Logger(label: "test")))
        let running = Task { try await group.run() }
        try await Task.sleep(for: .milliseconds(50))
        #expect(cluster.nodes.allSatisfy { $0.engine.isRunning })
        await group.triggerGracefulShutdown()
        try await running.value
        #expect(cluster.nodes.allSatisfy { !$0.engine.isRunning }, "a node still runs after the group's graceful shutdown")
        let reopened = try await Cluster.local(directory: directory, options: options)
        #expect(try await reopened.nodes[2].transaction { try $0.read(object, as: Int64.self) } == 7)
        try await reopened.shutdown()
    }

    @Test("a cancelled task starts no transaction: CancellationError, and the body never runs")
    func cancelledTask() async throws {
        let cluster = try await testCluster()
        let ran = Shared(false)
        let node = cluster.nodes[0]
        let task = Task { () async throws -> Int64 in
            while !Task.isCancelled { await Task.yield() }
            return try await node.transaction { _ in
                ran.withLock { $0 = true }
                return 1
            }
        }
        task.cancel()
        await #expect(throws: CancellationError.self) { try await task.value }
        #expect(ran.value == false, "the body ran in a cancelled task")
        try await cluster.shutdown()
    }
}
