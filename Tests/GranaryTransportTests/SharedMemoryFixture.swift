import GranaryMemory
import GranaryTestSupport
import GranaryTransport

/// Two shared-memory nodes in this process, each with its own directory and transport.
struct SharedMemoryFixture: TransportFixture {
    var description: String { "shared memory" }

    func makePair() throws -> TransportPair {
        let tmp = TemporaryDirectory("granary-shm")
        let cluster = ClusterID.random()
        let dirA = try RegionDirectory(tmp.path.appending("n0"))
        let dirB = try RegionDirectory(tmp.path.appending("n1"))
        let a = SharedMemoryTransport(localNode: NodeID(0), cluster: cluster, directory: dirA)
        let b = SharedMemoryTransport(localNode: NodeID(1), cluster: cluster, directory: dirB)
        a.addPeer(NodeID(1), endpoint: dirB)
        b.addPeer(NodeID(0), endpoint: dirA)
        let size = 1 << 20
        let region = try dirB.create(RegionID(5), size: size, cluster: cluster)
        try b.register(region)
        let mailbox = try Mailbox(node: NodeID(1), directory: dirB, cluster: cluster, ringCapacity: 4096)
        try b.register(mailbox.region)
        return TransportPair(local: a, remote: b, region: RegionID(5), regionSize: size, remoteMailbox: mailbox,
                             teardown: { tmp.remove() })
    }
}
