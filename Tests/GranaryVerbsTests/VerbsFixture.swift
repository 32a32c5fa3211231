import GranaryMemory
import GranaryTestSupport
import GranaryTransport
import GranaryVerbs
import Testing

/// Whether this machine has an RDMA device (a soft-RoCE `rxe0` in Scripts/softroce-vm's guest;
/// none on a host kernel without RDMA).
enum RDMADevice {
    static let names = VerbsTransport.deviceNames()
    static var isPresent: Bool { !names.isEmpty }
    static let skipReason: Comment = "no RDMA device: run Scripts/test softroce or Scripts/softroce-vm"
}

extension Trait where Self == ConditionTrait {
    /// Runs the test only where an RDMA device exists; elsewhere it is reported skipped with the
    /// reason (never passed silently).
    static var requiresRDMADevice: Self { .enabled(if: RDMADevice.isPresent, RDMADevice.skipReason) }
}

/// Two verbs nodes in this process, each with its own region directory (its endpoint) and
/// transport, both on the one RDMA device (soft-RoCE: every node of a host on `rxe0`).
struct VerbsFixture: TransportFixture {
    var options = VerbsTransport.Options()
    var regionSize = 1 << 20

    var description: String { "verbs on \(RDMADevice.names.first ?? "no device")" }

    /// The two transports, the remote node's data region and mailbox, and the directory to remove.
    struct Nodes {
        let a: VerbsTransport
        let b: VerbsTransport
        let directoryA: RegionDirectory
        let directoryB: RegionDirectory
        let region: Region
        let mailbox: Mailbox
        let temporary: TemporaryDirectory
        let cluster: ClusterID
    }

    func makeNodes() throws -> Nodes {
        let tmp = TemporaryDirectory("granary-verbs")
        let cluster = ClusterID.random()
        let dirA = try RegionDirectory(tmp.path.appending("n0"))
        let dirB = try RegionDirectory(tmp.path.appending("n1"))
        let a = try VerbsTransport(localNode: NodeID(0), cluster: cluster, directory: dirA, options: options)
        let b = try VerbsTransport(localNode: NodeID(1), cluster: cluster, directory: dirB, options: options)
        a.addPeer(NodeID(1), endpoint: dirB)
        b.addPeer(NodeID(0), endpoint: dirA)
        let region = try dirB.create(RegionID(5), size: regionSize, cluster: cluster)
        try b.register(region)
        let mailbox = try Mailbox(node: NodeID(1), directory: dirB, cluster: cluster, ringCapacity: 4096)
        try b.register(mailbox.region)
        return Nodes(a: a, b: b, directoryA: dirA, directoryB: dirB, region: region, mailbox: mailbox,
                     temporary: tmp, cluster: cluster)
    }

    func makePair() throws -> TransportPair {
        let nodes = try makeNodes()
        return TransportPair(local: nodes.a, remote: nodes.b, region: nodes.region.id, regionSize: regionSize,
                             remoteMailbox: nodes.mailbox, teardown: { nodes.temporary.remove() })
    }
}
