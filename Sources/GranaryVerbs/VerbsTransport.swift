import CIBVerbs
import CRDMACM
import GranaryMemory
import GranaryTransport
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The one-sided transport over RDMA verbs (InfiniBand, RoCE; soft-RoCE `rxe` for testing).
///
/// Every one-sided operation is a work request on a reliable-connected (RC) queue pair, executed by
/// the NICs: the peer's CPU never runs.
///
/// **Device.** One device per transport: `Options.device`, else `GRANARY_RDMA_DEVICE`, else the
/// first one libibverbs lists; port 1 by default. The source GID index is `Options.gidIndex`, else
/// `GRANARY_RDMA_GID_INDEX`, else the first RoCE v2 GID holding an IPv4 address. One protection
/// domain per transport (per node); each registered region is one memory region
/// (`ibv_reg_mr`, local write + remote read/write/atomic).
///
/// **Endpoints and connections.** Connections are made with the RDMA connection manager
/// (librdmacm): each transport listens on an `ip:port` (``listenAddress``; `Options.listenAddress`,
/// else its device's IPv4 address and a port the RDMA CM picks) and writes that address into the
/// endpoint file `verbs.endpoint` of its region directory, which it holds locked (a second
/// transport for the same directory is refused). Peers are added by address
/// (``addPeer(_:address:)``: nodes on other hosts, `verbs://ip:port` in a configuration) or by
/// region directory (``addPeer(_:endpoint:)``: nodes of one host, whose endpoint file is read at
/// each connection, so a restarted node on a new port is found). The first operation towards a
/// peer connects lazily: the requester resolves the address and route, creates its RC QP and
/// sends a connect request naming its cluster and node; the peer's listener thread creates the
/// responder QP and accepts, with the address and rkey of its region table in the private data;
/// both move their QPs to RTS with the RDMA CM's path attributes. Regions are then looked up by
/// one RDMA READ of the peer's table entry on first use (address, rkey, size) and cached until the
/// connection is dropped. Every step is bounded by `Options.endpointTimeout`; see
/// `EndpointProtocol` for the private data. Connect requests and acceptances carry each
/// transport's incarnation (random, per opening): a peer seen with a new one has restarted, and
/// every connection to its former process is made again before its next use.
///
/// Each direction of a node pair is its own RC connection: a node posts only on the QP it created
/// towards a peer, and the responder QP the peer created for it is never posted to.
///
/// **Data path.** Callers pass arbitrary pointers; the transport copies through a registered
/// staging buffer per connection (WRITEs up to the QP's inline size go inline, without the copy). A
/// batch (``execute(_:)``) is posted as one chain of work requests per peer with one
/// `ibv_post_send`, only the last request signalled (RC completes in order), and one completion
/// wait. Nothing is allocated per operation: the staging buffer, the work-request arrays and the
/// completion array are allocated at the first connection and reused.
///
/// **Threads.** The transport may be used from several threads, and each thread has its own
/// connection towards each peer: its own RC QP, completion queue, staging buffer and work-request
/// arrays, made (by one more endpoint exchange) on the thread's first operation towards that peer.
/// Threads do not wait for each other: each posts and polls under its own connection's lock, which
/// others take only to drop the connection or read its counters. The number of such connections
/// is bounded by `Options.connectionsPerPeer` (16 by default) per peer: the first that many threads
/// to operate through the transport get a thread slot (see `ThreadSlots`); later threads share
/// one more connection per peer and take turns on its lock (post + poll under it). A slot goes
/// back when its thread exits, and its connections stay up for the next thread that takes it. A
/// batch takes its thread's connections to the peers it names in node order.
///
/// **Ordering** (the guarantees `Transport` documents): a WRITE's last 8-byte word becomes visible
/// last, as RC RDMA WRITE places data in order in practice (rxe copies packet by packet, in
/// order). A READ of whole cache lines reads each line as a unit: on a hardware NIC that is
/// assumed of its DMA (as FaRM does), not guaranteed by the verbs specification. On a software
/// device (rxe, siw) a READ is a `memcpy` in the kernel, which a concurrent writer can tear inside a
/// line (measured: about 1 accepted read in 1,600 of the torn-read stress was torn). There, a READ
/// of whole lines is *checked*: it is posted twice in the same chain, and a line whose two copies
/// differ comes back with the lock bit of its first word set, so the object check rejects it (see
/// ``Options/checkedLineReads``). The chain still has one completion wait.
///
/// **Atomics.** Compare-and-swap and fetch-and-add are NIC atomics. They are atomic with CPU atomics
/// on the same word only if ``atomicCapability`` is ``VerbsAtomicCapability/global``; rxe reports
/// ``VerbsAtomicCapability/hca``. Do not mix CPU and NIC atomics on one word otherwise (Granary's
/// engine locks objects at the primary's CPU and never uses NIC atomics on lock words).
///
/// **Failures.** Error completions become `TransportError`s naming the peer, the operation and the
/// `ibv_wc_status_str` text; `IBV_WC_RETRY_EXC_ERR` (a dead peer) is
/// `TransportError.peerUnreachable(node:detail:)`, reported after about 0.5 s of retransmissions.
/// After any error the connection is dropped and the next operation reconnects.
///
/// `@unchecked Sendable`: all stored properties are immutable; each `Peer`'s endpoint and each
/// `Connection`'s mutable state are guarded by their own locks, `ThreadSlots` guards its free
/// list with a lock (a thread's slot table belongs to that thread), `LocalRegions` publishes with release/acquire atomics, and the
/// `Listener`'s state belongs to its thread.
public final class VerbsTransport: Transport, @unchecked Sendable {
    /// Tuning of a transport. The defaults suit tests and small clusters.
    public struct Options: Sendable {
        /// The RDMA device's name; nil: `GRANARY_RDMA_DEVICE`, else the first device.
        public var device: String?
        /// The device port.
        public var port: UInt8
        /// The source GID index; nil: `GRANARY_RDMA_GID_INDEX`, else discovered.
        public var gidIndex: Int?
        /// The registered staging buffer per connection; also the largest piece one READ or WRITE work
        /// request carries (longer accesses are split).
        public var stagingBytes: Int
        /// The most work requests in one posted chain (the send queue depth).
        public var chainCapacity: Int
        /// The inline data size asked of each QP (the device may grant less).
        public var inlineBytes: Int
        /// How long to wait for a chain's completion before dropping the connection.
        public var completionTimeout: Duration
        /// How long an endpoint exchange (connect, region look-up) may take.
        public var endpointTimeout: Duration
        /// How many threads get their own connection (QP, staging buffer, ...) towards each peer;
        /// further threads share one connection per peer, in turns. 0: every thread shares it.
        public var connectionsPerPeer: Int
        /// The `ip:port` to listen on (IPv4; port 0: one the RDMA CM picks). nil:
        /// `GRANARY_VERBS_LISTEN` if set, else the device's IPv4 address (from its source GID) and
        /// a port the RDMA CM picks. Nodes on other hosts reach a node at a fixed port, so give
        /// one there.
        public var listenAddress: String?
        /// Whether a READ of whole cache lines is posted twice and compared line by line, so that a
        /// line torn by a concurrent writer is flagged (see the type's *Ordering* paragraph). nil:
        /// `GRANARY_VERBS_CHECKED_READS` (`0` or `1`) if set, else on software devices (rxe, siw),
        /// whose READ is a CPU copy, and not on hardware NICs.
        public var checkedLineReads: Bool?

