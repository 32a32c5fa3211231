import Foundation
import Granary
@testable import GranaryCommand
import GranaryTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// `granary cluster init` writes a cluster file that node processes start from, wherever they
/// are started: relative endpoints resolve against the file's directory.
@Suite("Cluster file")
struct ClusterFileTests {
    @Test("cluster init writes members, balanced regions and the replication; nodes started from another directory put their regions beside the file and run transactions")
    func initAndStart() throws {
        let tmp = TemporaryDirectory("granary-cluster-file")
        defer { tmp.remove() }
        let directory = tmp.path.appending("c").string
        let executable = try ChildProcess.granaryExecutable()
        let writer = try ChildProcess(executable, ["cluster", "init", "--directory", directory, "--nodes", "3", "--replicas", "3",
                                                   "--regions-per-node", "1", "--region-mib", "1"])
        let wrote = try writer.readLine(timeout: 30)
        #expect(wrote.hasPrefix("wrote "), "cluster init said: \(wrote)")
        let file = directory + "/cluster.json"
        let configuration = try JSONDecoder().decode(Configuration.self, from: Data(contentsOf: URL(fileURLWithPath: file)))
        #expect(configuration.members.map(\.endpoint) == ["shm:n0", "shm:n1", "shm:n2"], "endpoints \(configuration.members)")
        #expect(configuration.regions.count == 3 && configuration.regions.allSatisfy { $0.replicas.count == 3 })
        #expect(configuration.replication == 3 && configuration.regionSize == 1 << 20)
        // A second init refuses to replace it.
        let again = try ChildProcess(executable, ["cluster", "init", "--directory", directory])
        #expect(again.waitForExit() == 1, "a second init did not refuse (exit status); it said \(again.remainingLines())")
        #expect(try JSONDecoder().decode(Configuration.self, from: Data(contentsOf: URL(fileURLWithPath: file))).cluster == configuration.cluster,
                "the second init replaced the file")

