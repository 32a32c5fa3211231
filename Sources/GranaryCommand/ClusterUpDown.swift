import ArgumentParser
import Foundation
import Granary
import GranaryZooKeeper
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// `granary cluster up`: starts the node processes of a cluster file in the background, each in a
/// process group of its own and ignoring SIGHUP (it outlives this command and the terminal), its
/// output in `n<id>.log` and its process id in `n<id>.pid` (written by the node) beside the file;
/// returns once every node is ready. Over the files of a static cluster stopped as a whole (by
/// `cluster down`, or every process killed), it first runs restart recovery over every node's log.
struct ClusterUp: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "up", abstract: "Start a cluster's node processes in the background (cluster init first when there is no cluster.json).")
    @Option(help: "The cluster directory (its cluster.json; written with the defaults of `cluster init` when missing).")
    var directory: String
    @Option(help: "With no cluster.json: nodes.") var nodes: Int = 3
    @Option(help: "With no cluster.json: replicas of every region.") var replicas: Int = 3
    @Option(help: "With no cluster.json: region size in MiB.") var regionMib: Int = 64
    @Option(help: "The configuration manager's coordination store (zookeeper://host:port); default: the cluster file's \"coordination\"; with neither, the nodes run --static.")
    var coordination: String?
    @Option(help: "Give node N the metrics port BASE + N (0: no metrics).") var metricsPortBase: Int = 0
    @Option(help: "Seconds to wait for every node to be ready.") var timeout: Double = 60

    func validate() throws {
        if let coordination, CoordinationChoice(coordination).map({ $0 == .embedded }) ?? true {
            throw ValidationError("--coordination takes zookeeper://host:port, got '\(coordination)'")
        }
        guard metricsPortBase >= 0, metricsPortBase + NodeID.limit < 65536 else { throw ValidationError("--metrics-port-base must be in 0...65471") }
    }

    func run() async throws {
        let file = directory + "/cluster.json"
        if !FileManager.default.fileExists(atPath: file) {
            let initialize = try ClusterInit.parse(["--directory", directory, "--nodes", "\(nodes)", "--replicas", "\(replicas)",
                                                    "--region-mib", "\(regionMib)"] + (coordination.map { ["--coordination", $0] } ?? []))
            try initialize.validate()
            try initialize.run()
        }
        let clusterFile = try ClusterFile.load(file)
        let configuration = Cluster.resolvingEndpoints(of: clusterFile.configuration, against: FilePath(directory))
        let coordination = self.coordination ?? clusterFile.coordination
        if let remote = configuration.members.first(where: { MemberEndpoint($0.endpoint)?.isRemote ?? false }) {
            throw CommandFailure("\(file) places \(remote.node) at \(remote.endpoint), a node reached by address (nodes on several hosts): "
                + "`cluster up` starts the nodes of one host; start each node on its host with `granary node --config FILE --id N`")
        }
        for member in configuration.members {
            if let pid = ClusterDown.runningPid(directory: directory, node: member.node.index) {
                throw CommandFailure("\(member.node) runs already (process \(pid), \(directory)/\(member.node).pid): `granary cluster down --directory \(directory)` first")
            }
        }
        // A cluster stopped as a whole (cluster down, or every process killed) starts again from
        // its files: restart recovery over every node's log first, as a reopened embedded cluster.
        let stopped = try configuration.members.contains { member in
            FileManager.default.fileExists(atPath: try NodeStorage.directory(of: member).path(for: .mailbox(of: member.node)).string)
        }
        var recovered = false
        if stopped, let coordination, case .zookeeper(let address) = CoordinationChoice(coordination) {
            try await Self.recoverCoordinatedCluster(configuration, directory: directory, address: address)
            recovered = true
        } else if stopped {
            let report = try NodeStorage.recoverStoppedCluster(configuration, ringCapacity: NodeCommand.ringCapacity)
            print("recovered: \(report)")
        }
        try? FileManager.default.removeItem(atPath: directory + "/" + ClusterDown.stoppingFile)
        // Clients are not started here (a program connects as one). On a static configuration
        // their mailboxes are made now: every node opens a channel to each member when it
        // starts. With --coordination a client joins when a program connects as it, and the
        // nodes connect to it then.
        let clients = configuration.clients
        if !clients.isEmpty && coordination == nil {
            for client in clients {
                _ = try NodeStorage(node: client, configuration: configuration, ringCapacity: NodeCommand.ringCapacity)
            }
        }
        let executable = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path
        let nodes = configuration.members.filter { !clients.contains($0.node) }
        for member in nodes {
            let id = member.node.index
            try Self.launchNode(executable: executable, file: file, directory: directory, id: id, coordination: coordination,
                                metricsPort: metricsPortBase > 0 ? metricsPortBase + id : nil, recovered: recovered)
        }
        // Ready: each node prints `ready <node> ...` once its regions and mailbox exist.
        let deadline = Date().addingTimeInterval(timeout)
        for member in nodes {
            let id = member.node.index
            let log = directory + "/n\(id).log"
            while !((try? String(contentsOfFile: log, encoding: .utf8))?.contains("ready n\(id) ") ?? false) {
                let exited = FileManager.default.fileExists(atPath: directory + "/n\(id).pid") && ClusterDown.runningPid(directory: directory, node: id) == nil
                guard Date() < deadline, !exited else {
                    let tail = ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").split(separator: "\n").suffix(5).joined(separator: "\n")
                    throw CommandFailure("n\(id) is not ready (\(Date() < deadline ? "it exited" : "after \(timeout) s")); the end of \(log):\n\(tail)")
                }
                usleep(20_000)
            }
        }
        print("up: \(nodes.count) nodes of \(configuration.cluster) in \(directory) (logs n<id>.log, process ids n<id>.pid)")
        if !clients.isEmpty {
            let flag = coordination != clusterFile.coordination ? coordination.map { " --coordination \($0)" } ?? "" : ""
            print("clients: \(clients.map(\.description).joined(separator: ", ")): granary bench WORKLOAD --cluster \(file)\(flag), or Cluster.connect(file:) in a program")
        }
        if let coordination { print("status: granary cluster status --coordination \(coordination) --cluster \(configuration.cluster)") }
        print("stop: granary cluster down --directory \(directory)")
    }
}