        /// Options; each parameter sets the property of its name, and the defaults are a 256 KiB
        /// staging buffer, chains of 64 work requests, 64 inline bytes, 5-second completion and
        /// endpoint timeouts and 16 connections per peer.
        ///
        /// - Parameters:
        ///   - device: the RDMA device's name (``device``).
        ///   - port: the device port.
        ///   - gidIndex: the source GID index (``gidIndex``).
        ///   - stagingBytes: the staging buffer per connection, in bytes.
        ///   - chainCapacity: the most work requests in one chain.
        ///   - inlineBytes: the inline data size asked of each QP, in bytes.
        ///   - completionTimeout: how long to wait for a chain's completion.
        ///   - endpointTimeout: how long an endpoint exchange may take.
        ///   - connectionsPerPeer: threads with a connection of their own towards each peer.
        ///   - checkedLineReads: whether whole-line READs are posted twice and compared (``checkedLineReads``).
        ///   - listenAddress: the `ip:port` to listen on (``listenAddress``).
        public init(device: String? = nil, port: UInt8 = 1, gidIndex: Int? = nil, stagingBytes: Int = 256 << 10,
                    chainCapacity: Int = 64, inlineBytes: Int = 64, completionTimeout: Duration = .seconds(5),
                    endpointTimeout: Duration = .seconds(5), connectionsPerPeer: Int = 16,
                    checkedLineReads: Bool? = nil, listenAddress: String? = nil) {
            self.listenAddress = listenAddress
            self.device = device
            self.port = port
            self.gidIndex = gidIndex
            self.stagingBytes = stagingBytes
            self.chainCapacity = chainCapacity
            self.inlineBytes = inlineBytes
            self.completionTimeout = completionTimeout
            self.endpointTimeout = endpointTimeout
            self.connectionsPerPeer = connectionsPerPeer
            self.checkedLineReads = checkedLineReads
        }

