import Foundation
import Granary
@testable import GranaryCommand
import GranaryTestSupport
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A client (a member that holds no region) of node processes that run the configuration manager
/// through a real ZooKeeper: it joins, follows configurations and leaves.
@Suite("Clients of node processes over ZooKeeper",
       .enabled(if: zooKeeper != nil, "no ZooKeeper server: set GRANARY_ZOOKEEPER=host:port or run Scripts/test zookeeper"))
struct CoordinatedClientTests {
    @Test("""
        a client joins a coordinated cluster of 3 node processes (no region placed on it), keeps committing \
        through the SIGKILL of a primary, its removal and its restart (it rejoins, its replicas copied back), \
        and through its own removal (its lease lapsed: it rejoins by itself as a new incarnation), \
        and leaves on shutdown; every counter equals the others and counts each acknowledged increment
        """)
    func clientThroughKillAndRejoin() async throws {
        let tmp = TemporaryDirectory("granary-client")
        defer { tmp.remove() }
        let nodes = (0..<3).map { NodeID($0) }
        let client = NodeID(3)
        let cluster = try ClientCluster(nodes: nodes, client: client, in: tmp, scheme: "shm:", leaseMs: 10)
        defer { cluster.killAll() }
        let joined = try await cluster.current()
        let (connection, counters) = try await cluster.connect(replyTimeout: .seconds(2))
        #expect(joined.regions.allSatisfy { !$0.replicas.contains(client) }, "a region placed on the client: \(joined)")
        #expect(joined.manager != client)
        let increments = CounterIncrements(connection, counters: counters)
        try await increments.waitForCommits(200, "before the kill")
        // SIGKILL the primary of the first counter's region: the client must follow its promotion.
        let victim = joined.regions.first { $0.region == counters[0].region }!.primary
        cluster.lives[victim.index].last!.kill(SIGKILL)
        try await cluster.waitFor("\(victim) removed", timeout: 10) { !$0.contains(victim) }
        try await increments.waitForCommits(200, "after \(victim) was removed")
        cluster.lives[victim.index].append(try cluster.start(victim))
        try await cluster.waitFor("\(victim) back with every replica complete") { configuration in
            configuration.contains(victim) && configuration.regions.allSatisfy { $0.replicas.count == 3 && $0.copying.isEmpty }
        }
        try await increments.waitForCommits(200, "after \(victim) rejoined")
        try await cluster.lapseAndRejoin(connection, increments: increments)
        try await increments.waitForCommits(200, "after the client rejoined")
        try await increments.finish()
        try await connection.shutdown()
        try await cluster.waitFor("the client gone after its shutdown", timeout: 10) { !$0.contains(client) }
        await cluster.store.close()
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
        let restart = output
        let second = try await Cluster.connect(file: FilePath(file), options: options)
        // A failure shows what restart recovery did (its report counts the records it refused and
        // the locks it released) and the nodes' logs.
        func evidence() -> String {
            let logs = configuration.servers.map { node in
                "\(node).log:\n" + ((try? String(contentsOfFile: directory + "/\(node).log", encoding: .utf8)) ?? "(none)")
            }
            return "cluster up after the kill printed:\n\(restart)\n" + logs.joined(separator: "\n")
        }
        do {
            let values = try second.nodes[0].transactionSync { tx in try counters.map { try tx.read($0, as: Int64.self) } }
            #expect(Set(values).count == 1, "the counters differ (a transaction half applied): \(values)\n\(evidence())")
            #expect(Int(values[0]) >= ok && Int(values[0]) <= ok + maybe,
                    "the counters hold \(values[0]) after the restart, but \(ok) increments were acknowledged and \(maybe) had unknown outcomes")
            // Nothing stays locked: every counter can be written again.
            try second.nodes[0].transactionSync { tx in
                for counter in counters { try tx.write(counter, try tx.read(counter, as: Int64.self) + 1) }
            }
        } catch {
            Issue.record("after the restart: \(error)\n\(evidence())")
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

    @Test("""
        cluster up of 3 coordinated nodes with metrics, bench transfer --cluster through a client, SIGTERM of a \
        member during the run: it leaves (says so, exits 0) and is removed without a suspicion, the others stay, \
        the bench goes on and its invariant holds (no lock left); cluster status shows the configuration without \
        it and the others' records per second from their metrics; cluster down stops the rest
        """)
    func memberLeavesDuringBench() async throws {
        let tmp = TemporaryDirectory("granary-leave-under-bench")
        defer { tmp.remove() }
        let directory = tmp.path.appending("c").string
        let executable = try ChildProcess.granaryExecutable()
        let initialize = try ChildProcess(executable, ["cluster", "init", "--directory", directory, "--nodes", "3", "--clients", "1",
                                                       "--region-mib", "4", "--coordination", "zookeeper://\(zooKeeper!)",
                                                       // Leases of 10 ms lapse now and then on this 2-core machine while
                                                       // the client loads (a false suspicion, then a rejoin): this test is
                                                       // about a member that leaves.
                                                       "--lease-ms", "100"])
        #expect(initialize.waitForExit() == 0, "cluster init: \(initialize.remainingLines())")
        let file = directory + "/cluster.json"
        let cluster = try ClusterFile.load(file).configuration.cluster
        let up = try ChildProcess(executable, ["cluster", "up", "--directory", directory,
                                               "--metrics-port-base", "\(Int.random(in: 20_000...40_000))"])
        let upStatus = up.waitForExit()
        #expect(upStatus == 0, "cluster up exited \(upStatus): \(up.remainingLines())")
        defer { _ = try? ChildProcess(executable, ["cluster", "down", "--directory", directory]).waitForExit() }
        let store = try ZooKeeperStore(connectString: zooKeeper!)
        func current() async throws -> Configuration { try await ConfigurationRecord.read(cluster, from: store).0 }
        let start = Date()
        while (try? await current())?.manager == nil, Date().timeIntervalSince(start) < 30 { try await Task.sleep(for: .milliseconds(10)) }

        let bench = try ChildProcess(executable, ["bench", "transfer", "--cluster", file, "--accounts", "2000", "--seconds", "4",
                                                  "--quiet", "--no-adaptive-workers"])
        // Into the measured run: the client has joined (the configuration lists it).
        let joinedBy = Date()
        while (try? await current())?.clients.isEmpty ?? true, Date().timeIntervalSince(joinedBy) < 60 {
            try await Task.sleep(for: .milliseconds(20))
        }
        try await Task.sleep(for: .seconds(3))
        let before = try await current()
        #expect(before.clients == [NodeID(3)], "before the SIGTERM: \(before)")
        // A member that is not the CM (the CM's own departure is a take-over, RejoinTests).
        let holders = before.members.filter { !$0.client }.map(\.node)
        let victim = try #require(holders.first { $0 != before.manager })
        let survivors = holders.filter { $0 != victim }
        let pid = try #require(ClusterDown.runningPid(directory: directory, node: victim.index), "\(victim) does not run")
        kill(pid, SIGTERM)
        let termAt = Date()
        while (try? await current())?.contains(victim) ?? true, Date().timeIntervalSince(termAt) < 15 {
            try await Task.sleep(for: .milliseconds(5))
        }
        let after = try await current()
        #expect(!after.contains(victim), "\(victim) is still a member 15 s after SIGTERM: \(after)")
        #expect(survivors.allSatisfy { after.contains($0) } && after.contains(NodeID(3)),
                "members other than \(victim) went with it: \(before) -> \(after)")
        let exitBy = Date()
        while kill(pid, 0) == 0, Date().timeIntervalSince(exitBy) < 15 { try await Task.sleep(for: .milliseconds(10)) }
        #expect(kill(pid, 0) != 0, "\(victim) (process \(pid)) still runs 15 s after SIGTERM")
        let victimLog = try String(contentsOfFile: directory + "/\(victim).log", encoding: .utf8)
        #expect(victimLog.split(separator: "\n").contains { $0.hasPrefix("left ") }, "\(victim) did not say it left: \(victimLog.suffix(800))")
        // Left, not suspected: the CM removed it for its withdrawn registration, not a lapsed lease.
        let logs = try survivors.map { try String(contentsOfFile: directory + "/\($0).log", encoding: .utf8) }
        #expect(!logs.contains { $0.contains("removed \(victim) (lease expired") }, "\(victim) was suspected: \(logs.map { $0.suffix(600) })")
        #expect(logs.contains { $0.contains("removed \(victim) (its registration is gone)") }, "no CM removed \(victim) for leaving: \(logs.map { $0.suffix(600) })")

        let benchStatus = bench.waitForExit()
        let said = bench.remainingLines()
        #expect(benchStatus == 0, "bench --cluster exited \(benchStatus) after n2 left: \(said)")
        #expect(said.contains("invariant: holds") || said.contains { $0.hasPrefix("invariant: holds") }, "\(said)")

        let status = try ChildProcess(executable, ["cluster", "status", "--directory", directory, "--interval", "0.5"])
        #expect(status.waitForExit() == 0)
        let shown = status.remainingLines()
        let memberLines = shown.drop { $0 != "members" }.dropFirst().prefix { $0.hasPrefix("  ") }
        let survivor = survivors[0]
        #expect(!memberLines.contains { $0.hasPrefix("  \(victim) ") } && memberLines.contains { $0.hasPrefix("  \(survivor) ") },
                "cluster status lists: \(shown)")
        #expect(shown.contains { $0.hasPrefix("  \(survivor)  process") && $0.contains("records ") }, "no metrics read from \(survivor): \(shown)")
        #expect(shown.contains { $0.hasPrefix("  \(victim)  not running") }, "\(victim)'s process is not shown as gone: \(shown)")
        await store.close()
    }
}

