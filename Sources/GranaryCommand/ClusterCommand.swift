import ArgumentParser
import Foundation
import Granary
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif
import GranaryVerbs
import GranaryZooKeeper

/// `granary cluster`: write a cluster file, inspect a cluster through its coordination store.
struct ClusterCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cluster", abstract: "Write a cluster file; start, stop or inspect its node processes.",
        subcommands: [ClusterInit.self, ClusterUp.self, ClusterDown.self, ClusterStatus.self])
}

/// `granary cluster init`: a cluster file for `granary node --config` (the JSON `Cluster.local`
/// writes to its cluster.json): members n0..n(N-1) with their region directories beside the file
/// (endpoints relative to it, so the directory can move), every node primary of the same number
/// of regions, backups balanced, a new cluster id.
struct ClusterInit: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "init", abstract: "Write a cluster file (cluster.json) for node processes.",
        discussion: """
            Then start each node: granary node --config DIR/cluster.json --id N --coordination \
            zookeeper://host:port (or --static). Region directories are created beside the file.
            """)
    @Option(help: "The directory that gets cluster.json and, beside it, one region directory per node (n0, n1, ...).")
    var directory: String
    @Option(help: "Nodes.") var nodes: Int = 3
    @Option(help: "Client members after the nodes (ids N...): they hold no region; Cluster.connect and granary bench --cluster run transactions as one.")
    var clients: Int = 0
    @Option(help: "Replicas of every region (primary + backups), at most --nodes.") var replicas: Int = 3
    @Option(help: "Regions each node is primary of.") var regionsPerNode: Int = 2
    @Option(help: "Size of every region in MiB (a power of two, 1 to 4096).") var regionMib: Int = 64
    @Option(help: "Transport of every node: shm (shared memory, one host) or verbs (RDMA).") var transport: TransportChoice = .shm
    @Option(help: "With --transport verbs, nodes on several hosts: their IPv4 addresses (each an address of the host's RDMA device), comma-separated. Node i (clients after the nodes) listens on host i mod count at port --base-port + i, endpoint verbs://HOST:PORT/NODE-ROOT/nI. Without it every node is on this host (endpoints verbs:nI).")
    var hosts: String?
    @Option(help: "With --hosts: the port of node 0; node i listens on this plus i.") var basePort: Int = 7471
    @Option(help: "With --hosts: the absolute directory under which each host keeps its nodes' region directories (nI). Default: --directory made absolute.")
    var nodeRoot: String?
    @Option(help: "The configuration manager's coordination store (zookeeper://host:port), written to the file as \"coordination\": node processes, cluster up, Cluster.connect and bench/check --cluster then use it unless told otherwise.")
    var coordination: String?
    @Option(help: "The lease between the configuration manager and each node in milliseconds, written to the file as \"leaseMilliseconds\" (default 10).")
    var leaseMs: Int?
    @Flag(help: "Replace an existing cluster.json (never its region files).") var force = false

    func validate() throws {
        guard (1...NodeID.limit).contains(nodes) else { throw ValidationError("--nodes must be in 1...\(NodeID.limit)") }
        guard clients >= 0, nodes + clients <= NodeID.limit else { throw ValidationError("--clients must be at least 0, and --nodes + --clients at most \(NodeID.limit)") }
        guard (1...nodes).contains(replicas) else { throw ValidationError("--replicas must be in 1...--nodes (\(nodes))") }
        guard regionsPerNode >= 1, regionsPerNode * nodes < RegionID.limit else {
            throw ValidationError("--regions-per-node must be at least 1, and the regions fewer than \(RegionID.limit)")
        }
        guard (1...4096).contains(regionMib), regionMib & (regionMib - 1) == 0 else {
            throw ValidationError("--region-mib must be a power of two from 1 to 4096")
        }
        if let coordination {
            do { _ = try ClusterFile.zooKeeperAddress(coordination) } catch { throw ValidationError("--coordination: \(error)") }
        }
        if let leaseMs, !(1...60_000).contains(leaseMs) { throw ValidationError("--lease-ms must be in 1...60000, got \(leaseMs)") }
        if let hosts {
            guard transport == .verbs else { throw ValidationError("--hosts goes with --transport verbs") }
            let list = hosts.split(separator: ",", omittingEmptySubsequences: false)
            guard !list.isEmpty, list.allSatisfy({ !$0.isEmpty && !$0.contains(":") && !$0.contains("/") }) else {
                throw ValidationError("--hosts takes comma-separated IPv4 addresses (no ports), got '\(hosts)'")
            }
            guard basePort >= 1, basePort + nodes + clients - 1 <= 65535 else {
                throw ValidationError("--base-port \(basePort) leaves no port for node \(nodes + clients - 1) (ports are 1 to 65535)")
            }
            if let nodeRoot, !nodeRoot.hasPrefix("/") { throw ValidationError("--node-root must be an absolute directory, got '\(nodeRoot)'") }
        } else if nodeRoot != nil {
            throw ValidationError("--node-root goes with --hosts")
        }
    }

    /// Node `node`'s endpoint: on this host (`shm:nI`, `verbs:nI`, beside the file), or with
    /// --hosts on its host by address.
    func endpoint(of node: NodeID) -> String {
        guard let hosts else { return (transport == .verbs ? "verbs:" : "shm:") + node.description }
        let list = hosts.split(separator: ",")
        let root = nodeRoot ?? URL(fileURLWithPath: directory).standardizedFileURL.path
        return "verbs://\(list[node.index % list.count]):\(basePort + node.index)\(root.hasSuffix("/") ? String(root.dropLast()) : root)/\(node)"
    }

    func run() throws {
        let root = FilePath(directory)
        let file = root.appending("cluster.json")
        if FileManager.default.fileExists(atPath: file.string), !force {
            throw CommandFailure("\(file) exists: it describes a cluster whose region files may hold data (--force replaces the file)")
        }
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let ids = (0..<nodes).map { NodeID($0) }
        let clientIDs = (nodes..<(nodes + clients)).map { NodeID($0) }
        var configuration = try Configuration(
            id: ConfigurationID(rawValue: 1), cluster: ClusterID.random(),
            members: ids.map { Member(node: $0, endpoint: endpoint(of: $0)) }
                + clientIDs.map { Member(node: $0, endpoint: endpoint(of: $0), client: true) },
            manager: ids.first,
            regions: Configuration.balancedPlacement(nodes: ids, regionsPerNode: regionsPerNode, replicas: replicas),
            regionSize: regionMib << 20)
        configuration.replication = replicas
        let clusterFile = try ClusterFile(configuration: configuration, coordination: coordination, leaseMilliseconds: leaseMs)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        try encoder.encode(clusterFile).write(to: URL(fileURLWithPath: file.string))
        print("wrote \(file): \(configuration.cluster), \(nodes) nodes, \(configuration.regions.count) regions of \(regionMib) MiB, \(replicas) replicas"
              + (clients > 0 ? ", clients \(clientIDs.map(\.description).joined(separator: ","))" : "")
              + (coordination.map { ", coordination \($0)" } ?? ""))
        if hosts != nil {
            print("start each node on its host with: granary node --config \(file) --id N \(coordination == nil ? "--coordination zookeeper://HOST:PORT (or --static)" : "")  (N = 0...\(nodes - 1); the file must be readable there)")
        } else if coordination != nil {
            print("start the nodes with: granary cluster up --directory \(directory)   (or each with: granary node --config \(file) --id N, N = 0...\(nodes - 1))")
        } else {
            print("start each node with: granary node --config \(file) --id N --coordination zookeeper://HOST:PORT   (N = 0...\(nodes - 1); or --static)")
        }
    }
}