        var completionTimeoutNanoseconds: UInt64 { completionTimeout.wholeNanoseconds }
        var endpointTimeoutMilliseconds: Int { Int(endpointTimeout.wholeNanoseconds / 1_000_000) }
    }

    /// Counters of the work done towards one peer, summed over the threads' connections.
    public struct Statistics: Sendable, Equatable {
        /// RC connections made: one per thread that talked to the peer (plus the shared one, if
        /// used), more after reconnects.
        public var connections = 0
        /// Connections (QPs) that have connected at least once: one per thread slot used, plus
        /// the shared connection if used.
        public var queuePairs = 0
        /// Chains posted on the connection shared by the threads beyond `Options.connectionsPerPeer`.
        public var sharedChainsPosted = 0
        /// `ibv_post_send` calls (one per chain).
        public var chainsPosted = 0
        /// Work requests posted.
        public var workRequests = 0
        /// Completion waits (one per chain).
        public var completionWaits = 0
        /// Reads of whole lines posted as two READs and compared (software devices).
        public var checkedReads = 0
        /// Lines those comparisons found changed between the two copies, returned flagged.
        public var flaggedLines = 0
        /// Every counter at 0.
        public init() {}
    }

    /// The node this transport acts for.
    public let localNode: NodeID
    /// The cluster; a peer of another cluster is refused at connection time.
    public let cluster: ClusterID
    /// This node's region directory; its endpoint file is ``endpointPath``.
    public let directory: RegionDirectory
    /// The options the transport was opened with.
    public let options: Options
    let device: VerbsDevice
    let regions: LocalRegions
    let listener: Listener
    /// The endpoint file, open and locked (`flock`) for the transport's life.
    private let endpointFile: Int32
    /// One per possible node id; a peer without an endpoint is unknown.
    let peers: [Peer]
    /// Which connection of each peer a thread uses.
    let slots: ThreadSlots
    /// Whether reads of whole cache lines are checked (posted twice and compared); see
    /// ``Options/checkedLineReads``.
    public let checksLineReads: Bool
    /// Whether reads may tear words (see `Transport.readsMayTearWords`): where line reads are
    /// checked, that is a software device's copy or one the options or environment say to
    /// distrust.
    public var readsMayTearWords: Bool { checksLineReads }

    /// The name of the device in use (e.g. `rxe0`).
    public var deviceName: String { device.name }
    /// The source GID index in use.
    public var gidIndex: Int { Int(device.gidIndex) }
    /// Whether the device's atomics are atomic with CPU atomics (see the type's documentation).
    public var atomicCapability: VerbsAtomicCapability { device.atomicCapability }
    /// The path of this node's endpoint file (it holds ``listenAddress``).
    public var endpointPath: String { Self.endpointPath(of: directory) }