/// Node processes with the CM over ZooKeeper and one client member (not running yet), for the
/// client tests: the processes each node ran, the stored configuration, and waits on it.
final class ClientCluster {
    let configuration: Configuration
    let file: String
    let client: NodeID
    let leaseMs: Int
    let verbs: Bool
    let store: ZooKeeperStore
    /// Every process each node ran, in order.
    var lives: [[ChildProcess]] = []

    init(nodes: [NodeID], client: NodeID, in tmp: TemporaryDirectory, scheme: String, leaseMs: Int) throws {
        self.client = client
        self.leaseMs = leaseMs
        verbs = scheme == "verbs:"
        configuration = try Configuration(
            id: ConfigurationID(rawValue: 1), cluster: ClusterID.random(),
            members: nodes.map { Member(node: $0, endpoint: scheme + tmp.path.appending($0.description).string) }
                + [Member(node: client, endpoint: scheme + tmp.path.appending(client.description).string, client: true)],
            regions: Configuration.balancedPlacement(nodes: nodes, regionsPerNode: 1, replicas: 3), regionSize: 1 << 20)
        file = tmp.path.appending("cluster.json").string
        try JSONEncoder().encode(configuration).write(to: URL(fileURLWithPath: file))
        store = try ZooKeeperStore(connectString: zooKeeper!)
        lives = try nodes.map { [try start($0)] }
        for life in lives { #expect(try life[0].readLine(timeout: 120).hasPrefix("ready ")) }
    }

    func start(_ node: NodeID) throws -> ChildProcess {
        try ChildProcess(ChildProcess.granaryExecutable(),
                         ["node", "--config", file, "--id", "\(node.index)", "--coordination", "zookeeper://\(zooKeeper!)", "--lease-ms", "\(leaseMs)"]
                            + (verbs ? ["--device", rdmaDevice!] : []))
    }

    deinit { killAll() }

    func killAll() {
        for life in lives { for child in life where child.process.isRunning { child.kill() } }
    }

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

    /// Connects the client (it joins: the stored configuration starts without it) and allocates
    /// four counters through it.
    func connect(replyTimeout: Duration) async throws -> (Cluster, [GlobalAddress]) {
        try await waitFor("a CM") { $0.manager != nil }
        let initial = try await current()
        #expect(!initial.contains(client), "the client is a member before it connected: \(initial)")
        var options = ClusterOptions()
        options.coordination = .zookeeper(zooKeeper!)
        var membership = MembershipOptions()
        membership.lease = .milliseconds(leaseMs)
        options.membership = membership
        options.engine.replyTimeout = replyTimeout
        // Over verbs the nodes run in an emulated guest, where each recovery takes seconds and an
        // admission took 18-33 s (once over 30 s, the default).
        if verbs { options.admissionTimeout = .seconds(120) }
        let connection = try await Cluster.connect(file: FilePath(file), options: options)
        let joined = try await current()
        #expect(joined.clients == [client], "the client did not join as a client: \(joined)")
        let counters = try connection.nodes[0].transactionSync { tx in try (0..<4).map { _ in try tx.allocate(Int64(0)) } }
        return (connection, counters)
    }

    /// The client's own lease lapses (its lease thread held off, as on a loaded host): the CM
    /// removes it, and it must join again by itself as a new incarnation, on a new engine.
    func lapseAndRejoin(_ connection: Cluster, increments: CounterIncrements) async throws {
        let before = try await current()
        let formerEngine = connection.nodes[0].engine, formerService = connection.membership[0]
        let lapsed = Date()
        formerService.haltLeases()
        while !(connection.membership[0] !== formerService && connection.nodes[0].engine !== formerEngine
                && connection.nodes[0].engine.configuration.contains(client) && !connection.nodes[0].engine.commitsBlocked) {
            // (Over verbs, in the emulated guest, an admission took 18-33 s.)
            let bound: Double = verbs ? 120 : 60
            guard Date().timeIntervalSince(lapsed) < bound else {
                Issue.record("the client was not back \(Int(bound)) s after its lease lapsed: must rejoin \(formerService.mustRejoin), a new service \(connection.membership[0] !== formerService), a new engine \(connection.nodes[0].engine !== formerEngine), in \(connection.nodes[0].engine.configuration); the store holds \(try await current()); failures \(increments.failures.withLock { $0.suffix(5) })")
                throw ChildProcessError("the client did not rejoin")
            }
            try await Task.sleep(for: .milliseconds(5))
        }
        let after = try await current()
        print("client: removed after its lease lapsed and admitted again as a new incarnation in \(Int(Date().timeIntervalSince(lapsed) * 1000)) ms (\(before.id) -> \(after.id))")
        #expect(formerService.mustRejoin, "the client's former incarnation was not told to rejoin")
        #expect(after.contains(client) && after.id.rawValue >= before.id.rawValue + 2,
                "the client was not removed and added again: \(before) -> \(after)")
    }
}

