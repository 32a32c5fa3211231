// example-verbs-read: one-sided RDMA operations as Granary's nodes use them, over libibverbs.
//
// Two nodes on one RDMA device (a soft-RoCE `rxe` device will do: Scripts/softroce-vm runs this in
// a guest that has one), each a VerbsTransport in this process with its region directory. Node 1
// holds a region; node 0 reads from it, compares-and-swaps a word in it and adds to another, with
// one-sided verbs that run no code on node 1's CPU: node 1's thread is never asked anything, yet
// its memory changes. This is how a Granary transaction reads objects and how leases and logs
// move between nodes.
//
//   swift run example-verbs-read            (GRANARY_RDMA_DEVICE picks the device; default: the first)
import GranaryMemory
import GranaryTransport
import GranaryVerbs
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Where in node 1's region the example works: past the region's header and slab table.
let greetingOffset: UInt32 = 1 << 16
let casOffset: UInt32 = (1 << 16) + 4096
let counterOffset: UInt32 = (1 << 16) + 4096 + 64

func run() throws {
    var template = Array("/tmp/granary-example-verbs-XXXXXX".utf8CString)
    guard template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) != nil else {
        throw RegionError.systemCall(call: "mkdtemp", path: "/tmp", message: String(cString: strerror(errno)))
    }
    let root = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    defer { _ = system("rm -rf '\(root)'") }

    let cluster = ClusterID.random()
    let home0 = try RegionDirectory(FilePath(root + "/n0"))
    let home1 = try RegionDirectory(FilePath(root + "/n1"))
    let node0 = try VerbsTransport(localNode: NodeID(0), cluster: cluster, directory: home0)
    let node1 = try VerbsTransport(localNode: NodeID(1), cluster: cluster, directory: home1)
    // Node 1's memory: a region file mapped and registered with its device (a memory region
    // whose key node 0 learns when it connects).
    let region = try home1.create(RegionID(1), size: 1 << 20, cluster: cluster)
    try node1.register(region)
    let greeting = Array("hello from n1's memory, read without n1's CPU".utf8)
    greeting.withUnsafeBytes { (region.base + Int(greetingOffset)).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }

    // Each node finds the other through its region directory (queue pairs connect on first use).
    node0.addPeer(NodeID(1), endpoint: home1)
    node1.addPeer(NodeID(0), endpoint: home0)

    // RDMA READ.
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 64)
    defer { buffer.deallocate() }
    let span = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<greeting.count])
    try node0.read(from: NodeID(1), GlobalAddress(region: RegionID(1), offset: greetingOffset), into: span)
    let read = Array(span)
    print("read:  \"\(String(decoding: read, as: UTF8.self))\"")
    guard read == greeting else { throw ExampleFailure("the read returned other bytes than node 1 holds") }

    // RDMA ATOMIC compare-and-swap: 0 -> 42, then a second one that must fail (the word is 42).
    let first = try node0.compareAndSwap(at: NodeID(1), GlobalAddress(region: RegionID(1), offset: casOffset), expected: 0, desired: 42)
    let second = try node0.compareAndSwap(at: NodeID(1), GlobalAddress(region: RegionID(1), offset: casOffset), expected: 0, desired: 7)
    let word = (region.base + Int(casOffset)).load(as: UInt64.self)
    print("cas:   0 -> 42 found \(first), 0 -> 7 found \(second); node 1's word is now \(word)")
    guard first == 0, second == 42, word == 42 else { throw ExampleFailure("compare-and-swap did not act as one: found \(first), \(second), word \(word)") }

    // RDMA ATOMIC fetch-and-add, ten times.
    for _ in 0..<10 { _ = try node0.fetchAndAdd(at: NodeID(1), GlobalAddress(region: RegionID(1), offset: counterOffset), 5) }
    let counter = (region.base + Int(counterOffset)).load(as: UInt64.self)
    print("faa:   10 x +5: node 1's counter is \(counter)")
    guard counter == 50 else { throw ExampleFailure("fetch-and-add left \(counter), not 50") }

    // RDMA WRITE: node 0 changes node 1's greeting.
    let reply = Array("written by n0".utf8)
    reply.withUnsafeBytes { buffer.copyMemory(from: $0) }
    try node0.write(to: NodeID(1), GlobalAddress(region: RegionID(1), offset: greetingOffset),
                    from: UnsafeRawBufferPointer(rebasing: buffer[0..<reply.count]))
    let now = String(decoding: UnsafeRawBufferPointer(start: region.base + Int(greetingOffset), count: reply.count), as: UTF8.self)
    print("write: node 1's memory now begins \"\(now)\"")
    guard now == "written by n0" else { throw ExampleFailure("the write did not land") }
    print("one-sided verbs on \(node0.deviceName): read, compare-and-swap, fetch-and-add and write, with no code run on node 1")
}

struct ExampleFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

do {
    try run()
} catch {
    let message = Array("example-verbs-read: \(error)\n".utf8)
    _ = message.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    exit(1)
}
