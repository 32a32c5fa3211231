import Foundation
import Granary
import GranaryTestSupport
import Testing

let zooKeeper = ProcessInfo.processInfo.environment["GRANARY_ZOOKEEPER"]

/// A cluster of node processes over shared memory, each in its directory under `tmp`: one region
/// led by each node, 3 replicas of 1 MiB; its configuration written to `cluster.json` there.
func nodeProcessCluster(_ nodes: [NodeID], in tmp: TemporaryDirectory, scheme: String = "shm:") throws -> (Configuration, String) {
    let configuration = try Configuration(
        id: ConfigurationID(rawValue: 1), cluster: ClusterID.random(),
        members: nodes.map { Member(node: $0, endpoint: scheme + tmp.path.appending($0.description).string) },
        regions: Configuration.balancedPlacement(nodes: nodes, regionsPerNode: 1, replicas: 3), regionSize: 1 << 20)
    let file = tmp.path.appending("cluster.json").string
    try JSONEncoder().encode(configuration).write(to: URL(fileURLWithPath: file))
    return (configuration, file)
}

/// Node processes agreeing through a real ZooKeeper server: failure detection by leases,
/// reconfiguration, CM failover, fencing of a node that hung.
@Suite("Membership: node processes over ZooKeeper",
       .enabled(if: zooKeeper != nil, "no ZooKeeper server: set GRANARY_ZOOKEEPER=host:port or run Scripts/test zookeeper"))
