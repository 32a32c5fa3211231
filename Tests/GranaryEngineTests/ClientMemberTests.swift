import Foundation
import Granary
import Testing

/// Client members (``Member/client``): in the cluster file, in validation, and never given a
/// replica by the configuration manager's placement.
@Suite("Configuration: client members")
struct ClientMemberTests {
    let nodes = (0..<3).map { NodeID($0) }
    let client = NodeID(3)

    func configuration() throws -> Configuration {
        var configuration = try Configuration(
            id: ConfigurationID(rawValue: 1), cluster: ClusterID.random(),
            members: nodes.map { Member(node: $0, endpoint: "shm:\($0)") } + [Member(node: client, endpoint: "shm:n3", client: true)],
            regions: Configuration.balancedPlacement(nodes: nodes, regionsPerNode: 1, replicas: 2), regionSize: 1 << 20)
        configuration.replication = 2
        return configuration
    }

    @Test("a client member's flag round-trips through JSON, is absent for other members, and defaults to false")
    func coding() throws {
        let configuration = try configuration()
        let json = String(decoding: try JSONEncoder().encode(configuration), as: UTF8.self)
        #expect(json.components(separatedBy: "\"client\":true").count == 2, "one member flagged in \(json)")
        let decoded = try JSONDecoder().decode(Configuration.self, from: Data(json.utf8))
        #expect(decoded == configuration)
        #expect(decoded.clients == [client] && decoded.servers == nodes, "clients \(decoded.clients), servers \(decoded.servers)")
        let plain = try JSONDecoder().decode(Member.self, from: Data(#"{"node": 5, "endpoint": "shm:x"}"#.utf8))
        #expect(!plain.client)
        #expect(configuration.withoutClients.members.map(\.node) == nodes)
    }

    @Test("a configuration placing a replica on a client is invalid, naming the region and the client")
    func replicaOnClientRefused() throws {
        var configuration = try configuration()
        configuration.regions[0].backups.append(client)
        #expect {
            try configuration.validate()
        } throws: { error in
            "\(error)".contains("\(configuration.regions[0].region)") && "\(error)".contains("client")
        }
        #expect(throws: ConfigurationError.self) { try configuration.placingNewRegion(primary: client) }
    }

    @Test("new regions, new backups after a removal and a joiner's backups never go to a client, even one holding nothing")
    func placementSkipsClients() throws {
        let configuration = try configuration()
        for primary in nodes {
            let placement = try configuration.placingNewRegion(primary: primary)
            #expect(!placement.replicas.contains(client), "\(placement)")
        }
        let placed = try ConfigurationRecord.placingNewRegions(6, replicas: 2, in: configuration)
        #expect(placed.regions.allSatisfy { !$0.replicas.contains(client) }, "\(placed)")
        // Without n0 the regions it held are short of replicas: the new backups go to n1 and n2
        // (which hold more replicas than the client's none).
        let without = ConfigurationRecord.removing(nodes[0], from: configuration)
        let replenished = ConfigurationRecord.replenishing(without, replicas: 2)
        #expect(replenished.regions.allSatisfy { !$0.replicas.contains(client) && $0.replicas.count == 2 }, "\(replenished)")
        try replenished.validate()
    }
}
