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

    @Test("cluster up starts the nodes in the background (ready, metrics served), cluster down stops them all (SIGTERM, processes gone, pid files removed), and up over the stopped cluster's files is refused")
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
            let state = FileHandle(forReadingAtPath: "/proc/\(pid)/stat").map { String(decoding: $0.readDataToEndOfFile(), as: UTF8.self) }
            #expect(kill(pid, 0) != 0 || state?.contains(") Z") == true, "n\(id) (process \(pid)) still runs after cluster down: \(state?.prefix(60) ?? "")")
            #expect(!FileManager.default.fileExists(atPath: "\(directory)/n\(id).pid"))
        }
        // A stopped cluster of node processes does not start again from its files yet: refused.
        let again = try ChildProcess(executable, ["cluster", "up", "--directory", directory])
        #expect(again.waitForExit() == 1, "cluster up over a stopped cluster's files was not refused: \(again.remainingLines())")
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
