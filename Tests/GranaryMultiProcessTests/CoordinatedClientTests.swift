import Foundation
import Granary
import GranaryTestSupport
import Synchronization
import Testing

/// A client (a member that holds no region) of node processes that run the configuration manager
/// through a real ZooKeeper: it joins, follows configurations and leaves.
@Suite("Clients of node processes over ZooKeeper",
       .enabled(if: zooKeeper != nil, "no ZooKeeper server: set GRANARY_ZOOKEEPER=host:port or run Scripts/test zookeeper"))
struct CoordinatedClientTests {
    @Test("""
        a client joins a coordinated cluster of 3 node processes (no region placed on it), keeps committing \
        through the SIGKILL of a primary, its removal and its restart (it rejoins, its replicas copied back), \
        and leaves on shutdown; every counter equals the others and counts each acknowledged increment
        """)
    func clientThroughKillAndRejoin() async throws {
        let tmp = TemporaryDirectory("granary-client")
        defer { tmp.remove() }
        let nodes = (0..<3).map { NodeID($0) }
        let client = NodeID(3)
        let configuration = try Configuration(
            id: ConfigurationID(rawValue: 1), cluster: ClusterID.random(),
            members: nodes.map { Member(node: $0, endpoint: "shm:" + tmp.path.appending($0.description).string) }
                + [Member(node: client, endpoint: "shm:" + tmp.path.appending(client.description).string, client: true)],
            regions: Configuration.balancedPlacement(nodes: nodes, regionsPerNode: 1, replicas: 3), regionSize: 1 << 20)
        let file = tmp.path.appending("cluster.json").string
        try JSONEncoder().encode(configuration).write(to: URL(fileURLWithPath: file))
        func start(_ node: NodeID) throws -> ChildProcess {
            try ChildProcess(ChildProcess.granaryExecutable(),
                             ["node", "--config", file, "--id", "\(node.index)", "--coordination", "zookeeper://\(zooKeeper!)", "--lease-ms", "10"])
        }
        var lives = try nodes.map { [try start($0)] }
        defer { for life in lives { for child in life where child.process.isRunning { child.kill() } } }
        for life in lives { #expect(try life[0].readLine(timeout: 60).hasPrefix("ready ")) }

        let store = try ZooKeeperStore(connectString: zooKeeper!)
        func current() async throws -> Configuration { try await ConfigurationRecord.read(configuration.cluster, from: store).0 }
        func waitFor(_ what: String, timeout: Double = 60, _ condition: (Configuration) -> Bool) async throws {
            let start = Date()
            while true {
                if let now = try? await current(), condition(now) { return }
                guard Date().timeIntervalSince(start) < timeout else {
                    Issue.record("timed out after \(timeout) s waiting for: \(what); configuration \(try await current())")
                    throw ChildProcessError("timed out waiting for \(what)")
                }
                try await Task.sleep(for: .milliseconds(5))
            }
        }
        // The stored configuration starts without the client: it joins when it connects.
        try await waitFor("a CM") { $0.manager != nil }
        let initial = try await current()
        #expect(!initial.contains(client), "the client is a member before it connected: \(initial)")

        var options = ClusterOptions()
        options.coordination = .zookeeper(zooKeeper!)
        options.membership = MembershipOptions()
        options.engine.replyTimeout = .seconds(2)
        let cluster = try await Cluster.connect(file: FilePath(file), options: options)
        let joined = try await current()
        #expect(joined.clients == [client], "the client did not join as a client: \(joined)")
        #expect(joined.regions.allSatisfy { !$0.replicas.contains(client) }, "a region placed on the client: \(joined)")
        #expect(joined.manager != client)

        let counters = try cluster.nodes[0].transactionSync { tx in try (0..<4).map { _ in try tx.allocate(Int64(0)) } }
        let acked = Atomic<Int>(0), unknown = Atomic<Int>(0), stop = Atomic<Bool>(false)
        let failures = Mutex<[String]>([])
        let committer = Thread {
            while !stop.load(ordering: .acquiring) {
                do {
                    try cluster.nodes[0].transactionSync { tx in
                        for counter in counters { try tx.write(counter, try tx.read(counter, as: Int64.self) + 1) }
                    }
                    acked.add(1, ordering: .releasing)
                } catch TransactionError.outcomeUnknown {
                    unknown.add(1, ordering: .releasing)
                } catch {
                    failures.withLock { $0.append("\(error)") }
                    usleep(1_000)
                }
            }
        }
        committer.start()
        func waitForCommits(_ count: Int, _ what: String) async throws {
            let start = Date(), target = acked.load(ordering: .acquiring) + count
            while acked.load(ordering: .acquiring) < target {
                guard Date().timeIntervalSince(start) < 60 else {
                    Issue.record("the client committed \(acked.load(ordering: .acquiring)) of \(target) \(what); failures: \(failures.withLock { $0.suffix(5) })")
                    throw ChildProcessError("no commits \(what)")
                }
                try await Task.sleep(for: .milliseconds(5))
            }
        }
        try await waitForCommits(200, "before the kill")
        // SIGKILL the primary of the first counter's region: the client must follow its promotion.
        let victim = joined.regions.first { $0.region == counters[0].region }!.primary
        lives[victim.index].last!.kill(SIGKILL)
        try await waitFor("\(victim) removed", timeout: 10) { !$0.contains(victim) }
        try await waitForCommits(200, "after \(victim) was removed")
        lives[victim.index].append(try start(victim))
        try await waitFor("\(victim) back with every replica complete") { configuration in
            configuration.contains(victim) && configuration.regions.allSatisfy { $0.replicas.count == 3 && $0.copying.isEmpty }
        }
        try await waitForCommits(200, "after \(victim) rejoined")
        stop.store(true, ordering: .releasing)
        while !committer.isFinished { try await Task.sleep(for: .milliseconds(5)) }

        let values = try cluster.nodes[0].transactionSync { tx in try counters.map { try tx.read($0, as: Int64.self) } }
        let ok = acked.load(ordering: .acquiring), maybe = unknown.load(ordering: .acquiring)
        #expect(Set(values).count == 1, "the counters differ (a transaction half applied): \(values)")
        #expect(Int(values[0]) >= ok && Int(values[0]) <= ok + maybe,
                "the counters hold \(values[0]), but \(ok) increments were acknowledged and \(maybe) had unknown outcomes")
        try await cluster.shutdown()
        try await waitFor("the client gone after its shutdown", timeout: 10) { !$0.contains(client) }
        await store.close()
    }
}