    /// The `ip:port` this transport listens on for RDMA CM connection requests.
    public var listenAddress: String { listener.address }

    /// The path of the endpoint file of the node whose region directory is `directory`.
    public static func endpointPath(of directory: RegionDirectory) -> String {
        directory.path.appending(EndpointProtocol.fileName).string
    }

    /// The names of the RDMA devices present (empty on a kernel without RDMA).
    public static func deviceNames() -> [String] { VerbsDevice.deviceNames() }

    /// Opens the device, allocates the protection domain, listens for connections (see
    /// ``listenAddress``) and writes the address into the endpoint file of `directory`. The node
    /// can reach itself without ``addPeer(_:endpoint:)``.
    ///
    /// - Throws: ``VerbsError/noDevice(requested:available:)`` (the message says how to get a
    ///   soft-RoCE device), ``VerbsError/call(_:device:detail:)`` for a failed verbs or RDMA CM
    ///   call, or ``VerbsError/endpoint(path:detail:)`` if another live transport serves the
    ///   directory, the listen address is not usable or is in use.
    public init(localNode: NodeID, cluster: ClusterID, directory: RegionDirectory, options: Options = Options()) throws(VerbsError) {
        guard options.stagingBytes >= 4096, options.stagingBytes & 63 == 0 else {
            throw .invalidOption(name: "stagingBytes", value: options.stagingBytes, allowed: "a multiple of 64, at least 4096")
        }
        guard options.chainCapacity >= 1, options.chainCapacity <= 4096 else {
            throw .invalidOption(name: "chainCapacity", value: options.chainCapacity, allowed: "1...4096")
        }
        guard options.connectionsPerPeer >= 0, options.connectionsPerPeer <= 1024 else {
            throw .invalidOption(name: "connectionsPerPeer", value: options.connectionsPerPeer, allowed: "0...1024")
        }
        self.localNode = localNode
        self.cluster = cluster
        self.directory = directory
        self.options = options
        let device = try VerbsDevice(requested: options.device, port: options.port, gidIndex: options.gidIndex)
        let path = Self.endpointPath(of: directory)
        let file = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard file >= 0 else { throw .endpoint(path: path, detail: "open: \(errnoText(errno))") }
        guard flock(file, LOCK_EX | LOCK_NB) == 0 else {
            let code = errno
            close(file)
            throw .endpoint(path: path, detail: code == EWOULDBLOCK
                ? "another verbs transport serves this region directory (is node \(localNode) already running?)"
                : "flock: \(errnoText(code))")
        }
        let listen: sockaddr_in
        var generator = SystemRandomNumberGenerator()
        let incarnation = UInt64.random(in: 1...UInt64.max, using: &generator)
        let peers: [Peer]
        do throws(VerbsError) {
            listen = try Self.listenAddress(options, device: device)
            peers = (0..<NodeID.limit).map { index in
                Peer(node: NodeID(index), localNode: localNode, cluster: cluster, device: device, source: listen,
                     incarnation: incarnation, configuration: options)
            }
            self.regions = try LocalRegions(device: device, node: localNode)
            self.listener = try Listener(address: listen, device: device, regions: regions, node: localNode, cluster: cluster,
                                         incarnation: incarnation) { node, value in
                if node.index < NodeID.limit { peers[node.index].noteIncarnation(value) }
            }
        } catch {
            close(file)
            throw error
        }
        self.peers = peers
        self.device = device
        self.endpointFile = file
        let text = Array((listener.address + "\n").utf8)
        guard ftruncate(file, 0) == 0, text.withUnsafeBytes({ pwrite(file, $0.baseAddress, $0.count, 0) }) == text.count else {
            let code = errno
            close(file)
            throw .endpoint(path: path, detail: "writing the address \(listener.address): \(errnoText(code))")
        }
        self.slots = ThreadSlots(capacity: options.connectionsPerPeer)
        self.checksLineReads = options.checkedLineReads
            ?? environment("GRANARY_VERBS_CHECKED_READS").map { $0 != "0" } ?? device.isSoftware
        try listener.start()
        if localNode.index < NodeID.limit {
            peers[localNode.index].setEndpoint(.address(listener.address))
        }
    }

