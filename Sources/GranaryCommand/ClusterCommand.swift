import ArgumentParser
import Foundation
import Granary
import GranaryVerbs
import GranaryZooKeeper

/// `granary cluster`: inspect a cluster through its coordination store.
struct ClusterCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cluster", abstract: "Inspect a cluster.", subcommands: [ClusterStatus.self])
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
