import Foundation
import GranaryMemory
import GranaryTestSupport
import GranaryTransport
import Testing

/// A `granary node` child process owns regions; this process acts on them with one-sided
/// operations and messages, then SIGKILLs the child. Everything written must be in the region files.
@Suite("Multi-process shared memory")
struct NodeProcessTests {
    @Test("one-sided writes into a child's regions survive SIGKILL of the child and are read back from the files")
    func writesSurviveChildKill() throws {
        let tmp = TemporaryDirectory("granary-mp")
        defer { tmp.remove() }
        let cluster = ClusterID.random()
        let childDir = tmp.path.appending("n1")
        let parentDir = try RegionDirectory(tmp.path.appending("n0"))
        let child = try ChildProcess(ChildProcess.granaryExecutable(), [
            "node", "--id", "1", "--directory", childDir.string, "--cluster", String(cluster.rawValue, radix: 16),
            "--regions", "1,2", "--region-size", "\(1 << 20)", "--peer", "0=\(parentDir.path.string)",
        ])
        let ready = try child.readLine()
        #expect(ready == "ready n1 \(cluster) r1,r2", "child said: \(ready)")

        let transport = SharedMemoryTransport(localNode: NodeID(0), cluster: cluster, directory: parentDir)
        let mailbox = try Mailbox(node: NodeID(0), directory: parentDir, cluster: cluster, ringCapacity: 4096)
        try transport.register(mailbox.region)
        transport.addPeer(NodeID(1), endpoint: try RegionDirectory(childDir, create: false))
        let node = NodeID(1)

        // Writes of many sizes into both regions, remembered for the check after the kill.
        var expected: [(GlobalAddress, [UInt8])] = []
        for region in [RegionID(1), RegionID(2)] {
            for (offset, count) in [(8192, 64), (12345, 7), (65536, 4096), ((1 << 20) - 128, 128)] {
                let address = GlobalAddress(region: region, offset: UInt32(offset))
                let bytes = (0..<count).map { UInt8(truncatingIfNeeded: $0 ^ offset ^ Int(region.rawValue)) }
                try bytes.withUnsafeBytes { try transport.write(to: node, address, from: $0) }
                expected.append((address, bytes))
            }
        }
        let word = GlobalAddress(region: RegionID(1), offset: 16384)
        #expect(try transport.compareAndSwap(at: node, word, expected: 0, desired: 41) == 0)
        #expect(try transport.fetchAndAdd(at: node, word, 1) == 41)

        // Messages both ways: the child echoes each message into this process's mailbox.
        let sender = try ChannelSender(transport: transport, to: node)
        var echoes: [String] = []
        for i in 0..<20 { try Array("ping \(i)".utf8).withUnsafeBytes { try sender.send($0) } }
        let deadline = Date().addingTimeInterval(30)
        while echoes.count < 20, Date() < deadline {
            try mailbox.receiver(from: node).poll { echoes.append(String(decoding: $0, as: UTF8.self)) }
            usleep(1000)
        }
        #expect(echoes == (0..<20).map { "echo:ping \($0)" })

        child.kill(SIGKILL)
        #expect(child.process.terminationReason == .uncaughtSignal)

        // Fresh mappings of the files the dead child owned.
        let files = try RegionDirectory(childDir, create: false)
        let regions = try [RegionID(1), RegionID(2)].map { try files.open($0, cluster: cluster) }
        for (address, bytes) in expected {
            let region = regions[Int(address.region.rawValue) - 1]
            let found = Array(UnsafeRawBufferPointer(start: region.base + Int(address.offset), count: bytes.count))
            #expect(found == bytes, "bytes at \(address) differ after the child was killed")
        }
        #expect((regions[0].base + 16384).load(as: UInt64.self) == 42)
    }
}