    /// Where a transport with `options` listens: the option, `GRANARY_VERBS_LISTEN`, or the
    /// device's IPv4 address with port 0.
    private static func listenAddress(_ options: Options, device: VerbsDevice) throws(VerbsError) -> sockaddr_in {
        if let text = options.listenAddress ?? environment("GRANARY_VERBS_LISTEN") {
            switch EndpointProtocol.socketAddress(text) {
            case .success(let address): return address
            case .failure(let error): throw .endpoint(path: text, detail: "the listen address is not usable: \(error.reason)")
            }
        }
        guard let ip = device.ipv4Address else {
            throw .endpoint(path: "\(device.name) GID \(device.gidText)",
                            detail: "the device's source GID holds no IPv4 address to listen on; give Options.listenAddress (ip:port) or GRANARY_VERBS_LISTEN")
        }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr = ip
        address.sin_port = 0
        return address
    }

    deinit {
        // Responder QPs go first: peers see their operations fail (retry exceeded) instead of
        // landing in memory that is about to be unmapped.
        listener.stop()
        // Threads' slot tables drop their entries for this transport on their next miss or exit.
        slots.close()
        for peer in peers { peer.disconnectAll(release: true) }
        // An empty endpoint file tells peers that no transport serves the directory.
        _ = ftruncate(endpointFile, 0)
        close(endpointFile)
    }

    /// Adds (or re-points) the peer `node` of this host, whose region directory — and endpoint
    /// file — is `endpoint`. Connecting waits for the first operation.
    public func addPeer(_ node: NodeID, endpoint: RegionDirectory) {
        // NodeID values come from validated configurations; one beyond the table reaches nothing.
        guard node.index < NodeID.limit else { return }
        peers[node.index].setEndpoint(.file(Self.endpointPath(of: endpoint)))
    }

    /// Adds (or re-points) the peer `node`, whose transport listens on `address` (`ip:port` or
    /// `host:port`; see ``listenAddress``). Connecting waits for the first operation; an address
    /// that does not parse or resolve fails it, naming the address.
    public func addPeer(_ node: NodeID, address: String) {
        guard node.index < NodeID.limit else { return }
        peers[node.index].setEndpoint(.address(address))
    }

    /// Removes the peer `node`: every thread's connection to it is destroyed (QP, completion queue,
    /// staging buffer) and operations towards it fail with `TransportError.unknownNode(_:)` until
    /// it is added again.
    public func removePeer(_ node: NodeID) {
        guard node.index < NodeID.limit else { return }
        peers[node.index].setEndpoint(nil, release: true)
    }

    /// Drops every thread's connection to `node` (their QPs); the next operation of each thread
    /// reconnects.
    public func disconnect(from node: NodeID) {
        guard node.index < NodeID.limit else { return }
        peers[node.index].disconnectAll()
    }

    /// The nodes this transport can reach (itself included).
    public var peerNodes: [NodeID] {
        peers.compactMap { peer in peer.endpoint == nil ? nil : peer.node }
    }

    /// How many times this transport found `node`'s transport started again: a connection
    /// request from `node`, or the acceptance of a connection to it, carried another incarnation
    /// than the one last seen.
    public func peerGeneration(of node: NodeID) -> UInt64 {
        guard node.index < NodeID.limit else { return 0 }
        return peers[node.index].generation
    }

    /// What was done towards `node` so far.
    public func statistics(for node: NodeID) -> Statistics {
        guard node.index < NodeID.limit else { return Statistics() }
        return peers[node.index].statistics
    }

    // MARK: Transport