struct ClusterStatus: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Print the members, the configuration manager, the configuration id, the region map and each node's throughput.",
        discussion: """
            With --directory (a cluster of `cluster up`): the configuration from the coordination store (the file's             "coordination", or --coordination), else the file's; and for each node its process, and, where it serves             metrics (cluster up --metrics-port-base), the records it processed and the transactions it coordinated             per second over --interval. Without --directory: --coordination and --cluster read the store alone.
            """)
    @Option(help: "The cluster's directory (cluster.json, the nodes' logs and process ids).") var directory: String?
    @Option(help: "The coordination store: zookeeper://host:port (default with --directory: the file's).") var coordination: String?
    @Option(help: "The cluster id, in hex (as in cluster.json and the region files); with --directory, the file's.") var cluster: String?
    @Option(help: "Replicas every region should have (regions with fewer are listed as under-replicated).") var replicas: Int = 3
    @Option(help: "Seconds between the two reads of each node's metrics that give its throughput.") var interval: Double = 1

    func validate() throws {
        if let coordination, CoordinationChoice(coordination).map({ $0 == .embedded }) ?? true {
            throw ValidationError("--coordination takes zookeeper://host:port, got '\(coordination)'")
        }
        if let cluster, UInt64(cluster.replacingOccurrences(of: "cluster-", with: ""), radix: 16) == nil {
            throw ValidationError("--cluster must be a hex cluster id, got '\(cluster)'")
        }
        guard directory != nil || (coordination != nil && cluster != nil) else {
            throw ValidationError("give --directory DIR, or --coordination zookeeper://host:port and --cluster ID")
        }
        guard interval > 0, interval <= 60 else { throw ValidationError("--interval must be in (0, 60] seconds") }
    }

    func run() async throws {
        var file: ClusterFile?
        if let directory { file = try ClusterFile.load(directory + "/cluster.json") }
        let id = cluster.map { ClusterID(rawValue: UInt64($0.replacingOccurrences(of: "cluster-", with: ""), radix: 16)!) }
            ?? file!.configuration.cluster
        let storeAddress = coordination ?? file?.coordination
        let configuration: Configuration
        if let storeAddress, case .zookeeper(let address) = CoordinationChoice(storeAddress) {
            let store = try ZooKeeperStore(connectString: address)
            defer { Task { await store.close() } }
            configuration = try await ConfigurationRecord.read(id, from: store).0
            print("source         the coordination store \(storeAddress)")
        } else {
            configuration = file!.configuration
            print("source         the cluster file (static: no configuration manager)")
        }
        print("cluster        \(configuration.cluster)")
        print("configuration  \(configuration.id.rawValue)")
        print("manager        \(configuration.manager.map(\.description) ?? "none")")
        print("members")
        for member in configuration.members { print("  \(member.node)  \(member.endpoint)\(member.client ? "  (client)" : "")") }
        print("regions")
        for placement in configuration.regions {
            print("  \(placement.region)  primary \(placement.primary)  backups \(placement.backups.map(\.description).joined(separator: ","))")
        }
        let under = ConfigurationRecord.underReplicated(configuration, replicas: replicas)
        if !under.isEmpty { print("under-replicated  \(under.map(\.description).joined(separator: ", "))") }
        guard let directory, let file else { return }
        // Each node's process and throughput: two reads of its metrics, --interval apart.
        let nodes = file.configuration.members.filter { !$0.client }.map(\.node)
        let ports = nodes.map { Self.metricsPort(directory: directory, node: $0) }
        let first = ports.map { $0.flatMap(Self.scrape) }
        let start = ContinuousClock.now
        try await Task.sleep(for: .seconds(interval))
        let second = ports.map { $0.flatMap(Self.scrape) }
        let elapsed = ContinuousClock.now - start
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        print("nodes (over \(String(format: "%.1f", seconds)) s)")
        for (index, node) in nodes.enumerated() {
            let process = ClusterDown.runningPid(directory: directory, node: node.index).map { "process \($0)" } ?? "not running"
            var line = "  \(node)  \(process)"
            if let port = ports[index] {
                if let before = first[index], let after = second[index] {
                    let records = Double(after.processed - before.processed) / seconds
                    let committed = Double(after.committed - before.committed) / seconds
                    line += "  metrics :\(port)  records \(String(format: "%.0f", records))/s  coordinated commits \(String(format: "%.0f", committed))/s"
                } else {
                    line += "  metrics :\(port) did not answer"
                }
            } else {
                line += "  (no metrics: cluster up --metrics-port-base)"
            }
            print(line)
        }
    }

    /// The metrics port node `node` announced in its log (`metrics PORT`, its first line when it
    /// serves metrics).
    static func metricsPort(directory: String, node: NodeID) -> UInt16? {
        guard let log = try? String(contentsOfFile: directory + "/\(node).log", encoding: .utf8) else { return nil }
        for line in log.split(separator: "\n").reversed() where line.hasPrefix("metrics ") {
            return UInt16(line.dropFirst("metrics ".count))
        }
        return nil
    }

    /// The records processed and the transactions coordinated that node's metrics on 127.0.0.1:`port`
    /// count now, or nil if it does not answer within a second.
    static func scrape(_ port: UInt16) -> (processed: Int, committed: Int)? {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var timeout = timeval(tv_sec: 1, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard connected == 0 else { return nil }
        let request = Array("GET /metrics HTTP/1.0\r\n\r\n".utf8)
        guard request.withUnsafeBytes({ send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) == request.count else { return nil }
        var response: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count <= 0 { break }
            response += buffer[0..<count]
        }
        var processed = 0, committed = 0
        for line in String(decoding: response, as: UTF8.self).split(separator: "\n") where !line.hasPrefix("#") {
            guard let value = line.split(separator: " ").last.flatMap({ Double($0) }) else { continue }
            if line.hasPrefix("granary_records_processed_total") { processed += Int(value) }
            if line.hasPrefix("granary_transactions_committed_total") { committed += Int(value) }
        }
        return (processed, committed)
    }
}
