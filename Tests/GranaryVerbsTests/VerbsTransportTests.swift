import Foundation
import GranaryMemory
import GranaryTestSupport
import GranaryTransport
import GranaryVerbs
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// What the verbs backend promises beyond the conformance suite: batches as one chain of work
/// requests, splitting of long accesses, several threads on one transport, clear errors for a
/// dead peer, a foreign cluster and a missing device.
@Suite("Verbs transport")
struct VerbsTransportTests {
    static func pattern(_ count: Int, seed: UInt8) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ Int(seed) &+ $0 >> 8) }
    }

    @Test("a batch to one peer is posted as one chain and completed with one wait", .requiresRDMADevice)
    func batchIsOneChain() throws {
        let nodes = try VerbsFixture().makeNodes()
        defer { nodes.temporary.remove() }
        let peer = nodes.b.localNode
        let base = GlobalAddress(region: nodes.region.id, offset: 65536)
        // Connect and learn the region first, so the counters below see only the batch.
        var zero = [UInt8](repeating: 0, count: 4096)
        try zero.withUnsafeMutableBytes { try nodes.a.write(to: peer, base, from: UnsafeRawBufferPointer($0)) }
        let before = nodes.a.statistics(for: peer)

        let writes = 16, adds = 16, reads = 16
        let sources = (0..<writes).map { Self.pattern(64, seed: UInt8($0)) }
        var destinations = [[UInt8]](repeating: [UInt8](repeating: 0, count: 64), count: reads)
        var batch = OperationBatch(capacity: writes + adds + reads)
        var addIndexes: [Int] = []
        let sourcePointers = sources.map { source -> UnsafeMutableRawBufferPointer in
            let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 8)
            copy.copyBytes(from: source)
            return copy
        }
        let destinationPointers = (0..<reads).map { _ in UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 8) }
        defer {
            sourcePointers.forEach { $0.deallocate() }
            destinationPointers.forEach { $0.deallocate() }
        }
        for index in 0..<writes {
            batch.write(to: peer, base.advanced(by: index * 64), from: UnsafeRawBufferPointer(sourcePointers[index]))
        }
        for index in 0..<adds {
            // Two adds per word: each sees the previous one's result (RC executes in order).
            addIndexes.append(batch.fetchAndAdd(at: peer, base.advanced(by: 2048 + (index / 2) * 8), UInt64(index + 1)))
        }
        for index in 0..<reads {
            batch.read(from: peer, base.advanced(by: index * 64), into: destinationPointers[index])
        }
        try nodes.a.execute(&batch)

        let after = nodes.a.statistics(for: peer)
        #expect(after.chainsPosted - before.chainsPosted == 1, "posts: \(before) -> \(after)")
        #expect(after.completionWaits - before.completionWaits == 1, "waits: \(before) -> \(after)")
        // A checked read (whole lines on a software device) is two READs of the same bytes.
        let readRequests = nodes.a.checksLineReads ? 2 * reads : reads
        #expect(after.workRequests - before.workRequests == writes + adds + readRequests)
        #expect(after.checkedReads - before.checkedReads == (nodes.a.checksLineReads ? reads : 0))
        #expect(after.connections == before.connections)
        for index in 0..<reads { destinations[index] = Array(destinationPointers[index]) }
        #expect(destinations == sources, "reads issued after writes in the same chain see the writes")
        for (position, index) in addIndexes.enumerated() {
            let expected: UInt64 = position % 2 == 0 ? 0 : UInt64(position)  // word was 0, then +position
            #expect(batch.result(index) == expected, "fetch-and-add #\(position) found \(batch.result(index))")
        }
    }

    @Test("a batch longer than the chain capacity is split into chains, results still in place", .requiresRDMADevice)
    func batchLongerThanChain() throws {
        var fixture = VerbsFixture()
        fixture.options.chainCapacity = 8
        let nodes = try fixture.makeNodes()
        defer { nodes.temporary.remove() }
        let peer = nodes.b.localNode
        let word = GlobalAddress(region: nodes.region.id, offset: 8192)
        _ = try nodes.a.fetchAndAdd(at: peer, word, 0)
        let before = nodes.a.statistics(for: peer)
        var batch = OperationBatch(capacity: 20)
        for _ in 0..<20 { batch.fetchAndAdd(at: peer, word, 1) }
        try nodes.a.execute(&batch)
        let after = nodes.a.statistics(for: peer)
        #expect(after.chainsPosted - before.chainsPosted == 3, "20 requests in chains of at most 8")
        #expect((0..<20).map { batch.result($0) } == (0..<20).map { UInt64($0) })
        #expect(try nodes.a.fetchAndAdd(at: peer, word, 0) == 20)
    }

    @Test("reads and writes longer than the staging buffer are split and round-trip", .requiresRDMADevice)
    func longAccesses() throws {
        var fixture = VerbsFixture()
        fixture.options.stagingBytes = 64 << 10
        fixture.regionSize = 1 << 20
        let nodes = try fixture.makeNodes()
        defer { nodes.temporary.remove() }
        let peer = nodes.b.localNode
        let address = GlobalAddress(region: nodes.region.id, offset: 4096 + 8)
        let count = 300_000 + 5
        let written = Self.pattern(count, seed: 9)
        try written.withUnsafeBytes { try nodes.a.write(to: peer, address, from: $0) }
        // The bytes are in the peer's memory, checked by its CPU.
        let landed = Array(UnsafeRawBufferPointer(start: nodes.region.base + Int(address.offset), count: count))
        #expect(landed == written)
        var read = [UInt8](repeating: 0, count: count)
        try read.withUnsafeMutableBytes { try nodes.a.read(from: peer, address, into: $0) }
        #expect(read == written)
        #expect(nodes.a.statistics(for: peer).workRequests >= 2 * (count / (64 << 10) + 1))
    }

    @Test("several threads on one transport: every fetch-and-add is applied once", .requiresRDMADevice)
    func concurrentAtomics() throws {
        let nodes = try VerbsFixture().makeNodes()
        defer { nodes.temporary.remove() }
        let transport = nodes.a
        let peer = nodes.b.localNode
        let word = GlobalAddress(region: nodes.region.id, offset: 16384)
        let threads = 4, perThread = 100
        let (seen, failures) = Self.addFromThreads(transport, peer, word, threads: threads, perThread: perThread)
        #expect(failures.isEmpty, "\(failures)")
        #expect(seen.sorted() == (0..<UInt64(threads * perThread)).map { $0 }, "each old value is seen exactly once")
        let final = nodes.region.base.advanced(by: 16384).load(as: UInt64.self)
        #expect(final == UInt64(threads * perThread))
    }

    /// Runs `threads` threads that each apply `perThread` fetch-and-adds of 1 to `word` (half of
    /// them singly, half in batches of 5), all holding their connections at once (each waits for
    /// the others' first operation before going on); returns the old values seen and the errors.
    static func addFromThreads(_ transport: VerbsTransport, _ peer: NodeID, _ word: GlobalAddress,
                               threads: Int, perThread: Int) -> (seen: [UInt64], failures: [String]) {
        let seen = Shared<[UInt64]>([])
        let failures = Shared<[String]>([])
        let started = Shared<Int>(0)
        runThreads(threads) { _ in
            var mine: [UInt64] = []
            do {
                mine.append(try transport.fetchAndAdd(at: peer, word, 1))
                started.withLock { $0 += 1 }
                while started.value < threads { sched_yield() }
                var batch = OperationBatch(capacity: 5)
                while mine.count < perThread {
                    if mine.count % 2 == 0 || perThread - mine.count < 5 {
                        mine.append(try transport.fetchAndAdd(at: peer, word, 1))
                    } else {
                        batch.removeAll()
                        for _ in 0..<5 { batch.fetchAndAdd(at: peer, word, 1) }
                        try transport.execute(&batch)
                        mine.append(contentsOf: (0..<5).map { batch.result($0) })
                    }
                }
            } catch {
                failures.withLock { $0.append("\(error)") }
                started.withLock { $0 += threads }
            }
            seen.withLock { $0.append(contentsOf: mine) }
        }
        return (seen.value, failures.value)
    }

    @Test("each thread gets its own connection to a peer; a thread that exits leaves it to the next", .requiresRDMADevice)
    func connectionPerThread() throws {
        let nodes = try VerbsFixture().makeNodes()
        defer { nodes.temporary.remove() }
        let transport = nodes.a
        let peer = nodes.b.localNode
        let word = GlobalAddress(region: nodes.region.id, offset: 24576)
        let threads = 4, perThread = 60
        let (seen, failures) = Self.addFromThreads(transport, peer, word, threads: threads, perThread: perThread)
        #expect(failures.isEmpty, "\(failures)")
        #expect(seen.sorted() == (0..<UInt64(threads * perThread)).map { $0 }, "each old value is seen exactly once")
        var statistics = transport.statistics(for: peer)
        #expect(statistics.connections == threads, "\(statistics)")
        #expect(statistics.queuePairs == threads, "\(statistics)")
        #expect(statistics.sharedChainsPosted == 0, "\(statistics)")
        // The peer kept one responder QP per connection: every thread's adds landed.
        #expect(nodes.region.base.advanced(by: 24576).load(as: UInt64.self) == UInt64(threads * perThread))

        // A new thread takes a slot given back by an exited one, and its connection as it is.
        runThreads(1) { _ in _ = try? transport.fetchAndAdd(at: peer, word, 1) }
        statistics = transport.statistics(for: peer)
        #expect(statistics.connections == threads, "\(statistics)")
        #expect(nodes.region.base.advanced(by: 24576).load(as: UInt64.self) == UInt64(threads * perThread + 1))

        // Dropping the peer's connections drops every thread's; each reconnects on its next use.
        transport.disconnect(from: peer)
        let again = Self.addFromThreads(transport, peer, word, threads: 2, perThread: 10)
        #expect(again.failures.isEmpty, "\(again.failures)")
        #expect(transport.statistics(for: peer).connections == threads + 2)
    }

    @Test("threads beyond connectionsPerPeer share one connection, and every operation still applies once", .requiresRDMADevice)
    func connectionLimit() throws {
        var fixture = VerbsFixture()
        fixture.options.connectionsPerPeer = 2
        let nodes = try fixture.makeNodes()
        defer { nodes.temporary.remove() }
        let peer = nodes.b.localNode
        let word = GlobalAddress(region: nodes.region.id, offset: 28672)
        let threads = 5, perThread = 40
        let (seen, failures) = Self.addFromThreads(nodes.a, peer, word, threads: threads, perThread: perThread)
        #expect(failures.isEmpty, "\(failures)")
        #expect(seen.sorted() == (0..<UInt64(threads * perThread)).map { $0 }, "each old value is seen exactly once")
        let statistics = nodes.a.statistics(for: peer)
        #expect(statistics.connections == 3, "2 own connections and the shared one: \(statistics)")
        #expect(statistics.queuePairs == 3, "\(statistics)")
        #expect(statistics.sharedChainsPosted > 0, "\(statistics)")
    }

    @Test("a removed peer is unknown and its connections are gone; added again, it is reachable", .requiresRDMADevice)
    func removePeer() throws {
        let nodes = try VerbsFixture().makeNodes()
        defer { nodes.temporary.remove() }
        let peer = nodes.b.localNode
        let word = GlobalAddress(region: nodes.region.id, offset: 32768)
        #expect(try nodes.a.fetchAndAdd(at: peer, word, 1) == 0)
        nodes.a.removePeer(peer)
        #expect(!nodes.a.peerNodes.contains(peer))
        #expect(throws: TransportError.unknownNode(peer)) { _ = try nodes.a.fetchAndAdd(at: peer, word, 1) }
        nodes.a.addPeer(peer, endpoint: nodes.directoryB)
        #expect(try nodes.a.fetchAndAdd(at: peer, word, 1) == 1)
        #expect(nodes.a.statistics(for: peer).connections == 2)
    }

    @Test("a closed peer is reported as unreachable, naming it, from its RDMA CM disconnect", .requiresRDMADevice)
    func deadPeer() throws {
        var pair = try ClosablePair()
        defer { pair.temporary.remove() }
        let a = pair.a
        let address = GlobalAddress(region: RegionID(2), offset: 4096)
        var word: UInt64 = 0
        try withUnsafeMutableBytes(of: &word) { try a.read(from: NodeID(1), address, into: $0) }
        #expect(a.statistics(for: NodeID(1)).connections == 1)

        pair.b = nil  // the peer's transport closes: its responder QP is destroyed
        let start = monotonicNanoseconds()
        do {
            try withUnsafeMutableBytes(of: &word) { try a.read(from: NodeID(1), address, into: $0) }
            Issue.record("a read from a closed peer succeeded")
        } catch let error as TransportError {
            let elapsed = Double(monotonicNanoseconds() - start) / 1e9
            print("dead peer, after \(Int(elapsed * 1000)) ms: \(error)")
            guard case .peerUnreachable(let node, let detail) = error else {
                Issue.record("expected peerUnreachable, got \(error)")
                return
            }
            #expect(node == NodeID(1))
            // The disconnect its closing sent through the RDMA CM, not the QP's retransmissions
            // (about 1.6 s, and more under emulation: IBV_WC_RETRY_EXC_ERR).
            #expect(detail.contains("RDMA_CM_EVENT_DISCONNECTED"), "\(error)")
            #expect(elapsed < 4, "reported after \(elapsed) s")
        }
        // The next operation reconnects, and finds no endpoint.
        do {
            try withUnsafeMutableBytes(of: &word) { try a.read(from: NodeID(1), address, into: $0) }
            Issue.record("a read from a gone peer succeeded")
        } catch let error as TransportError {
            print("gone peer: \(error)")
            guard case .peerUnreachable(NodeID(1), let detail) = error else {
                Issue.record("expected peerUnreachable from n1, got \(error)")
                return
            }
            // Its transport emptied its endpoint file when it closed.
            #expect(detail.contains("verbs.endpoint") && detail.contains("not running"), "\(error)")
        }
    }

    @Test("after a dropped connection the next operation reconnects", .requiresRDMADevice)
    func reconnect() throws {
        let nodes = try VerbsFixture().makeNodes()
        defer { nodes.temporary.remove() }
        let peer = nodes.b.localNode
        let address = GlobalAddress(region: nodes.region.id, offset: 8192)
        #expect(try nodes.a.compareAndSwap(at: peer, address, expected: 0, desired: 11) == 0)
        nodes.a.disconnect(from: peer)
        #expect(try nodes.a.compareAndSwap(at: peer, address, expected: 11, desired: 12) == 11)
        #expect(nodes.a.statistics(for: peer).connections == 2)
        #expect(nodes.region.base.advanced(by: 8192).load(as: UInt64.self) == 12)
    }

    @Test("a node reaches its own regions, and localPointer is its own mapping", .requiresRDMADevice)
    func ownRegions() throws {
        let nodes = try VerbsFixture().makeNodes()
        defer { nodes.temporary.remove() }
        let own = nodes.b
        #expect(try own.localPointer(nodes.region.id) == nodes.region.base)
        #expect(throws: TransportError.self) { _ = try own.localPointer(RegionID(77)) }
        let address = GlobalAddress(region: nodes.region.id, offset: 12288)
        #expect(try own.fetchAndAdd(at: own.localNode, address, 5) == 0)
        #expect(nodes.region.base.advanced(by: 12288).load(as: UInt64.self) == 5)
    }

    @Test("a peer of another cluster is refused, naming both clusters", .requiresRDMADevice)
    func foreignCluster() throws {
        let nodes = try VerbsFixture().makeNodes()
        defer { nodes.temporary.remove() }
        let strangerDirectory = try RegionDirectory(nodes.temporary.path.appending("stranger"))
        let otherCluster = ClusterID.random()
        let stranger = try VerbsTransport(localNode: NodeID(2), cluster: otherCluster, directory: strangerDirectory)
        stranger.addPeer(NodeID(1), endpoint: nodes.directoryB)
        var word: UInt64 = 0
        do {
            try withUnsafeMutableBytes(of: &word) {
                try stranger.read(from: NodeID(1), GlobalAddress(region: nodes.region.id, offset: 4096), into: $0)
            }
            Issue.record("a node of another cluster read a region")
        } catch let error as TransportError {
            #expect("\(error)".contains("\(nodes.cluster)") && "\(error)".contains("\(otherCluster)"), "\(error)")
        }
    }

    @Test("a second transport for a node whose endpoint is live is refused", .requiresRDMADevice)
    func endpointInUse() throws {
        let nodes = try VerbsFixture().makeNodes()
        defer { nodes.temporary.remove() }
        #expect {
            _ = try VerbsTransport(localNode: NodeID(1), cluster: nodes.cluster, directory: nodes.directoryB)
        } throws: { error in
            guard let error = error as? VerbsError, case .endpoint = error else { return false }
            return "\(error)".contains("another verbs transport serves this region directory")
        }
    }

    @Test("a peer added by address (ip:port, as nodes on other hosts are) is reached through the RDMA CM", .requiresRDMADevice)
    func peerByAddress() throws {
        let nodes = try VerbsFixture().makeNodes()
        defer { nodes.temporary.remove() }
        let peer = nodes.b.localNode
        // The endpoint file holds the address the transport listens on.
        let published = try String(contentsOfFile: nodes.b.endpointPath, encoding: .utf8)
        #expect(published == nodes.b.listenAddress + "\n", "endpoint file: \(published.debugDescription)")
        nodes.a.addPeer(peer, address: nodes.b.listenAddress)
        let address = GlobalAddress(region: nodes.region.id, offset: 16384)
        #expect(try nodes.a.compareAndSwap(at: peer, address, expected: 0, desired: 77) == 0)
        var word: UInt64 = 0
        try withUnsafeMutableBytes(of: &word) { try nodes.a.read(from: peer, address, into: $0) }
        #expect(word == 77)
        #expect(nodes.region.base.advanced(by: 16384).load(as: UInt64.self) == 77)
        #expect(nodes.a.statistics(for: peer).connections == 1)
    }

    @Test("a fixed listen address serves peers; a second transport on it is refused naming the address", .requiresRDMADevice)
    func fixedListenAddress() throws {
        let tmp = TemporaryDirectory("granary-verbs")
        defer { tmp.remove() }
        let cluster = ClusterID.random()
        let probe = try VerbsTransport(localNode: NodeID(0), cluster: cluster, directory: try RegionDirectory(tmp.path.appending("probe")))
        let ip = String(probe.listenAddress.split(separator: ":")[0])
        let fixed = "\(ip):\(20_000 + Int.random(in: 0..<20_000))"
        var options = VerbsTransport.Options()
        options.listenAddress = fixed
        let dirB = try RegionDirectory(tmp.path.appending("n1"))
        let b = try VerbsTransport(localNode: NodeID(1), cluster: cluster, directory: dirB, options: options)
        #expect(b.listenAddress == fixed)
        let region = try dirB.create(RegionID(3), size: 1 << 20, cluster: cluster)
        try b.register(region)
        probe.addPeer(NodeID(1), address: fixed)
        #expect(try probe.fetchAndAdd(at: NodeID(1), GlobalAddress(region: RegionID(3), offset: 64), 9) == 0)
        #expect(region.base.advanced(by: 64).load(as: UInt64.self) == 9)
        #expect {
            _ = try VerbsTransport(localNode: NodeID(2), cluster: cluster, directory: try RegionDirectory(tmp.path.appending("n2")),
                                   options: options)
        } throws: { error in
            guard let error = error as? VerbsError, case .endpoint(let path, let detail) = error else { return false }
            return path == fixed && detail.contains("in use")
        }
    }

    @Test("an address no transport listens on, and one that is not an address, are errors naming it", .requiresRDMADevice)
    func unreachableAddresses() throws {
        let nodes = try VerbsFixture().makeNodes()
        defer { nodes.temporary.remove() }
        let ip = String(nodes.b.listenAddress.split(separator: ":")[0])
        let nobody = "\(ip):\(40_000 + Int.random(in: 0..<20_000))"
        nodes.a.addPeer(NodeID(3), address: nobody)
        var word: UInt64 = 0
        do {
            try withUnsafeMutableBytes(of: &word) { try nodes.a.read(from: NodeID(3), GlobalAddress(region: RegionID(5), offset: 0), into: $0) }
            Issue.record("a read from an address nobody listens on succeeded")
        } catch let error as TransportError {
            print("nobody listening: \(error)")
            guard case .peerUnreachable(NodeID(3), let detail) = error else {
                Issue.record("expected peerUnreachable from n3, got \(error)")
                return
            }
            #expect(detail.contains(nobody), "\(error)")
        }
        nodes.a.addPeer(NodeID(4), address: "no-such-host.invalid:7471")
        do {
            try withUnsafeMutableBytes(of: &word) { try nodes.a.read(from: NodeID(4), GlobalAddress(region: RegionID(5), offset: 0), into: $0) }
            Issue.record("a read from an unresolvable host succeeded")
        } catch let error as TransportError {
            print("bad address: \(error)")
            #expect("\(error)".contains("no-such-host.invalid"), "\(error)")
        }
    }

    @Test("a peer whose process restarted: once one thread has met the new process, another's connection to the former one is made again, not used", .requiresRDMADevice)
    func restartedPeer() throws {
        var pair = try ClosablePair()
        defer { pair.temporary.remove() }
        let (a, region) = (pair.a, pair.region)
        let address = GlobalAddress(region: RegionID(2), offset: 256)
        // This thread connects to b's first process.
        #expect(try a.fetchAndAdd(at: NodeID(1), address, 1) == 0)
        pair.b = nil
        let restarted = try VerbsTransport(localNode: NodeID(1), cluster: pair.cluster, directory: pair.directoryB)
        try restarted.register(region)
        // Another thread meets the new process (its connect sees a new incarnation).
        runThreads(1) { _ in _ = try? a.fetchAndAdd(at: NodeID(1), address, 10) }
        #expect(region.base.advanced(by: 256).load(as: UInt64.self) == 11, "the other thread's add did not land")
        // This thread's connection is to the former process: it is made again, and the add lands
        // (without the generation check it would wait for a retry-exceeded completion and fail).
        let start = monotonicNanoseconds()
        #expect(try a.fetchAndAdd(at: NodeID(1), address, 100) == 11)
        print("restarted peer: first add on the old thread took \((monotonicNanoseconds() - start) / 1_000_000) ms")
        #expect(region.base.advanced(by: 256).load(as: UInt64.self) == 111)
        #expect(a.statistics(for: NodeID(1)).connections == 3)
    }

    @Test("a region the peer never registered is an unknown region, read from its table", .requiresRDMADevice)
    func unregisteredRegion() throws {
        let nodes = try VerbsFixture().makeNodes()
        defer { nodes.temporary.remove() }
        var word: UInt64 = 0
        #expect {
            try withUnsafeMutableBytes(of: &word) { try nodes.a.read(from: nodes.b.localNode, GlobalAddress(region: RegionID(9), offset: 0), into: $0) }
        } throws: { error in
            guard let error = error as? TransportError, case .unknownRegion(NodeID(1), RegionID(9), _) = error else { return false }
            return true
        }
        // Registered afterwards, it is found (a miss is not cached).
        let late = try nodes.directoryB.create(RegionID(9), size: 1 << 20, cluster: nodes.cluster)
        try nodes.b.register(late)
        late.base.advanced(by: 128).storeBytes(of: UInt64(0xFEED), as: UInt64.self)
        try withUnsafeMutableBytes(of: &word) { try nodes.a.read(from: nodes.b.localNode, GlobalAddress(region: RegionID(9), offset: 128), into: $0) }
        #expect(word == 0xFEED)
    }

    @Test("a device name that does not exist is an error listing the devices present", .requiresRDMADevice)
    func unknownDevice() throws {
        let tmp = TemporaryDirectory("granary-verbs")
        defer { tmp.remove() }
        let directory = try RegionDirectory(tmp.path.appending("n0"))
        #expect(throws: VerbsError.noDevice(requested: "granary-no-such-device", available: RDMADevice.names)) {
            _ = try VerbsTransport(localNode: NodeID(0), cluster: .random(), directory: directory,
                                   options: .init(device: "granary-no-such-device"))
        }
    }

    @Test("options the transport cannot use are an error naming the option, before any device is opened (no trap)")
    func invalidOptions() throws {
        let tmp = TemporaryDirectory("granary-verbs")
        defer { tmp.remove() }
        let directory = try RegionDirectory(tmp.path.appending("n0"))
        for (name, change) in [("stagingBytes", { (o: inout VerbsTransport.Options) in o.stagingBytes = 100 }),
                               ("chainCapacity", { (o: inout VerbsTransport.Options) in o.chainCapacity = 0 }),
                               ("connectionsPerPeer", { (o: inout VerbsTransport.Options) in o.connectionsPerPeer = -1 })] {
            var options = VerbsTransport.Options()
            change(&options)
            do {
                _ = try VerbsTransport(localNode: NodeID(0), cluster: .random(), directory: directory, options: options)
                Issue.record("\(name) out of range was accepted")
            } catch {
                guard case .invalidOption(let named, _, _) = error else { Issue.record("\(name): \(error)"); continue }
                #expect(named == name, "\(error)")
            }
        }
    }

    @Test("without an RDMA device, opening the transport says how to get soft-RoCE",
          .enabled(if: !RDMADevice.isPresent, "an RDMA device is present (this checks the error on machines without one)"))
    func noDevice() throws {
        let tmp = TemporaryDirectory("granary-verbs")
        defer { tmp.remove() }
        let directory = try RegionDirectory(tmp.path.appending("n0"))
        do {
            _ = try VerbsTransport(localNode: NodeID(0), cluster: .random(), directory: directory)
            Issue.record("opening a verbs transport without a device succeeded")
        } catch {
            guard case .noDevice = error else {
                Issue.record("expected noDevice, got \(error)")
                return
            }
            #expect("\(error)".contains("Scripts/softroce-up") && "\(error)".contains("Scripts/softroce-vm"), "\(error)")
        }
    }

    @Test("the device's atomic capability is reported", .requiresRDMADevice)
    func atomicCapability() throws {
        let nodes = try VerbsFixture().makeNodes()
        defer { nodes.temporary.remove() }
        // rxe implements atomics in its responder (IBV_ATOMIC_HCA); no device used here lacks them.
        #expect(nodes.a.atomicCapability != .none)
        #expect(nodes.a.deviceName == RDMADevice.names.first)
    }
}

/// Node 0's transport and node 1's, which a test may close (`b = nil`) as a process that exits
/// would; node 1 registered its region 2 (1 MiB), and node 0 knows node 1 by its directory.
struct ClosablePair {
    let temporary = TemporaryDirectory("granary-verbs")
    let cluster = ClusterID.random()
    let directoryB: RegionDirectory
    let a: VerbsTransport
    var b: VerbsTransport?
    let region: Region

    init() throws {
        let directoryA = try RegionDirectory(temporary.path.appending("n0"))
        directoryB = try RegionDirectory(temporary.path.appending("n1"))
        a = try VerbsTransport(localNode: NodeID(0), cluster: cluster, directory: directoryA)
        b = try VerbsTransport(localNode: NodeID(1), cluster: cluster, directory: directoryB)
        a.addPeer(NodeID(1), endpoint: directoryB)
        region = try directoryB.create(RegionID(2), size: 1 << 20, cluster: cluster)
        try b!.register(region)
    }
}