    /// Registers `region` with the NIC (`ibv_reg_mr` over the whole mapping). Registering a region
    /// id again changes nothing.
    ///
    /// - Throws: `TransportError.backend(call:node:detail:)` naming `ibv_reg_mr`; for ENOMEM the
    ///   message says to raise the memlock limit (`ulimit -l unlimited`).
    public func register(_ region: Region) throws(TransportError) {
        try regions.register(region)
    }

    /// Registers `region` in place of the region of the same id registered before (a node's new
    /// incarnation in this process: its lease page is new memory, so that the configuration
    /// manager, reading the former page through what it cached, sees the former incarnation
    /// silent). Peers find the new one once they look the region up again (after
    /// ``disconnect(from:)``, as when the node joins). The former registration stays until the
    /// transport closes.
    public func register(replacing region: Region) throws(TransportError) {
        try regions.register(region, replacing: true)
    }

    /// The start of this node's own registered region `region` (its mapping, which the NIC serves
    /// to peers).
    ///
    /// - Throws: `TransportError.unknownRegion(node:region:reason:)` if it was not registered.
    public func localPointer(_ region: RegionID) throws(TransportError) -> UnsafeMutableRawPointer {
        guard let record = regions.record(region) else {
            throw .unknownRegion(node: localNode, region: region, reason: "this node has not registered it with its verbs transport")
        }
        return record.pointee.base
    }

    /// The calling thread's connection towards `node`.
    @inline(__always)
    func connection(_ node: NodeID) throws(TransportError) -> Connection {
        guard node.index < NodeID.limit else { throw .unknownNode(node) }
        return peers[node.index].connections[slots.current()]
    }

    /// Copies `buffer.count` bytes at `address` on `node` into `buffer`: RDMA READ into the staging
    /// buffer, then a copy. One round trip (more for reads longer than `Options.stagingBytes`).
    ///
    /// A checked read (whole lines on a software device) whose copies disagree on some line is
    /// repeated, up to ``checkedReadAttempts`` times, before the flagged lines are returned.
    public func read(from node: NodeID, _ address: GlobalAddress, into buffer: UnsafeMutableRawBufferPointer) throws(TransportError) {
        let peer = try self.connection(node)
        peer.lock()
        defer { peer.unlock() }
        let (remote, rkey) = try peer.resolve(address, buffer.count)
        guard let destination = buffer.baseAddress, buffer.count > 0 else { return }
        let checked = checks(address, buffer.count)
        var attempt = 0
        repeat {
            try Self.appendRead(peer, remote: remote, rkey: rkey, length: buffer.count, into: destination, address: address,
                                checked: checked)
            try peer.flush { _, _ in }
            attempt += 1
        } while checked && peer.lastChainFlaggedLines > 0 && attempt < Self.checkedReadAttempts
    }

    /// How many times ``read(from:_:into:)`` posts a checked read whose two copies disagree.
    public static let checkedReadAttempts = 4

    /// Whether a read of `length` bytes at `address` is checked: whole lines, line-aligned, on a
    /// transport that checks them.
    @inline(__always)
    private func checks(_ address: GlobalAddress, _ length: Int) -> Bool {
        checksLineReads && (Int(address.offset) | length) & (ObjectLayout.lineSize - 1) == 0
    }

    /// Copies `buffer` to `address` on `node` with RDMA WRITE; returns when its completion arrives
    /// (the data is then placed in the peer's memory, not necessarily persistent).
    public func write(to node: NodeID, _ address: GlobalAddress, from buffer: UnsafeRawBufferPointer) throws(TransportError) {
        let peer = try self.connection(node)
        peer.lock()
        defer { peer.unlock() }
        let (remote, rkey) = try peer.resolve(address, buffer.count)
        guard let source = buffer.baseAddress, buffer.count > 0 else { return }
        try Self.appendWrite(peer, remote: remote, rkey: rkey, length: buffer.count, from: source, address: address)
        try peer.flush { _, _ in }
    }

