import ArgumentParser
import Foundation
import Granary
import SystemPackage
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
        commandName: "status", abstract: "Print the members, the configuration manager, the configuration id and the region map.")
    @Option(help: "The coordination store: zookeeper://host:port.") var coordination: String
    @Option(help: "The cluster id, in hex (as in cluster.json and the region files).") var cluster: String
    @Option(help: "Replicas every region should have (regions with fewer are listed as under-replicated).") var replicas: Int = 3

    func validate() throws {
        guard case .zookeeper? = CoordinationChoice(coordination) else {
            throw ValidationError("--coordination takes zookeeper://host:port, got '\(coordination)'")
        }
        guard UInt64(cluster.replacingOccurrences(of: "cluster-", with: ""), radix: 16) != nil else {
            throw ValidationError("--cluster must be a hex cluster id, got '\(cluster)'")
        }
    }

    func run() async throws {
        guard case .zookeeper(let address) = CoordinationChoice(coordination) else { return }
        let id = ClusterID(rawValue: UInt64(cluster.replacingOccurrences(of: "cluster-", with: ""), radix: 16)!)
        let store = try ZooKeeperStore(connectString: address)
        defer { Task { await store.close() } }
        let (configuration, _) = try await ConfigurationRecord.read(id, from: store)
        print("cluster        \(configuration.cluster)")
        print("configuration  \(configuration.id.rawValue)")
        print("manager        \(configuration.manager.map(\.description) ?? "none")")
        print("members")
        for member in configuration.members { print("  \(member.node)  \(member.endpoint)") }
        print("regions")
        for placement in configuration.regions {
            print("  \(placement.region)  primary \(placement.primary)  backups \(placement.backups.map(\.description).joined(separator: ","))")
        }
        let under = ConfigurationRecord.underReplicated(configuration, replicas: replicas)
        if !under.isEmpty { print("under-replicated  \(under.map(\.description).joined(separator: ", "))") }
    }
}
