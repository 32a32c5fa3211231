// The shared-memory transport beside the raw operation on the same bytes, in the same run.
// Each measured iteration performs its operation 1,000 times (`operations`), and the reported
// wall-clock time is per iteration: nanoseconds per 1,000 operations, i.e. picoseconds per
// operation. (With a scaling factor the tool would report whole nanoseconds per operation, too
// coarse for a ratio of two figures near 10 ns.)
import Benchmark
import Granary
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Two nodes in this process over the shared-memory transport, with a region on node 1.
final class Setup: @unchecked Sendable {
    // Built once before the benchmarks run and only read afterwards (benchmarks run one at a time).
    let directory: String
    let local: SharedMemoryTransport
    let remote: SharedMemoryTransport
    let region = RegionID(1)
    let remoteBase: UnsafeMutableRawPointer
    let sender: ChannelSender
    let mailbox: Mailbox
    // Source and destination in one allocation, 2 KiB apart modulo 4 KiB: two separate 4 KiB
    // allocations lie a few lines apart modulo 4 KiB (128 bytes in a test program), so loads from the source waited on stores
    // to the destination with the same low address bits (4K aliasing), in the raw copies and the
    // channel alike.
    let buffers = UnsafeMutableRawPointer.allocate(byteCount: 4 * 4096, alignment: 4096)
    var source: UnsafeMutableRawPointer { buffers }
    var destination: UnsafeMutableRawPointer { buffers + 4096 + 2048 }
    /// A ring-sized buffer at the same offset modulo 4 KiB as the mailbox's first ring.
    let ringScratch = UnsafeMutableRawPointer.allocate(byteCount: 65536 + 8192, alignment: 4096) + 4160