    /// ATOMIC_CMP_AND_SWP on the word at `address` on `node`. One round trip.
    public func compareAndSwap(at node: NodeID, _ address: GlobalAddress, expected: UInt64, desired: UInt64) throws(TransportError) -> UInt64 {
        try atomic(node, address, operand: expected, desired: desired)
    }

    /// ATOMIC_FETCH_AND_ADD on the word at `address` on `node`. One round trip.
    public func fetchAndAdd(at node: NodeID, _ address: GlobalAddress, _ delta: UInt64) throws(TransportError) -> UInt64 {
        try atomic(node, address, operand: delta, desired: nil)
    }

    @inline(__always)
    private func atomic(_ node: NodeID, _ address: GlobalAddress, operand: UInt64, desired: UInt64?) throws(TransportError) -> UInt64 {
        let name = desired == nil ? "fetch-and-add" : "compare-and-swap"
        guard address.offset & 7 == 0 else { throw .misaligned(node: node, address: address, operation: name) }
        try checkAtomics(node, name)
        let peer = try self.connection(node)
        peer.lock()
        defer { peer.unlock() }
        let (remote, rkey) = try peer.resolve(address, 8)
        peer.appendAtomic(remote: remote, rkey: rkey, operand: operand, desired: desired, batchIndex: -1, address: address)
        var found: UInt64 = 0
        try peer.flush { _, word in found = word }
        return found
    }

    @inline(__always)
    private func checkAtomics(_ node: NodeID, _ name: String) throws(TransportError) {
        if device.atomicCapability == .none {
            throw .backend(call: name, node: node, detail: "device \(device.name) has no atomic operations (atomic_cap IBV_ATOMIC_NONE)")
        }
    }

    /// Appends a READ split into pieces the staging buffer holds, posting and completing the chain
    /// whenever it is full.
    /// A checked read appends each piece as two READs (`Connection.appendCheckedRead(remote:rkey:length:into:address:)`),
    /// in pieces of half the staging buffer.
    @inline(__always)
    private static func appendRead(_ peer: Connection, remote: UInt64, rkey: UInt32, length: Int,
                                   into destination: UnsafeMutableRawPointer?, address: GlobalAddress,
                                   checked: Bool) throws(TransportError) {
        if checked {
            let pieceBytes = (peer.pieceBytes / 2) & ~(ObjectLayout.lineSize - 1)
            var done = 0
            while done < length {
                let piece = min(length - done, pieceBytes)
                if !peer.hasRoom(bytes: 2 * piece, requests: 2) { try peer.flush { _, _ in } }
                peer.appendCheckedRead(remote: remote &+ UInt64(done), rkey: rkey, length: piece,
                                       into: destination.map { $0 + done }, address: address.advanced(by: done))
                done += piece
            }
            return
        }
        try inPieces(peer, length: length) { done, piece in
            peer.appendRead(remote: remote &+ UInt64(done), rkey: rkey, length: piece, into: destination.map { $0 + done },
                            address: address.advanced(by: done))
        }
    }

    @inline(__always)
    private static func appendWrite(_ peer: Connection, remote: UInt64, rkey: UInt32, length: Int,
                                    from source: UnsafeRawPointer?, address: GlobalAddress) throws(TransportError) {
        try inPieces(peer, length: length) { done, piece in
            peer.appendWrite(remote: remote &+ UInt64(done), rkey: rkey, length: piece, from: source.map { $0 + done },
                             address: address.advanced(by: done))
        }
    }

    /// Calls `append(offset, piece)` for consecutive pieces of `length` bytes that the staging
    /// buffer holds, flushing the chain first whenever the next piece does not fit.
    @inline(__always)
    private static func inPieces(_ peer: Connection, length: Int, _ append: (Int, Int) -> Void) throws(TransportError) {
        var done = 0
        while done < length {
            let piece = min(length - done, peer.pieceBytes)
            if !peer.hasRoom(bytes: piece) { try peer.flush { _, _ in } }
            append(done, piece)
            done += piece
        }
    }