/// A thread that increments every one of `counters` in each transaction through a client, and
/// counts the acknowledged and the unknown outcomes; ``finish()`` stops it and checks that the
/// counters are equal and hold every acknowledged increment (and no more than the unknown ones).
final class CounterIncrements: Sendable {
    let acked = Atomic<Int>(0), unknown = Atomic<Int>(0)
    let failures = Mutex<[String]>([])
    private let stop = Atomic<Bool>(false), finished = Atomic<Bool>(false)
    private let cluster: Cluster
    private let counters: [GlobalAddress]

    init(_ cluster: Cluster, counters: [GlobalAddress]) {
        self.cluster = cluster
        self.counters = counters
        Thread.detachNewThread { [self] in
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
            finished.store(true, ordering: .releasing)
        }
    }

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

    func finish() async throws {
        stop.store(true, ordering: .releasing)
        while !finished.load(ordering: .acquiring) { try await Task.sleep(for: .milliseconds(5)) }
        let values = try cluster.nodes[0].transactionSync { tx in try counters.map { try tx.read($0, as: Int64.self) } }
        let ok = acked.load(ordering: .acquiring), maybe = unknown.load(ordering: .acquiring)
        #expect(Set(values).count == 1, "the counters differ (a transaction half applied): \(values)")
        #expect(Int(values[0]) >= ok && Int(values[0]) <= ok + maybe,
                "the counters hold \(values[0]), but \(ok) increments were acknowledged and \(maybe) had unknown outcomes")
    }
}
