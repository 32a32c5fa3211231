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

    /// Runs `granary ARGUMENTS` to its end; its status and its output (standard output and error).
    func granary(_ arguments: [String]) throws -> (Int32, String) {
        let process = Process()
        process.executableURL = try ChildProcess.granaryExecutable()
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        return (process.terminationStatus, output)
    }

    @Test("""
        a coordinated cluster whose node processes are all SIGKILLed during a client's increments (the client \
        crashing with them) starts again with `cluster up`: restart recovery over every log, the nodes resume \
        as the stored members, a new client finds the counters equal, holding every acknowledged increment, \
        and nothing locked
        """)
    func wholeClusterRestart() async throws {
        let tmp = TemporaryDirectory("granary-whole")
        defer { tmp.remove() }
        let directory = tmp.path.string, file = directory + "/cluster.json"
        var (status, output) = try granary(["cluster", "init", "--directory", directory, "--nodes", "3", "--clients", "1", "--region-mib", "1"])
        #expect(status == 0, "cluster init: \(output)")
        (status, output) = try granary(["cluster", "up", "--directory", directory, "--coordination", "zookeeper://\(zooKeeper!)"])
        try #require(status == 0, "cluster up: \(output)")
        defer { _ = try? granary(["cluster", "down", "--directory", directory, "--timeout", "5"]) }

        var options = ClusterOptions()
        options.coordination = .zookeeper(zooKeeper!)
        options.membership = MembershipOptions()
        options.engine.replyTimeout = .seconds(2)
        var first: Cluster? = try await Cluster.connect(file: FilePath(file), options: options)
        let client = first!.nodes[0]
        let counters = try client.transactionSync { tx in try (0..<4).map { _ in try tx.allocate(Int64(0)) } }
        let acked = Atomic<Int>(0), unknown = Atomic<Int>(0), stop = Atomic<Bool>(false)
        let committer = Thread {
            while !stop.load(ordering: .acquiring) {
                do {
                    try client.transactionSync { tx in
                        for counter in counters { try tx.write(counter, try tx.read(counter, as: Int64.self) + 1) }
                    }
                    acked.add(1, ordering: .releasing)
                } catch TransactionError.outcomeUnknown, TransactionError.shutDown {
                    unknown.add(1, ordering: .releasing)
                    return
                } catch {
                    unknown.add(1, ordering: .releasing)  // after the kill nothing is certain
                    if stop.load(ordering: .acquiring) { return }
                }
            }
        }
        committer.start()
        while acked.load(ordering: .acquiring) < 300 { try await Task.sleep(for: .milliseconds(2)) }
        // The whole cluster at once: every node process, then the client (its process would go
        // with its coordination session; here the session is closed).
        let configuration = try JSONDecoder().decode(Configuration.self, from: Data(contentsOf: URL(fileURLWithPath: file)))
        for node in configuration.servers {
            let pid = pid_t(try String(contentsOfFile: directory + "/\(node).pid", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines))!
            kill(pid, SIGKILL)
        }
        first!.crash(client.id)
        let ok = acked.load(ordering: .acquiring)
        stop.store(true, ordering: .releasing)
        while !committer.isFinished { try await Task.sleep(for: .milliseconds(5)) }
        let maybe = unknown.load(ordering: .acquiring)
        await first!.membership[0].coordinationStore.close()
        first = nil  // its client lock goes with it
        try await Task.sleep(for: .milliseconds(200))

        (status, output) = try granary(["cluster", "up", "--directory", directory, "--coordination", "zookeeper://\(zooKeeper!)"])
        try #require(status == 0, "cluster up after the kill: \(output)")
        #expect(output.contains("recovered:"), "no restart recovery in: \(output)")
        let second = try await Cluster.connect(file: FilePath(file), options: options)
        let values = try second.nodes[0].transactionSync { tx in try counters.map { try tx.read($0, as: Int64.self) } }
        #expect(Set(values).count == 1, "the counters differ (a transaction half applied): \(values)")
        #expect(Int(values[0]) >= ok && Int(values[0]) <= ok + maybe,
                "the counters hold \(values[0]) after the restart, but \(ok) increments were acknowledged and \(maybe) had unknown outcomes")
        // Nothing stays locked: every counter can be written again.
        try second.nodes[0].transactionSync { tx in
            for counter in counters { try tx.write(counter, try tx.read(counter, as: Int64.self) + 1) }
        }
        try await second.shutdown()
    }

    @Test("""
        a cluster file that names its coordination store and lease (cluster init --coordination --lease-ms) \
        is all it takes: cluster up starts coordinated nodes, and Cluster.connect(file:) with default options \
        joins as a client with that lease, commits, and leaves
        """)
    func coordinationFromTheClusterFile() async throws {
        let tmp = TemporaryDirectory("granary-file-coordination")
        defer { tmp.remove() }
        let directory = tmp.path.appending("c").string
        let executable = try ChildProcess.granaryExecutable()
        let initialize = try ChildProcess(executable, ["cluster", "init", "--directory", directory, "--nodes", "3", "--clients", "1",
                                                       "--region-mib", "1", "--coordination", "zookeeper://\(zooKeeper!)", "--lease-ms", "20"])
        #expect(initialize.waitForExit() == 0, "cluster init: \(initialize.remainingLines())")
        let file = directory + "/cluster.json"
        let written = try ClusterFile.load(file)
        #expect(written.coordination == "zookeeper://\(zooKeeper!)" && written.leaseMilliseconds == 20, "the file holds \(written)")
        let up = try ChildProcess(executable, ["cluster", "up", "--directory", directory])
        let status = up.waitForExit()
        #expect(status == 0, "cluster up exited \(status): \(up.remainingLines())")
        defer { _ = try? ChildProcess(executable, ["cluster", "down", "--directory", directory]).waitForExit() }
        let store = try ZooKeeperStore(connectString: zooKeeper!)
        func current() async throws -> Configuration { try await ConfigurationRecord.read(written.configuration.cluster, from: store).0 }
        let start = Date()
        while (try? await current())?.manager == nil, Date().timeIntervalSince(start) < 30 { try await Task.sleep(for: .milliseconds(10)) }
        #expect(try await current().manager != nil, "no configuration manager runs: the nodes did not take the file's coordination store")

        let cluster = try await Cluster.connect(file: FilePath(file))
        #expect(cluster.membership.first?.options.lease == .milliseconds(20), "the client's lease is \(String(describing: cluster.membership.first?.options.lease))")
        let joined = try await current()
        #expect(joined.clients == [NodeID(3)], "the client did not join the stored configuration: \(joined)")
        let counter = try await cluster.nodes[0].transaction { tx in try tx.allocate(Int64(41)) }
        let value = try await cluster.nodes[0].transaction { tx -> Int64 in
            let value = try tx.read(counter, as: Int64.self) + 1
            try tx.write(counter, value)
            return value
        }
        #expect(value == 42)
        try await cluster.shutdown()
        let left = Date()
        while (try? await current())?.contains(NodeID(3)) ?? true, Date().timeIntervalSince(left) < 10 { try await Task.sleep(for: .milliseconds(10)) }
        #expect(try await !current().contains(NodeID(3)), "the client is still a member after shutdown")
        await store.close()
    }
}