extension ClusterUp {
    /// A cluster with a configuration manager that stopped as a whole (`cluster down`, or every
    /// process killed), started again: its placement is the last configuration the store holds.
    /// Once the sessions of the former processes have ended (their registrations gone), restart
    /// recovery runs over every member's log in that configuration (clients' records included),
    /// and the store gets the configuration the nodes start in: the same members and placement
    /// without the clients (they join again when they connect), a new id, no CM yet, and no record
    /// of an earlier configuration accepted. The nodes then start with `--recovered`.
    static func recoverCoordinatedCluster(_ file: Configuration, directory: String, address: String) async throws {
        let store = try ZooKeeperStore(connectString: address, sessionTimeout: .seconds(4))
        do {
            try await recoverCoordinatedCluster(file, directory: directory, address: address, store: store)
            await store.close()
        } catch {
            await store.close()
            throw error
        }
    }

    private static func recoverCoordinatedCluster(_ file: Configuration, directory: String, address: String,
                                                  store: ZooKeeperStore) async throws {
        let stored: Configuration
        do {
            stored = try await ConfigurationRecord.read(file.cluster, from: store).0
        } catch CoordinationError.noNode(_) {
            throw CommandFailure("the nodes in \(directory) have region files from an earlier run, but the coordination store at \(address) holds no configuration of \(file.cluster), and it is the store that knows where each region's replicas are now: start the cluster with the store it ran with")
        }
        for member in stored.members {
            if let pid = ClusterDown.runningPid(directory: directory, node: member.node.index) {
                throw CommandFailure("\(member.node) of \(stored.id) runs already (process \(pid)): `granary cluster down --directory \(directory)` first")
            }
        }
        // Registrations and candidacies of the former processes are ephemeral: they go when their
        // sessions expire. A node registering while its former registration is still there would
        // be taken for gone when that one expires.
        let paths = MembershipPaths(cluster: file.cluster)
        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(30)
        while true {
            let left = try await store.children(paths.members) + store.children(paths.election)
            if left.isEmpty { break }
            guard clock.now < deadline else {
                throw CommandFailure("the store at \(address) still holds registrations of \(file.cluster) (\(left.joined(separator: ", "))) 30 s after its processes stopped: is a process of this cluster running elsewhere?")
            }
            try await Task.sleep(for: .milliseconds(100))
        }
        print("recovering \(stored.id) of \(file.cluster) (the last configuration in the store) from every member's log")
        for made in try NodeStorage.makeUnmadeReplicas(of: stored) { print(made) }
        let report = try NodeStorage.recoverStoppedCluster(stored, ringCapacity: NodeCommand.ringCapacity)
        print("recovered: \(report)")
        let committed = try await ConfigurationRecord.change(file.cluster, in: store) { current in
            guard current.id == stored.id else { return nil }
            var next = current.withoutClients
            next.manager = nil
            // Records of the configurations before are all decided: none is accepted again.
            next.routingEpoch = current.id.next
            return next
        }
        guard let committed else {
            throw CommandFailure("the configuration of \(file.cluster) in the store changed during restart recovery: is a process of this cluster running elsewhere?")
        }
        print("restarting in \(committed.id): members \(committed.members.map(\.node.description).joined(separator: ","))")
    }