        // The test runs from the package directory, not from `directory`.
        let children = try (0..<3).map { id in
            try ChildProcess(executable, ["node", "--config", file, "--id", "\(id)", "--static", "--bank-accounts", "10",
                                          "--bank-transfers", "50", "--bank-balance", "100"])
        }
        defer { for child in children { child.kill() } }
        for (id, child) in children.enumerated() {
            let ready = try child.readLine(timeout: 120)
            #expect(ready.hasPrefix("ready n\(id)"), "node \(id) said: \(ready)")
            #expect(try child.readLine(timeout: 120) == "accounts 10")
            #expect(FileManager.default.fileExists(atPath: "\(directory)/n\(id)/mailbox-n\(id).region"),
                    "n\(id)'s files are not beside the cluster file")
        }
        for child in children {
            let done = try child.readLine(until: { $0.hasPrefix("done") || $0.hasPrefix("transfer-refused") }, timeout: 120)
            #expect(done == "done 50", "a node said: \(done)")
        }
    }

    @Test("cluster up starts the nodes in the background (ready, metrics served), cluster down stops them all (SIGTERM, processes gone, pid files removed); up starts the stopped cluster again from its files (restart recovery first), but not with a coordination store")
    func upAndDown() throws {
        let tmp = TemporaryDirectory("granary-cluster-up")
        defer { tmp.remove() }
        let directory = tmp.path.appending("c").string
        let executable = try ChildProcess.granaryExecutable()
        let base = Int.random(in: 20_000...40_000)
        let up = try ChildProcess(executable, ["cluster", "up", "--directory", directory, "--region-mib", "1",
                                               "--metrics-port-base", "\(base)"])
        let status = up.waitForExit()
        let said = up.remainingLines()
        #expect(status == 0, "cluster up exited \(status): \(said)")
        var pids: [pid_t] = []
        for id in 0..<3 {
            let text = try String(contentsOfFile: "\(directory)/n\(id).pid", encoding: .utf8)
            let pid = try #require(pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)))
            #expect(kill(pid, 0) == 0, "n\(id) (process \(pid)) is not running after cluster up")
            #expect(try String(contentsOfFile: "\(directory)/n\(id).log", encoding: .utf8).contains("ready n\(id) "))
            pids.append(pid)
        }
        let page = try httpGet(port: UInt16(base + 1), path: "/metrics")
        #expect(page.contains("granary_transactions_committed_total{node=\"n1\"}"), "n1's metrics: \(page.prefix(500))")
        let down = try ChildProcess(executable, ["cluster", "down", "--directory", directory])
        #expect(down.waitForExit() == 0)
        #expect(down.remainingLines().contains("down: 3 nodes stopped in \(directory)"))
        for (id, pid) in pids.enumerated() {
            // Gone (no /proc entry; kill(pid, 0) fails) or a zombie of a parent that has not reaped it.
            // readToEnd, not readDataToEndOfFile: a process reaped between the open and the read makes the
            // read fail (ESRCH), which the latter traps on.
            let state = FileHandle(forReadingAtPath: "/proc/\(pid)/stat").flatMap { try? $0.readToEnd() }.map { String(decoding: $0, as: UTF8.self) }
            #expect(kill(pid, 0) != 0 || state?.contains(") Z") == true, "n\(id) (process \(pid)) still runs after cluster down: \(state?.prefix(60) ?? "")")
            #expect(!FileManager.default.fileExists(atPath: "\(directory)/n\(id).pid"))
        }
        // The stopped cluster starts again from its files (restart recovery first), and stops again.
        let again = try ChildProcess(executable, ["cluster", "up", "--directory", directory])
        let againStatus = again.waitForExit()
        let againSaid = again.remainingLines()
        #expect(againStatus == 0, "cluster up over the stopped cluster exited \(againStatus): \(againSaid)")
        #expect(againSaid.contains { $0.hasPrefix("recovered: restart recovery") }, "no recovery report: \(againSaid)")
        for id in 0..<3 {
            #expect(ClusterDown.runningPid(directory: directory, node: id) != nil, "n\(id) does not run after the second cluster up")
        }
        #expect(try ChildProcess(executable, ["cluster", "down", "--directory", directory]).waitForExit() == 0)
        // A node with a coordination store does not restart as a whole: refused, files untouched.
        let coordinated = try ChildProcess(executable, ["cluster", "up", "--directory", directory,
                                                        "--coordination", "zookeeper://127.0.0.1:1"])
        #expect(coordinated.waitForExit() == 1, "cluster up --coordination over stopped files was not refused: \(coordinated.remainingLines())")
    }

    @Test("a cluster of node processes killed as a whole (SIGKILL of every node in the middle of transfers) starts again with cluster up: restart recovery over every log, the money conserved, nothing locked, replicas equal; a node started alone over a log that holds records refuses")
    func wholeClusterKilledAndUp() throws {
        let tmp = TemporaryDirectory("granary-cluster-killed")
        defer { tmp.remove() }
        let directory = tmp.path.appending("c").string
        let executable = try ChildProcess.granaryExecutable()
        let writer = try ChildProcess(executable, ["cluster", "init", "--directory", directory, "--nodes", "3", "--replicas", "3",
                                                   "--regions-per-node", "1", "--region-mib", "1"])
        #expect(writer.waitForExit() == 0)
        let file = directory + "/cluster.json"
        let balance: Int64 = 100, accountsPerNode = 10
        var recoveredRecords = 0
        for round in 0..<3 {
            // The first round allocates the accounts; later ones restart the same cluster.
            let bank = round == 0 ? ["--bank-accounts", "\(accountsPerNode)", "--bank-balance", "\(balance)"] : []
            let children = try (0..<3).map { id in
                try ChildProcess(executable, ["node", "--config", file, "--id", "\(id)", "--static"] + bank
                                 + ["--bank-transfers", "1000000"])
            }
            defer { for child in children { child.kill() } }
            for (id, child) in children.enumerated() {
                let ready = try child.readLine(timeout: 120)
                #expect(ready.hasPrefix("ready n\(id)"), "round \(round): node \(id) said: \(ready) \(child.remainingLines())")
                if round == 0 { #expect(try child.readLine(timeout: 120) == "accounts \(accountsPerNode)") }
            }
            // Transfers run (and some commits are in flight) when every node is killed at once.
            usleep(UInt32.random(in: 300_000...700_000))
            for child in children { child.kill(SIGKILL) }
            for child in children { _ = child.waitForExit() }
            if round == 0 {
                // A node started alone over its log refuses: only recovery over every log decides it.
                // (Through a shell, to read the error the command prints on its standard error.)
                let alone = try ChildProcess(URL(fileURLWithPath: "/bin/sh"),
                                             ["-c", "'\(executable.path)' node --config '\(file)' --id 1 --static 2>&1"])
                #expect(alone.waitForExit() == 1, "a node started alone over a kept log did not refuse")
                let said = alone.remainingLines().joined(separator: "\n")
                #expect(said.contains("cluster up"), "the refusal does not say what to do: \(said)")
            }
            let up = try ChildProcess(executable, ["cluster", "up", "--directory", directory])
            let status = up.waitForExit()
            let said = up.remainingLines()
            #expect(status == 0, "round \(round): cluster up after the kill exited \(status): \(said)")
            if let line = said.first(where: { $0.hasPrefix("recovered: restart recovery: ") }),
               let count = Int(line.dropFirst("recovered: restart recovery: ".count).prefix { $0.isNumber }) {
                recoveredRecords += count
            } else {
                Issue.record("round \(round): no recovery report: \(said)")
            }
            // The nodes run (idle): audit every replica of every account from the region files.
            let configuration = Cluster.resolvingEndpoints(
                of: try JSONDecoder().decode(Configuration.self, from: Data(contentsOf: URL(fileURLWithPath: file))),
                against: FilePath(directory))
            let accounts = try NodeCommandBank.accounts(configuration)
            #expect(accounts.count == 3 * accountsPerNode)
            var total: Int64 = 0
            for account in accounts {
                let placement = try #require(configuration.placement(of: account.region))
                var copies: [[UInt8]] = []
                for node in placement.replicas {
                    let member = try #require(configuration.members.first { $0.node == node })
                    let region = try NodeStorage.directory(of: member).open(account.region, cluster: configuration.cluster)
                    let object = region.base + Int(account.offset)
                    #expect(!ObjectLayout.loadHeader(object).isLocked, "round \(round): \(account) is locked on \(node) after recovery")
                    copies.append(Array(UnsafeRawBufferPointer(start: object, count: ObjectLayout.lineSize)))
                    if node == placement.primary {
                        var value: Int64 = 0
                        withUnsafeMutableBytes(of: &value) { ObjectLayout.gatherPayload(from: object, into: $0.baseAddress!, count: 8) }
                        #expect(value >= 0, "round \(round): \(account) holds \(value)")
                        total += value
                    }
                }
                #expect(Set(copies).count == 1, "round \(round): the replicas of \(account) differ: \(copies.map { $0.prefix(16) })")
            }
            #expect(total == balance * Int64(3 * accountsPerNode), "round \(round): the accounts hold \(total) in all, not \(balance * Int64(3 * accountsPerNode))")
            #expect(try ChildProcess(executable, ["cluster", "down", "--directory", directory]).waitForExit() == 0)
        }
        #expect(recoveredRecords > 0, "no kill left a record in the logs: the test did not exercise recovery")
    }

    @Test("clients: cluster init --clients adds a member without regions; with the nodes up, a program connects as it (Cluster.connect) and allocates, reads and writes in the nodes' regions; bench --cluster runs SmallBank through a client with its invariant; a client in use is not taken twice; granary node refuses a client id")
    func clients() async throws {
        let tmp = TemporaryDirectory("granary-cluster-clients")
        defer { tmp.remove() }
        let directory = tmp.path.appending("c").string
        let executable = try ChildProcess.granaryExecutable()
        let writer = try ChildProcess(executable, ["cluster", "init", "--directory", directory, "--nodes", "3", "--clients", "2",
                                                   "--regions-per-node", "1", "--region-mib", "4"])
        #expect(writer.waitForExit() == 0)
        let file = directory + "/cluster.json"
        let stored = try JSONDecoder().decode(Configuration.self, from: Data(contentsOf: URL(fileURLWithPath: file)))
        #expect(stored.clients == [NodeID(3), NodeID(4)], "clients \(stored.clients) in \(stored)")
        #expect(stored.regions.allSatisfy { $0.replicas.allSatisfy { $0.index < 3 } }, "a client holds a replica: \(stored)")
        let node = try ChildProcess(URL(fileURLWithPath: "/bin/sh"), ["-c", "'\(executable.path)' node --config '\(file)' --id 3 --static 2>&1"])
        #expect(node.waitForExit() == 1, "granary node ran as a client member")
        #expect(node.remainingLines().joined().contains("client member"))

        let up = try ChildProcess(executable, ["cluster", "up", "--directory", directory,
                                               "--metrics-port-base", "\(Int.random(in: 20_000...40_000))"])
        let upStatus = up.waitForExit()
        #expect(upStatus == 0, "cluster up exited \(upStatus): \(up.remainingLines())")
        defer { _ = try? ChildProcess(executable, ["cluster", "down", "--directory", directory]).waitForExit() }

        // This process as client n3: objects allocated at the nodes' primaries, read back.
        let client = try await Cluster.connect(file: FilePath(file), client: NodeID(3))
        let node3 = try #require(client.nodes.first)
        #expect(node3.id == NodeID(3))
        let accounts = try await node3.transaction { tx in try (0..<50).map { try tx.allocate(Int64($0)) } }
        #expect(Set(accounts.map(\.region)).count == 3, "allocated in \(Set(accounts.map(\.region))) only")
        try await node3.transaction { tx in
            for account in accounts { try tx.write(account, try tx.read(account, as: Int64.self) * 2) }
        }
        let read = try await node3.transaction { tx in try accounts.map { try tx.read($0, as: Int64.self) } }
        #expect(read == (0..<50).map { Int64($0 * 2) })
        // n3 is taken: a second connection to it is refused, naming it.
        do {
            _ = try await Cluster.connect(file: FilePath(file), client: NodeID(3))
            Issue.record("a second connection as n3 was accepted")
        } catch {
            #expect("\(error)".contains("in use"), "\(error)")
        }
        // SmallBank through the other client (n4, the first free one), with its invariant check.
        let bench = try ChildProcess(executable, ["bench", "smallbank", "--cluster", file, "--accounts", "2000", "--hot-accounts", "200", "--seconds", "1", "--quiet"])
        // While the client loads and runs: cluster status shows each node's process and the records
        // it processed per second (the client coordinates; the nodes process its records).
        let status = try ChildProcess(executable, ["cluster", "status", "--directory", directory, "--interval", "1"])
        #expect(status.waitForExit() == 0)
        let shown = status.remainingLines()
        let nodeLines = shown.filter { $0.hasPrefix("  n") && $0.contains("process") }
        #expect(nodeLines.count == 3, "cluster status: \(shown)")
        let rates = nodeLines.compactMap { line -> Double? in
            guard let range = line.range(of: "records ") else { return nil }
            return Double(line[range.upperBound...].prefix { $0.isNumber || $0 == "." })
        }
        #expect(rates.count == 3 && rates.contains { $0 > 0 }, "no node processed records while the client ran: \(shown)")
        #expect(shown.contains { $0.hasPrefix("source") && $0.contains("cluster file") } && shown.contains("members"), "\(shown)")
        let benchStatus = bench.waitForExit()
        let said = bench.remainingLines()
        #expect(benchStatus == 0, "bench --cluster exited \(benchStatus): \(said)")
        #expect(said.contains("invariant: holds"), "\(said)")
        let committed = said.first { $0.trimmingCharacters(in: .whitespaces).hasPrefix("committed") }
            .flatMap { Int($0.split(separator: " ", omittingEmptySubsequences: true)[1]) } ?? 0
        #expect(committed > 0, "bench --cluster committed nothing: \(said)")
        try await client.shutdown()
        // The objects this client wrote are still there for the next one.
        let again = try await Cluster.connect(file: FilePath(file))
        let reread = try await again.nodes[0].transaction { tx in try accounts.map { try tx.read($0, as: Int64.self) } }
        #expect(reread == read)
        try await again.shutdown()
    }

    @Test("a metrics port outside 0...65535 is a usage error naming the option, not a trap")
    func metricsPortOutOfRange() throws {
        for port in ["70000", "-1"] {
            do {
                _ = try NodeCommand.parse(["--id", "0", "--config", "cluster.json", "--static", "--metrics-port", port])
                Issue.record("--metrics-port \(port) was accepted")
            } catch {
                #expect(NodeCommand.message(for: error).contains("--metrics-port"), "\(NodeCommand.message(for: error))")
            }
        }
    }
}