    init() throws {
        var template = Array("/tmp/granary-bench-XXXXXX".utf8CString)
        _ = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        directory = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let cluster = ClusterID.random()
        let dirA = try RegionDirectory(FilePath(directory + "/n0"))
        let dirB = try RegionDirectory(FilePath(directory + "/n1"))
        local = SharedMemoryTransport(localNode: NodeID(0), cluster: cluster, directory: dirA)
        remote = SharedMemoryTransport(localNode: NodeID(1), cluster: cluster, directory: dirB)
        local.addPeer(NodeID(1), endpoint: dirB)
        let data = try dirB.create(region, size: 1 << 20, cluster: cluster)
        try remote.register(data)
        remoteBase = data.base
        let mailbox = try Mailbox(node: NodeID(1), directory: dirB, cluster: cluster)
        try remote.register(mailbox.region)
        // As in an embedded cluster, node 0 uses node 1's own mapping of the files (one mapping
        // per file in the process; see SharedMemoryTransport.adopt). With a second mapping the
        // receiver's loads would hit lines just stored through another virtual address, which
        // the CPU cannot forward from its store buffer (measured: 38 instead of 32 ns a message).
        try local.adopt(data, of: NodeID(1))
        try local.adopt(mailbox.region, of: NodeID(1))
        sender = try ChannelSender(transport: local, to: NodeID(1))
        self.mailbox = mailbox
        memset(source, 0x5A, 4096)
        // A committed object of 16 lines at offset 65536, so reads see a consistent object.
        ObjectLayout.stamp(remoteBase + 65536, lines: 16, header: ObjectHeader(version: 1, incarnation: 0, allocated: true))
        // Touch the mappings once so the first measured operation does not open files.
        try local.read(from: NodeID(1), GlobalAddress(region: region, offset: 65536), into: UnsafeMutableRawBufferPointer(start: destination, count: 64))
    }
}

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .mallocCountTotal],
        timeUnits: .nanoseconds,  // per 1,000 operations
        warmupIterations: 10,
        scalingFactor: .one,
        maxDuration: .seconds(2),
        maxIterations: 100_000
    )
    let setup = try! Setup()
    let operations = 1000
    let objectAddress = GlobalAddress(region: setup.region, offset: 65536)
    let wordAddress = GlobalAddress(region: setup.region, offset: 8192)

    for size in [64, 1024] {
        Benchmark("raw memcpy \(size) B") { benchmark in
            for _ in benchmark.scaledIterations { for _ in 0..<operations {
                memcpy(setup.destination, setup.remoteBase + 65536, size)
                blackHole(setup.destination.load(as: UInt8.self))
            } }
        }
        // The engine's read of an object: its header is a sequence lock over all its lines.
        Benchmark("shm one-sided read \(size) B object") { benchmark in
            let buffer = UnsafeMutableRawBufferPointer(start: setup.destination, count: size)
            for _ in benchmark.scaledIterations { for _ in 0..<operations {
                try setup.local.readObject(from: NodeID(1), objectAddress, into: buffer)
                blackHole(setup.destination.load(as: UInt8.self))
            } }
        }
        // A read of whole lines that may belong to several objects: a sequence lock per line.
        Benchmark("shm one-sided read \(size) B of lines") { benchmark in
            let buffer = UnsafeMutableRawBufferPointer(start: setup.destination, count: size)
            for _ in benchmark.scaledIterations { for _ in 0..<operations {
                try setup.local.read(from: NodeID(1), objectAddress, into: buffer)
                blackHole(setup.destination.load(as: UInt8.self))
            } }
        }
    }

    Benchmark("raw CAS") { benchmark in
        let word = (setup.remoteBase + 8192).assumingMemoryBound(to: Atomic<UInt64>.self)
        var value: UInt64 = word.pointee.load(ordering: .relaxed)
        for _ in benchmark.scaledIterations { for _ in 0..<operations {
            value = word.pointee.compareExchange(expected: value, desired: value &+ 1,
                                                 successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring).original &+ 1
        } }
        blackHole(value)
    }
    Benchmark("shm one-sided CAS") { benchmark in
        var value = try setup.local.fetchAndAdd(at: NodeID(1), wordAddress, 0)
        for _ in benchmark.scaledIterations { for _ in 0..<operations {
            value = try setup.local.compareAndSwap(at: NodeID(1), wordAddress, expected: value, desired: value &+ 1) &+ 1
        } }
        blackHole(value)
    }

    Benchmark("raw memcpy 256 B twice (into a ring, out of it)") { benchmark in
        for _ in benchmark.scaledIterations { for _ in 0..<operations {
            memcpy(setup.destination + 1024, setup.source, 256)
            memcpy(setup.destination, setup.destination + 1024, 256)
            blackHole(setup.destination.load(as: UInt8.self))
        } }
    }
    Benchmark("raw memcpy 256 B twice through a 64 KiB ring (positions advance as the channel's)") { benchmark in
        let ring = setup.ringScratch
        var position = 0
        for _ in benchmark.scaledIterations { for _ in 0..<operations {
            memcpy(ring + position + 64, setup.source, 256)
            memcpy(setup.destination, ring + position + 64, 256)
            blackHole(setup.destination.load(as: UInt8.self))
            position += 320
            if position + 448 > 65536 { position = 0 }
        } }
    }
    // The receiving side is a poller that holds its mailbox's poll claim while it serves (a
    // node's poller takes it once per round over its rings; here the round is the whole loop).
    // "receive one": the poller takes one message (limit 1), as a receive of one message does.
    // "poll until empty": the poller's default, which after the message also looks at the next
    // header to find the ring empty (a line the sender has not written yet).
    for (name, limit) in [("receive one", 1), ("poll until empty", Int.max)] {
        Benchmark("shm channel message 256 B (send + \(name))") { benchmark in
            let message = UnsafeRawBufferPointer(start: setup.source, count: 256)
            let sender = setup.sender
            let destination = setup.destination
            try setup.mailbox.withPoller { poller in
                for _ in benchmark.scaledIterations { for _ in 0..<operations {
                    try sender.send(message)
                    try poller.poll(from: NodeID(0), limit: limit) { bytes in
                        memcpy(destination, bytes.baseAddress!, bytes.count)
                    }
                    blackHole(destination.load(as: UInt8.self))
                } }
            }
        }
    }
}
