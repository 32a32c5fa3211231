import Foundation
import Granary
import GranaryTestSupport
import Testing

let zooKeeper = ProcessInfo.processInfo.environment["GRANARY_ZOOKEEPER"]

/// Node processes agreeing through a real ZooKeeper server: failure detection by leases,
/// reconfiguration, CM failover, fencing of a node that hung.
@Suite("Membership: node processes over ZooKeeper",
       .enabled(if: zooKeeper != nil, "no ZooKeeper server: set GRANARY_ZOOKEEPER=host:port or run Scripts/test zookeeper"))
struct ZooKeeperMembershipTests {
    @Test("SIGKILLed and SIGSTOPped nodes are removed in bounded time, a killed CM is replaced, a resumed node learns it must rejoin, ids only increase")
    func failures() async throws {
        let tmp = TemporaryDirectory("granary-zkm")
        defer { tmp.remove() }
        let nodes = (0..<4).map { NodeID($0) }
        let configuration = try Configuration(
            id: ConfigurationID(rawValue: 1), cluster: ClusterID.random(),
            members: nodes.map { Member(node: $0, endpoint: "shm:" + tmp.path.appending($0.description).string) },
            regions: Configuration.balancedPlacement(nodes: nodes, regionsPerNode: 1, replicas: 3), regionSize: 1 << 20)
        let file = tmp.path.appending("cluster.json").string
        try JSONEncoder().encode(configuration).write(to: URL(fileURLWithPath: file))
        let children = try nodes.map { node in
            try ChildProcess(ChildProcess.granaryExecutable(), [
                "node", "--config", file, "--id", "\(node.index)", "--coordination", "zookeeper://\(zooKeeper!)", "--lease-ms", "10",
            ])
        }
        defer { for child in children where child.process.isRunning { child.kill() } }
        let store = try ZooKeeperStore(connectString: zooKeeper!)
        var ids: [UInt64] = []
        func current() async throws -> Configuration {
            let (configuration, _) = try await ConfigurationRecord.read(configuration.cluster, from: store)
            if ids.last != configuration.id.rawValue { ids.append(configuration.id.rawValue) }
            return configuration
        }
        func waitFor(_ what: String, timeout: Double = 30, since start: Date = Date(), _ condition: (Configuration) -> Bool) async throws -> Double {
            while true {
                if condition(try await current()) { return Date().timeIntervalSince(start) }
                guard Date().timeIntervalSince(start) < timeout else {
                    Issue.record("timed out after \(timeout) s waiting for: \(what); configuration \(try await current())")
                    return timeout
                }
                try await Task.sleep(for: .milliseconds(1))
            }
        }
        for child in children { #expect(try child.readLine(timeout: 60).hasPrefix("ready ")) }
        // The nodes put the configuration into the store once they are up.
        for _ in 0..<3000 where try await !store.exists(MembershipPaths(cluster: configuration.cluster).configuration) {
            try await Task.sleep(for: .milliseconds(10))
        }
        _ = try await waitFor("a CM") { $0.manager != nil }
        let manager = try await current().manager!

        // A node dies.
        let killed = nodes.first { $0 != manager }!
        let killedAt = Date()
        children[killed.index].kill(SIGKILL)
        let killSeconds = try await waitFor("\(killed) removed", since: killedAt) { !$0.contains(killed) }
        print("membership over ZooKeeper: SIGKILLed \(killed) removed after \(String(format: "%.1f", killSeconds * 1000)) ms")
        #expect(killSeconds < 2, "removal took \(killSeconds) s")

        // A node hangs past its lease, then resumes: it is removed, and learns it must rejoin.
        let hung = nodes.first { $0 != manager && $0 != killed }!
        let hungAt = Date()
        kill(children[hung.index].process.processIdentifier, SIGSTOP)
        let hangSeconds = try await waitFor("\(hung) removed", since: hungAt) { !$0.contains(hung) }
        print("membership over ZooKeeper: SIGSTOPped \(hung) removed after \(String(format: "%.1f", hangSeconds * 1000)) ms")
        kill(children[hung.index].process.processIdentifier, SIGCONT)
        var line = ""
        let deadline = Date().addingTimeInterval(30)
        while !line.hasPrefix("must-rejoin"), Date() < deadline { line = (try? children[hung.index].readLine(timeout: 30)) ?? "" }
        #expect(line.hasPrefix("must-rejoin"), "the resumed node said: \(children[hung.index].transcript)")

        // The CM dies: the remaining node takes over and removes it.
        let managerKilledAt = Date()
        children[manager.index].kill(SIGKILL)
        let survivor = nodes.first { ![manager, killed, hung].contains($0) }!
        let failoverSeconds = try await waitFor("a new CM without \(manager)", since: managerKilledAt) { $0.manager == survivor && !$0.contains(manager) }
        print("membership over ZooKeeper: killed CM \(manager) replaced by \(survivor) after \(String(format: "%.1f", failoverSeconds * 1000)) ms")
        #expect(failoverSeconds < 2, "failover took \(failoverSeconds) s")
        #expect(ids == ids.sorted() && Set(ids).count == ids.count, "configuration ids seen: \(ids)")
        #expect(ids.count >= 4, "configuration ids seen: \(ids)")
        // `granary cluster status` reads the same configuration from the store.
        let status = try ChildProcess(ChildProcess.granaryExecutable(), [
            "cluster", "status", "--coordination", "zookeeper://\(zooKeeper!)", "--cluster", "\(configuration.cluster)",
        ])
        var lines: [String] = []
        while let line = try? status.readLine(timeout: 20) { lines.append(line) }
        #expect(lines.contains { $0.hasPrefix("configuration  ") }, "status printed: \(lines)")
        #expect(!lines.contains { $0.hasPrefix("  \(killed)  ") || $0.hasPrefix("  \(hung)  ") || $0.hasPrefix("  \(manager)  ") },
                "removed nodes are listed as members: \(lines)")
        #expect(lines.contains("manager        \(survivor)"), "status printed: \(lines)")
        #expect(lines.contains { $0.hasPrefix("under-replicated") }, "status printed: \(lines)")
        await store.close()
    }
}