struct ZooKeeperMembershipTests {
    @Test("SIGKILLed and SIGSTOPped nodes are removed in bounded time, a resumed node changes no data and learns it must rejoin, a killed CM is replaced, ids only increase")
    func failures() async throws {
        let tmp = TemporaryDirectory("granary-zkm")
        defer { tmp.remove() }
        let nodes = (0..<4).map { NodeID($0) }
        let (configuration, file) = try nodeProcessCluster(nodes, in: tmp)
        // Every node allocates bank accounts; only the node the test picks to hang transfers (its
        // go file is the only one created), so any change after its removal would be its doing.
        let accountsPerNode = 8
        let children = try nodes.map { node in
            try ChildProcess(ChildProcess.granaryExecutable(), [
                "node", "--config", file, "--id", "\(node.index)", "--coordination", "zookeeper://\(zooKeeper!)", "--lease-ms", "10",
                // Removed nodes stay out (the rejoin test below has them come back).
                "--no-rejoin", "--bank-accounts", "\(accountsPerNode)", "--bank-transfers", "100000000", "--bank-pause-microseconds", "500",
                "--bank-start-file", tmp.path.appending("go-\(node.index)").string,
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
        for child in children { #expect(try child.readLine(until: { $0.hasPrefix("accounts ") }, timeout: 60) == "accounts \(accountsPerNode)") }
        let accounts = try NodeCommandBank.accounts(configuration)
        #expect(accounts.count == nodes.count * accountsPerNode)
        // The nodes put the configuration into the store once they are up.
        for _ in 0..<3000 where try await !store.exists(MembershipPaths(cluster: configuration.cluster).configuration) {
            try await Task.sleep(for: .milliseconds(10))
        }
        _ = try await waitFor("a CM") { $0.manager != nil }
        let manager = try await current().manager!

        // A node hangs past its lease while it transfers money, then resumes: it is removed, its
        // records are refused, it changes no data, and it learns it must rejoin.
        let hung = nodes.first { $0 != manager }!
        _ = FileManager.default.createFile(atPath: tmp.path.appending("go-\(hung.index)").string, contents: nil)
        try await Task.sleep(for: .milliseconds(300))  // transfers under way
        let hungAt = Date()
        kill(children[hung.index].process.processIdentifier, SIGSTOP)
        let hangSeconds = try await waitFor("\(hung) removed", since: hungAt) { !$0.contains(hung) }
        print("membership over ZooKeeper: SIGSTOPped \(hung) removed after \(String(format: "%.1f", hangSeconds * 1000)) ms")
        let removal = try await current()
        // Once every survivor runs the configuration without it (backups of its regions promoted,
        // their kept records applied), the balances are what the hung node left.
        for node in nodes where node != hung {
            let line = try children[node.index].readLine(until: { Self.applied($0, atLeast: removal.id) }, timeout: 30)
            #expect(Self.applied(line, atLeast: removal.id), "\(node) said: \(children[node.index].transcript)")
        }
        let before = try Self.balances(accounts, in: removal)
        kill(children[hung.index].process.processIdentifier, SIGCONT)
        var heard: [String] = []
        let deadline = Date().addingTimeInterval(30)
        while !(heard.contains { $0.hasPrefix("must-rejoin") } && heard.contains { $0.hasPrefix("transfer-refused") }), Date() < deadline {
            if let line = try? children[hung.index].readLine(timeout: 30) { heard.append(line) }
        }
        #expect(heard.contains { $0.hasPrefix("must-rejoin") }, "the resumed node said: \(children[hung.index].transcript)")
        #expect(heard.contains { $0.hasPrefix("transfer-refused") }, "the resumed node said: \(children[hung.index].transcript)")
        print("membership over ZooKeeper: the resumed node said \(heard.filter { $0.hasPrefix("must-rejoin") || $0.hasPrefix("transfer-refused") })")
        try await Task.sleep(for: .milliseconds(200))
        let after = try Self.balances(accounts, in: removal)
        let changed = accounts.indices.filter { before[$0] != after[$0] }
        #expect(changed.isEmpty, "the removed node changed \(changed.map { "\(accounts[$0]): \(before[$0]) -> \(after[$0])" })")

        // A node dies.
        let killed = nodes.first { $0 != manager && $0 != hung }!
        let killedAt = Date()
        children[killed.index].kill(SIGKILL)
        let killSeconds = try await waitFor("\(killed) removed", since: killedAt) { !$0.contains(killed) }
        print("membership over ZooKeeper: SIGKILLed \(killed) removed after \(String(format: "%.1f", killSeconds * 1000)) ms")
        #expect(killSeconds < 2, "removal took \(killSeconds) s")

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

    /// Whether `line` is a membership event saying a configuration at least `id` was applied.
    static func applied(_ line: String, atLeast id: ConfigurationID) -> Bool {
        guard line.hasPrefix("configuration "), let value = UInt64(line.dropFirst("configuration ".count)) else { return false }
        return value >= id.rawValue
    }

    /// Each account's balance at its primary in `configuration`, read from the replica's region file
    /// (a mapping of the same file the primary's process works on).
    static func balances(_ accounts: [GlobalAddress], in configuration: Configuration) throws -> [Int64] {
        var regions: [RegionID: Region] = [:]
        return try accounts.map { account in
            guard let placement = configuration.placement(of: account.region),
                  let member = configuration.members.first(where: { $0.node == placement.primary }) else {
                Issue.record("\(account.region) has no primary in \(configuration.id)")
                return -1
            }
            if regions[account.region] == nil {
                regions[account.region] = try NodeStorage.directory(of: member).open(account.region, cluster: configuration.cluster)
            }
            var value: Int64 = 0
            withUnsafeMutableBytes(of: &value) { buffer in
                ObjectLayout.gatherPayload(from: regions[account.region]!.base + Int(account.offset), into: buffer.baseAddress!, count: 8)
            }
            return value
        }
    }
}

/// An embedded cluster whose configuration manager runs on ZooKeeper: the store outlives the
/// process, and cluster.json does not follow it.
@Suite("Reopen with a manager on ZooKeeper",
       .enabled(if: zooKeeper != nil, "no ZooKeeper server: set GRANARY_ZOOKEEPER=host:port or run Scripts/test zookeeper"))
struct ZooKeeperReopenTests {
    @Test("reopening a directory whose manager on ZooKeeper committed configurations after cluster.json's is refused before any file changes, naming both configurations")
    func reopenAfterTheStoreMovedOn() async throws {
        let tmp = TemporaryDirectory("granary-zk-reopen")
        defer { tmp.remove() }
        let directory = tmp.path.appending("c")
        var options = ClusterOptions()
        options.regionSize = 1 << 20
        options.ringCapacity = 64 << 10
        options.logger.logLevel = .error
        var membership = MembershipOptions()
        membership.lease = .milliseconds(10)
        membership.probeLeases = 1
        options.membership = membership
        options.coordination = .zookeeper(zooKeeper!)
        let cluster = try await Cluster.local(directory: directory, options: options)
        let object = try await cluster.nodes[0].transaction { try $0.allocate(Int64(1)) }
        let deadline = ContinuousClock.now + .seconds(30)
        while !cluster.membership.contains(where: \.isManager) {
            try #require(ContinuousClock.now < deadline, "no CM within 30 s")
            try await Task.sleep(for: .milliseconds(5))
        }
        let cm = cluster.membership.first(where: \.isManager)!.node
        let victim = NodeID((cm.index + 1) % 3)
        cluster.crash(victim)
        while cluster.nodes[cm.index].engine.configuration.contains(victim) {
            try #require(ContinuousClock.now < deadline, "\(victim) not removed within 30 s")
            try await Task.sleep(for: .milliseconds(5))
        }
        try await cluster.nodes[cm.index].transaction { try $0.write(object, Int64(2)) }
        try await cluster.shutdown()
        let manifest = try Data(contentsOf: URL(fileURLWithPath: directory.appending("cluster.json").string))
        let mailbox = directory.appending("n0").appending(RegionID.mailbox(of: NodeID(0)).fileName).string
        let mailboxBefore = try Data(contentsOf: URL(fileURLWithPath: mailbox))
        do {
            let reopened = try await Cluster.local(directory: directory, options: options)
            try await reopened.shutdown()
            Issue.record("the directory reopened in cluster.json's configuration although the store had moved on")
        } catch let error as ConfigurationError {
            #expect("\(error)".contains("config#1") && "\(error)".contains("holds config#"), "the error does not name both configurations: \(error)")
        }
        #expect(try Data(contentsOf: URL(fileURLWithPath: directory.appending("cluster.json").string)) == manifest, "cluster.json changed")
        #expect(try Data(contentsOf: URL(fileURLWithPath: mailbox)) == mailboxBefore, "n0's log (its mailbox) changed: restart recovery ran")
    }
}