    /// Issues every operation of `batch` and waits once per peer named in it.
    ///
    /// Every address is checked (and every peer connected) before anything is posted, so a bad
    /// address fails the batch without side effects. The operations for one peer are posted as one
    /// chain in batch order (more chains only if they exceed `Options.chainCapacity` or the staging
    /// buffer); chains to different peers are in flight together.
    public func execute(_ batch: inout OperationBatch) throws(TransportError) {
        let count = batch.count
        guard count > 0 else { return }
        // The peers involved, as a bit set (node ids are below 64).
        var involved: UInt64 = 0
        for index in 0..<count {
            let node = batch[index].node
            guard node.index < NodeID.limit else { throw .unknownNode(node) }
            involved |= 1 << UInt64(node.index)
        }
        // This thread's connections. Locks in ascending node order, so two batches on the shared
        // connections never wait on each other's locks.
        let slot = slots.current()
        var bits = involved
        while bits != 0 {
            peers[bits.trailingZeroBitCount].connections[slot].lock()
            bits &= bits - 1
        }
        defer {
            var bits = involved
            while bits != 0 {
                let peer = peers[bits.trailingZeroBitCount].connections[slot]
                peer.discardChain()
                peer.unlock()
                bits &= bits - 1
            }
        }
        // Check everything before posting anything.
        for index in 0..<count {
            let op = batch[index]
            switch op.kind {
            case .compareAndSwap, .fetchAndAdd:
                let name = op.kind == .compareAndSwap ? "compare-and-swap" : "fetch-and-add"
                guard op.address.offset & 7 == 0 else { throw .misaligned(node: op.node, address: op.address, operation: name) }
                try checkAtomics(op.node, name)
                _ = try peers[op.node.index].connections[slot].resolve(op.address, 8)
            case .read, .write:
                _ = try peers[op.node.index].connections[slot].resolve(op.address, op.length)
            }
        }
        // Build the chains (a full chain is posted and completed on the spot).
        for index in 0..<count {
            let op = batch[index]
            let peer = peers[op.node.index].connections[slot]
            switch op.kind {
            case .read:
                guard op.length > 0, op.buffer != nil else { continue }
                let (remote, rkey) = try peer.resolve(op.address, op.length)
                try Self.appendRead(peer, remote: remote, rkey: rkey, length: op.length, into: op.buffer, address: op.address,
                                    checked: checks(op.address, op.length))
            case .write:
                guard op.length > 0, let buffer = op.buffer else { continue }
                let (remote, rkey) = try peer.resolve(op.address, op.length)
                try Self.appendWrite(peer, remote: remote, rkey: rkey, length: op.length, from: buffer, address: op.address)
            case .compareAndSwap, .fetchAndAdd:
                let (remote, rkey) = try peer.resolve(op.address, 8)
                if !peer.hasRoom(bytes: 8) { try peer.flush { index, word in batch[index].result = word } }
                peer.appendAtomic(remote: remote, rkey: rkey, operand: op.operand,
                                  desired: op.kind == .compareAndSwap ? op.desired : nil, batchIndex: index, address: op.address)
            }
        }
        // Post every peer's chain, then wait for each: the round trips overlap.
        var firstError: TransportError? = nil
        var posted: UInt64 = 0
        bits = involved
        while bits != 0 {
            let node = bits.trailingZeroBitCount
            bits &= bits - 1
            let peer = peers[node].connections[slot]
            guard peer.chainCount > 0 else { continue }
            do {
                try peer.post()
                posted |= 1 << UInt64(node)
            } catch {
                if firstError == nil { firstError = error }
                peer.discardChain()
            }
        }
        bits = posted
        while bits != 0 {
            let peer = peers[bits.trailingZeroBitCount].connections[slot]
            bits &= bits - 1
            do {
                try peer.complete { index, word in batch[index].result = word }
            } catch {
                if firstError == nil { firstError = error }
            }
        }
        if let firstError { throw firstError }
    }
}
