import ArgumentParser
import Granary
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// `granary node`: one node process. It owns its region files and a mailbox in `--directory`,
/// answers the messages its peers send it, and runs until killed.
struct NodeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "node",
        abstract: "Run one node process that owns regions in a directory.",
        discussion: """
            Prints one line `ready <node> <cluster> <regions>` on standard output once its regions \
            and mailbox exist, then serves until killed. Each message a peer sends it is echoed \
            back to that peer, prefixed with "echo:".
            """
    )

    @Option(name: .long, help: "This node's id (0..<\(NodeID.limit)).")
    var id: Int

    @Option(name: .long, help: "The node's region directory (created if missing).")
    var directory: String

    @Option(name: .long, help: "The cluster id, in hex, stamped into and checked in every region file.")
    var cluster: String

    @Option(name: .long, help: "Transport: shm (shared memory on this host).")
    var transport: String = "shm"

    @Option(name: .long, help: "Data regions to create: ids, comma-separated (existing files are opened, never re-created).")
    var regions: String = ""

    @Option(name: .long, help: "Size of each new data region in bytes (a power of two).")
    var regionSize: Int = 1 << 20

    @Option(name: .long, help: "A peer as ID=DIRECTORY; repeatable.")
    var peer: [String] = []

    func validate() throws {
        guard (0..<NodeID.limit).contains(id) else { throw ValidationError("--id must be in 0..<\(NodeID.limit), got \(id)") }
        guard UInt64(cluster, radix: 16) != nil else { throw ValidationError("--cluster must be a hex number, got '\(cluster)'") }
        guard transport == "shm" else {
            throw ValidationError("--transport \(transport) is not available in this build; use --transport shm")
        }
        for entry in peer where entry.split(separator: "=", maxSplits: 1).count != 2 || Int(entry.split(separator: "=")[0]) == nil {
            throw ValidationError("--peer takes ID=DIRECTORY, got '\(entry)'")
        }
    }

    func run() throws {
        let node = NodeID(id)
        let clusterID = ClusterID(rawValue: UInt64(cluster, radix: 16)!)
        let home = try RegionDirectory(FilePath(directory))
        let shm = SharedMemoryTransport(localNode: node, cluster: clusterID, directory: home)
        var owned: [Region] = []
        for field in regions.split(separator: ",") {
            guard let number = Int(field), (0..<RegionID.limit).contains(number) else {
                throw ValidationError("--regions takes region ids in 0..<\(RegionID.limit), got '\(field)'")
            }
            let id = RegionID(number)
            let region = try home.openOrCreate(id, size: regionSize, cluster: clusterID)
            try shm.register(region)
            owned.append(region)
        }
        let mailbox = try Mailbox(node: node, directory: home, cluster: clusterID)
        try shm.register(mailbox.region)
        var peers: [NodeID] = []
        for entry in peer {
            let parts = entry.split(separator: "=", maxSplits: 1)
            let peerID = NodeID(Int(parts[0])!)
            shm.addPeer(peerID, endpoint: try RegionDirectory(FilePath(String(parts[1])), create: false))
            peers.append(peerID)
        }
        print("ready \(node) \(clusterID) \(owned.map(\.id.description).joined(separator: ","))")
        fflush(nil)

        var senders: [NodeID: ChannelSender] = [:]
        var backoff = Backoff()
        let reply = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 << 10, alignment: 8)
        defer { reply.deallocate() }
        while true {
            var handled = 0
            for from in peers {
                handled += try mailbox.receiver(from: from).poll { message in
                    let prefix = Array("echo:".utf8)
                    let length = min(prefix.count + message.count, reply.count)
                    reply.copyBytes(from: prefix)
                    UnsafeMutableRawBufferPointer(rebasing: reply[prefix.count..<length])
                        .copyMemory(from: UnsafeRawBufferPointer(rebasing: message[0..<(length - prefix.count)]))
                    if senders[from] == nil { senders[from] = try ChannelSender(transport: shm, to: from) }
                    try senders[from]!.send(UnsafeRawBufferPointer(rebasing: reply[0..<length]))
                }
            }
            if handled > 0 { backoff.reset() } else { backoff.pause() }
        }
    }
}