    /// Starts node `id` of the cluster file `file` (in `directory`) in the background, as `up`
    /// does for each node: its output in `n<id>.log`, its pid in `n<id>.pid` (written by the
    /// node). A node of a coordinated cluster started again this way rejoins.
    static func launchNode(executable: String, file: String, directory: String, id: Int, coordination: String?,
                           metricsPort: Int?, appendingLog: Bool = false, recovered: Bool = false) throws {
        // The node writes its own pid file: it is the process `cluster down` signals.
        try? FileManager.default.removeItem(atPath: directory + "/n\(id).pid")
        var arguments = ["node", "--config", file, "--id", "\(id)", "--pid-file", directory + "/n\(id).pid"]
        arguments += coordination.map { ["--coordination", $0] } ?? ["--static"]
        if recovered { arguments.append("--recovered") }
        if let metricsPort { arguments += ["--metrics-port", "\(metricsPort)"] }
        let log = directory + "/n\(id).log"
        let exists = appendingLog && FileManager.default.fileExists(atPath: log)
        guard exists || FileManager.default.createFile(atPath: log, contents: nil), let handle = FileHandle(forWritingAtPath: log) else {
            throw CommandFailure("cannot write \(log)")
        }
        if exists { handle.seekToEndOfFile() }
        // Its own process group (Foundation's Process makes it one), so the terminal's ^C does
        // not reach it, and it ignores SIGHUP: it outlives this command and the terminal.
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.standardOutput = handle
        process.standardError = handle
        process.standardInput = FileHandle.nullDevice
        try process.run()
    }
}

/// `granary cluster down`: stops the whole cluster. It leaves a `stopping` file in the directory,
/// then sends SIGTERM to every node `cluster up` started: each flushes what it owes, ends its
/// coordination session without leaving the configuration, and exits; `down` waits for each
/// (SIGKILL after `--timeout`).
struct ClusterDown: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "down", abstract: "Stop the node processes `cluster up` started.")
    @Option(help: "The cluster directory.") var directory: String
    @Option(help: "Seconds to wait for the nodes to exit before SIGKILL.") var timeout: Double = 30

    /// The process id in `n<node>.pid` if that process is alive.
    static func runningPid(directory: String, node: Int) -> pid_t? {
        guard let text = try? String(contentsOfFile: directory + "/n\(node).pid", encoding: .utf8),
              let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)), pid > 0 else { return nil }
        return isAlive(pid) ? pid : nil
    }

    /// Left beside the pid files while `down` runs: a node told SIGTERM then stops without
    /// leaving the configuration (the whole cluster stops).
    static let stoppingFile = "stopping"

    func run() throws {
        let configuration = try JSONDecoder().decode(Configuration.self, from: Data(contentsOf: URL(fileURLWithPath: directory + "/cluster.json")))
        try "".write(toFile: directory + "/" + Self.stoppingFile, atomically: true, encoding: .utf8)
        // Every node is told at once: with a configuration manager, a node that outlived another by
        // a lease would remove it from the configuration, and the cluster would start again
        // without it (it would rejoin, and have its replicas copied again).
        var signalled: [(id: Int, pid: pid_t)] = []
        for member in configuration.members {
            let id = member.node.index
            guard let pid = Self.runningPid(directory: directory, node: id) else {
                try? FileManager.default.removeItem(atPath: directory + "/n\(id).pid")
                continue
            }
            Glibc.kill(pid, SIGTERM)
            signalled.append((id, pid))
        }
        let deadline = Date().addingTimeInterval(timeout)
        for (id, pid) in signalled {
            // The node is not this process's child (setsid): poll until it is gone.
            while Self.isAlive(pid) {
                if Date() > deadline {
                    Glibc.kill(pid, SIGKILL)
                    print("down: n\(id) (process \(pid)) did not exit within \(timeout) s: killed")
                    break
                }
                usleep(10_000)
            }
            try? FileManager.default.removeItem(atPath: directory + "/n\(id).pid")
        }
        let stopped = signalled.count
        print("down: \(stopped) node\(stopped == 1 ? "" : "s") stopped in \(directory)")
    }

    /// Whether `pid` runs and is not a zombie (no /proc entry: it does not run).
    static func isAlive(_ pid: pid_t) -> Bool {
        guard let stat = processStat(pid) else { return false }
        guard let close = stat.lastIndex(of: ")") else { return false }
        let state = stat[stat.index(close, offsetBy: 2)...].prefix(1)
        return state != "Z" && state != "X"
    }

    /// The text of `/proc/PID/stat`, or nil when there is no such process. A process that exits
    /// between the open and the read makes the read fail with ESRCH: that is "no such process" too,
    /// so the read is the throwing one (FileHandle's `readDataToEndOfFile` traps on it).
    static func processStat(_ pid: pid_t) -> String? {
        // Read, not String(contentsOfFile:): procfs files report a size of 0.
        guard let handle = FileHandle(forReadingAtPath: "/proc/\(pid)/stat") else { return nil }
        defer { try? handle.close() }
        guard let data = try? handle.readToEnd() else { return nil }
        return String(decoding: data, as: UTF8.self)
    }
}
