import CIBVerbs
import CRDMACM
import GranaryMemory
import GranaryTransport
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What a remote region looks like to the requester: where it is mapped in the peer's process,
/// its rkey and its size. `size == 0` marks an entry not yet looked up.
struct RemoteRegion {
    var address: UInt64
    var size: Int
    var rkey: UInt32
}

/// Book-keeping for one posted work request of the current chain.
struct PendingRequest {
    var kind: OneSidedOperation.Kind
    /// The operation's index in the caller's batch (atomic results go there), or -1.
    var batchIndex: Int32
    var stagingOffset: Int32
    var length: Int32
    /// Reads: where the bytes go once the chain has completed.
    var destination: UnsafeMutableRawPointer?
    /// Checked reads: the staging offset of the earlier READ of the same bytes, whose lines this
    /// one's are compared with (see ``Connection/appendCheckedRead(remote:rkey:length:into:address:)``); -1 otherwise.
    var twinOffset: Int32 = -1
    /// For error messages.
    var address: GlobalAddress
}

/// The first line of the file at `path` (without its newline), or nil if it cannot be read.
func readFirstLine(_ path: String) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var bytes = [UInt8](repeating: 0, count: 256)
    let count = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
    guard count >= 0 else { return nil }
    let line = bytes[0..<count].prefix { $0 != UInt8(ascii: "\n") }.filter { $0 != UInt8(ascii: " ") && $0 != UInt8(ascii: "\r") }
    return String(decoding: line, as: UTF8.self)
}

/// Buffers of a connection to one peer, allocated on the first connection and reused by every
/// operation afterwards (nothing is allocated on the data path).
final class PeerBuffers {
    let staging: UnsafeMutableRawPointer
    let stagingBytes: Int
    let stagingRegion: UnsafeMutablePointer<ibv_mr>
    let chainCapacity: Int
    let workRequests: UnsafeMutablePointer<ibv_send_wr>
    let scatterGather: UnsafeMutablePointer<ibv_sge>
    let pending: UnsafeMutablePointer<PendingRequest>
    let completions: UnsafeMutablePointer<ibv_wc>
    static let completionBatch = 8
    /// Indexed by ``LocalRegions/slot(_:)``.
    let regions: UnsafeMutablePointer<RemoteRegion>

    /// A region table entry read by a look-up lands here: just past the staging buffer, in the
    /// same registration.
    var lookUpArea: UnsafeMutableRawPointer { staging + stagingBytes }

    init(device: VerbsDevice, node: NodeID, stagingBytes: Int, chainCapacity: Int) throws(TransportError) {
        var memory: UnsafeMutableRawPointer? = nil
        let registeredBytes = stagingBytes + LocalRegions.entryBytes
        let allocated = posix_memalign(&memory, 4096, registeredBytes)
        guard allocated == 0, let memory else {
            throw .backend(call: "posix_memalign", node: node, detail: "staging buffer of \(stagingBytes) bytes: \(errnoText(allocated))")
        }
        memset(memory, 0, registeredBytes)
        guard let region = CIBVerbs_ibv_reg_mr(device.protectionDomain, memory, registeredBytes, remoteAccess) else {
            let code = errno
            free(memory)
            throw LocalRegions.registrationError(code, bytes: stagingBytes, what: "the staging buffer for node \(node)",
                                                 device: device, node: node)
        }
        staging = memory
        self.stagingBytes = stagingBytes
        stagingRegion = region
        self.chainCapacity = chainCapacity
        workRequests = .allocate(capacity: chainCapacity)
        workRequests.initialize(repeating: ibv_send_wr(), count: chainCapacity)
        scatterGather = .allocate(capacity: chainCapacity)
        scatterGather.initialize(repeating: ibv_sge(), count: chainCapacity)
        pending = .allocate(capacity: chainCapacity)
        pending.initialize(repeating: PendingRequest(kind: .read, batchIndex: -1, stagingOffset: 0, length: 0, destination: nil,
                                                     address: GlobalAddress(rawValue: 0)), count: chainCapacity)
        completions = .allocate(capacity: Self.completionBatch)
        completions.initialize(repeating: ibv_wc(), count: Self.completionBatch)
        regions = .allocate(capacity: LocalRegions.slotCount)
        regions.initialize(repeating: RemoteRegion(address: 0, size: 0, rkey: 0), count: LocalRegions.slotCount)
    }

    deinit {
        ibv_dereg_mr(stagingRegion)
        free(staging)
        workRequests.deallocate()
        scatterGather.deallocate()
        pending.deallocate()
        completions.deallocate()
        regions.deallocate()
    }

    func forgetRegions() {
        regions.update(repeating: RemoteRegion(address: 0, size: 0, rkey: 0), count: LocalRegions.slotCount)
    }
}

/// The requester side towards one peer, as one node's transport sees it: the peer's endpoint and
/// its connections, one per thread slot (see ``ThreadSlots``) plus one shared by the threads that
/// got no slot.
///
/// `@unchecked Sendable`: `endpointValue` is read and written only while `mutex` is held; every other
/// stored property is immutable (each ``Connection`` guards its own state).
final class Peer: @unchecked Sendable {
    let node: NodeID
    /// Indexed by thread slot; the last one (index ``VerbsTransport/Options/connectionsPerPeer``)
    /// is the shared one. Created with the peer; each connects on its first use.
    let connections: [Connection]
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    // Guarded by `mutex`.
    private var endpointValue: PeerEndpoint?
    /// The incarnation of the peer's transport last seen (0: none yet). Guarded by `mutex`.
    private var incarnation: UInt64 = 0
    /// Bumped when the peer's process is found restarted: a connection made before is to the
    /// former process, and is dropped before its next use.
    private let generationCounter = Atomic<UInt64>(0)

    /// - Parameter source: this node's address (the port is ignored): connections leave from it,
    ///   so the RDMA CM routes them through this transport's device.
    init(node: NodeID, localNode: NodeID, cluster: ClusterID, device: VerbsDevice, source: sockaddr_in,
         incarnation: UInt64, configuration: VerbsTransport.Options) {
        self.node = node
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        connections = (0...configuration.connectionsPerPeer).map { index in
            Connection(node: node, localNode: localNode, cluster: cluster, device: device, source: source, incarnation: incarnation,
                       configuration: configuration, index: index, shared: index == configuration.connectionsPerPeer)
        }
        for connection in connections { connection.peer = self }
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// The connections' generation (see ``noteIncarnation(_:)``).
    @inline(__always) var generation: UInt64 { generationCounter.load(ordering: .acquiring) }

    /// The peer's transport has incarnation `value` (from a connect request it sent or an
    /// acceptance): a new one means a restarted process, and every connection to the former is
    /// dropped before its next use (without taking their locks: a thread may be waiting on one).
    func noteIncarnation(_ value: UInt64) {
        pthread_mutex_lock(mutex)
        if incarnation != 0, incarnation != value { generationCounter.add(1, ordering: .releasing) }
        incarnation = value
        pthread_mutex_unlock(mutex)
    }

    /// The peer's endpoint, or nil if the peer is unknown.
    var endpoint: PeerEndpoint? {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return endpointValue
    }

    /// Points the peer at another endpoint (nil: removes it); connections to the old one are
    /// dropped, and with `release` their buffers freed as well.
    func setEndpoint(_ endpoint: PeerEndpoint?, release: Bool = false) {
        pthread_mutex_lock(mutex)
        let changed = endpoint != endpointValue
        endpointValue = endpoint
        pthread_mutex_unlock(mutex)
        // After the change: a connection made from the old path before its lock is taken here is
        // dropped; one made afterwards uses the new path.
        if changed || release { disconnectAll(release: release) }
    }

    /// Drops every connection (each under its own lock); with `release`, frees their buffers too.
    func disconnectAll(release: Bool = false) {
        for connection in connections {
            connection.lock()
            if release { connection.close() } else { connection.disconnect() }
            connection.unlock()
        }
    }

    /// The sum of the connections' counters.
    var statistics: VerbsTransport.Statistics {
        var total = VerbsTransport.Statistics()
        for connection in connections {
            connection.lock()
            let counters = connection.statistics
            connection.unlock()
            total.connections += counters.connections
            total.chainsPosted += counters.chainsPosted
            total.workRequests += counters.workRequests
            total.completionWaits += counters.completionWaits
            total.sharedChainsPosted += counters.sharedChainsPosted
            total.checkedReads += counters.checkedReads
            total.flaggedLines += counters.flaggedLines
            if counters.connections > 0 { total.queuePairs += 1 }
        }
        return total
    }
}

/// One requester connection towards a peer: one RC queue pair with its own completion queue, a
/// registered staging buffer and the work-request arrays of the chain being built. A thread with a
/// slot is the only one that posts on its slot's connections; the shared connection (for threads
/// beyond the limit) is taken in turns.
///
/// All of a connection's mutable state is guarded by its lock; callers take ``lock()`` around
/// resolve + append + post + wait. The lock of a thread's own connection is uncontended on the data
/// path; others take it only to drop the connection (``Peer/setEndpoint(_:release:)``,
/// ``VerbsTransport/disconnect(from:)``, teardown) or to read its counters.
///
/// `@unchecked Sendable`: every `var` is read and written only while `mutex` is held, except
/// `peer`, set once right after init (before the connection is shared) and never changed.
final class Connection: @unchecked Sendable {
    let node: NodeID
    let localNode: NodeID
    let cluster: ClusterID
    let device: VerbsDevice
    let configuration: VerbsTransport.Options
    /// The thread slot it belongs to (``VerbsTransport/Options/connectionsPerPeer``: the shared one);
    /// sent with the connect request so the peer keeps one responder QP per connection.
    let index: Int
    let isShared: Bool
    /// This node's address; connections leave from it (see ``Peer``).
    let source: sockaddr_in
    /// The peer that owns this connection (it outlives its connections' use).
    unowned(unsafe) var peer: Peer! = nil
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>

    // Guarded by `mutex`.
    private var queuePair: UnsafeMutablePointer<ibv_qp>?
    private var completionQueue: UnsafeMutablePointer<ibv_cq>?
    /// The RDMA CM identifier of the connection and its own event channel (kept while connected;
    /// destroying the identifier disconnects, which tells the peer to drop its responder).
    private var connectionID: UnsafeMutablePointer<rdma_cm_id>?
    private var eventChannel: UnsafeMutablePointer<rdma_event_channel>?
    /// Where the peer's region table is (from its acceptance).
    private var remoteTable = EndpointProtocol.Acceptance(tableAddress: 0, tableRKey: 0, tableEntries: 0, incarnation: 0)
    /// The peer's ``Peer/generation`` when this connection was made.
    private var connectedGeneration: UInt64 = 0
    /// This node's transport's incarnation, sent with every connect request.
    let incarnation: UInt64
    private var inlineBytes = 0
    private var buffers: PeerBuffers?
    private(set) var chainCount = 0
    /// Lines the last completed chain's checked reads flagged as changing between their two copies.
    private(set) var lastChainFlaggedLines = 0
    private var stagingUsed = 0
    private var chainSequence: UInt64 = 0
    var statistics = VerbsTransport.Statistics()

    init(node: NodeID, localNode: NodeID, cluster: ClusterID, device: VerbsDevice, source: sockaddr_in,
         incarnation: UInt64, configuration: VerbsTransport.Options, index: Int, shared: Bool) {
        self.source = source
        self.incarnation = incarnation
        self.node = node
        self.localNode = localNode
        self.cluster = cluster
        self.device = device
        self.configuration = configuration
        self.index = index
        self.isShared = shared
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        disconnect()
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    @inline(__always) func lock() { pthread_mutex_lock(mutex) }
    @inline(__always) func unlock() { pthread_mutex_unlock(mutex) }

    var isConnected: Bool { queuePair != nil }

    // MARK: Connection

    /// With the lock held: destroys the QP and CQ and forgets what was learnt about the peer's
    /// regions (a peer that comes back is a new process with new rkeys). Keeps the buffers.
    func disconnect() {
        if let connectionID { rdma_disconnect(connectionID) }
        if let queuePair { ibv_destroy_qp(queuePair) }
        if let completionQueue { ibv_destroy_cq(completionQueue) }
        if let connectionID { rdma_destroy_id(connectionID) }
        if let eventChannel { rdma_destroy_event_channel(eventChannel) }
        queuePair = nil
        completionQueue = nil
        connectionID = nil
        eventChannel = nil
        chainCount = 0
        stagingUsed = 0
        buffers?.forgetRegions()
    }

    /// With the lock held: disconnects and frees the buffers (the peer was removed).
    func close() {
        disconnect()
        buffers = nil
    }

    /// With the lock held: connects unless connected. A connection made to a former process of
    /// the peer (``Peer/generation`` moved on) is dropped and made again, unless a chain is being
    /// built on it (then it goes at the chain's end, or fails with it).
    @inline(__always)
    func ensureConnected() throws(TransportError) {
        if queuePair == nil {
            try connect()
        } else if chainCount == 0, peer.generation != connectedGeneration {
            disconnect()
            try connect()
        }
    }

    /// Connects through the RDMA CM (see ``EndpointProtocol``): resolves the peer's address and
    /// route from this node's address, creates the QP, sends the connect request and, once the
    /// peer accepts, moves the QP to RTS and completes the connection (`rdma_establish`).
    private func connect() throws(TransportError) {
        guard let endpoint = peer.endpoint else { throw .unknownNode(node) }
        let (target, where_) = try Self.target(of: endpoint, node: node)
        let generation = peer.generation
        if buffers == nil {
            buffers = try PeerBuffers(device: device, node: node, stagingBytes: configuration.stagingBytes,
                                      chainCapacity: configuration.chainCapacity)
        }
        guard let channel = rdma_create_event_channel() else {
            throw .backend(call: "rdma_create_event_channel", node: node, detail: "\(errnoText(errno)) (is rdma_ucm loaded?)")
        }
        makeNonBlocking(channel)
        var created: UnsafeMutablePointer<rdma_cm_id>? = nil
        guard rdma_create_id(channel, &created, nil, RDMA_PS_TCP) == 0, let id = created else {
            let code = errno
            rdma_destroy_event_channel(channel)
            throw .backend(call: "rdma_create_id", node: node, detail: errnoText(code))
        }
        var qp: UnsafeMutablePointer<ibv_qp>? = nil
        var cq: UnsafeMutablePointer<ibv_cq>? = nil
        var inline = 0
        let acceptance: EndpointProtocol.Acceptance
        do throws(TransportError) {
            let timeout = configuration.endpointTimeoutMilliseconds
            var from = source
            from.sin_port = 0
            var to = target
            let resolving = withUnsafeMutablePointer(to: &from) { fromPointer in
                withUnsafeMutablePointer(to: &to) { toPointer in
                    fromPointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { fromAddress in
                        toPointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { toAddress in
                            rdma_resolve_addr(id, fromAddress, toAddress, Int32(timeout))
                        }
                    }
                }
            }
            guard resolving == 0 else {
                throw .peerUnreachable(node: node, detail: "rdma_resolve_addr to \(where_) failed: \(errnoText(errno))")
            }
            _ = try awaitEvent(channel, RDMA_CM_EVENT_ADDR_RESOLVED, step: "resolving the address", target: where_)
            if let verbs = id.pointee.verbs {
                let name = String(cString: ibv_get_device_name(verbs.pointee.device))
                guard name == device.name, id.pointee.port_num == device.portNumber else {
                    throw .backend(call: "rdma_resolve_addr", node: node,
                                   detail: "\(where_) is reached through RDMA device \(name) port \(id.pointee.port_num); this transport uses \(device.name) port \(device.portNumber)")
                }
            }
            guard rdma_resolve_route(id, Int32(timeout)) == 0 else {
                throw .peerUnreachable(node: node, detail: "rdma_resolve_route to \(where_) failed: \(errnoText(errno))")
            }
            _ = try awaitEvent(channel, RDMA_CM_EVENT_ROUTE_RESOLVED, step: "resolving the route", target: where_)
            guard let queue = ibv_create_cq(device.context, Int32(configuration.chainCapacity * 2), nil, nil, 0) else {
                throw .backend(call: "ibv_create_cq", node: node, detail: "on \(device.name): \(errnoText(errno))")
            }
            cq = queue
            do throws(VerbsCallFailure) {
                let created = try QueuePairSetup.create(device, cq: queue, sendDepth: configuration.chainCapacity,
                                                        inlineBytes: configuration.inlineBytes)
                qp = created.0
                inline = created.inline
                try QueuePairSetup.initialize(created.0, device)
            } catch {
                throw .backend(call: error.call, node: node, detail: "on \(device.name): \(error.detail)")
            }
            var request = [UInt8](repeating: 0, count: EndpointProtocol.requestBytes)
            let connecting = request.withUnsafeMutableBytes { raw -> Int32 in
                EndpointProtocol.Request(cluster: cluster, from: localNode, to: node, connection: UInt16(index),
                                         incarnation: incarnation).encode(into: raw)
                var parameters = rdma_conn_param()
                parameters.private_data = UnsafeRawPointer(raw.baseAddress)
                parameters.private_data_len = UInt8(EndpointProtocol.requestBytes)
                parameters.responder_resources = UInt8(clamping: min(16, max(1, device.maxResponderReadAtomic)))
                parameters.initiator_depth = UInt8(clamping: min(16, max(1, device.maxInitiatorReadAtomic)))
                parameters.retry_count = QueuePairSetup.retryCount
                parameters.rnr_retry_count = 7
                parameters.qp_num = qp!.pointee.qp_num
                return rdma_connect(id, &parameters)
            }
            guard connecting == 0 else {
                throw .peerUnreachable(node: node, detail: "rdma_connect to \(where_) failed: \(errnoText(errno))")
            }
            let data = try awaitEvent(channel, RDMA_CM_EVENT_CONNECT_RESPONSE, step: "connecting", target: where_)
            guard let accepted = data.withUnsafeBytes({ EndpointProtocol.Acceptance.decode($0) }) else {
                throw .backend(call: "verbs connect", node: node,
                               detail: "\(where_) accepted with private data that is not a Granary verbs acceptance (version \(EndpointProtocol.version))")
            }
            acceptance = accepted
            do throws(VerbsCallFailure) {
                try QueuePairSetup.connect(qp!, id: id)
            } catch {
                throw .backend(call: error.call, node: node, detail: "on \(device.name): \(error.detail)")
            }
            guard rdma_establish(id) == 0 else {
                throw .peerUnreachable(node: node, detail: "rdma_establish towards \(where_) failed: \(errnoText(errno))")
            }
        } catch {
            if let qp { ibv_destroy_qp(qp) }
            if let cq { ibv_destroy_cq(cq) }
            rdma_destroy_id(id)
            rdma_destroy_event_channel(channel)
            throw error
        }
        queuePair = qp
        completionQueue = cq
        connectionID = id
        eventChannel = channel
        remoteTable = acceptance
        // A new process of the peer: the other connections to its former one go. This one was
        // made after the generation was read, so it is of the new process whatever the count.
        peer.noteIncarnation(acceptance.incarnation)
        connectedGeneration = max(generation, peer.generation)
        inlineBytes = inline
        chainCount = 0
        stagingUsed = 0
        statistics.connections += 1
    }

    /// Waits for the RDMA CM's next event on `channel`, which must be `expected`; returns its
    /// private data. A reject carries the peer's reason (a Granary listener's) or means no one
    /// listens there (the RDMA CM's own).
    private func awaitEvent(_ channel: UnsafeMutablePointer<rdma_event_channel>, _ expected: rdma_cm_event_type,
                            step: String, target: String) throws(TransportError) -> [UInt8] {
        guard let event = EndpointProtocol.nextEvent(channel, milliseconds: configuration.endpointTimeoutMilliseconds) else {
            let code = errno
            throw .peerUnreachable(node: node, detail: code == ETIMEDOUT
                ? "\(step) (towards \(target)) had no answer within \(configuration.endpointTimeoutMilliseconds) ms"
                : "\(step) (towards \(target)): rdma_get_cm_event failed: \(errnoText(code))")
        }
        let kind = event.pointee.event
        let status = event.pointee.status
        let data = EndpointProtocol.privateData(event)
        rdma_ack_cm_event(event)
        guard kind == expected else {
            if kind == RDMA_CM_EVENT_REJECTED {
                if let reason = data.withUnsafeBytes({ EndpointProtocol.decodeRefusal($0) }) {
                    throw .backend(call: "verbs connect", node: node, detail: reason)
                }
                throw .peerUnreachable(node: node, detail: "no verbs transport is listening at \(target) "
                                       + "(the RDMA CM rejected the connection: RDMA_CM_EVENT_REJECTED, status \(status)): "
                                       + "the node's process is not running or has not opened its transport")
            }
            throw .peerUnreachable(node: node, detail: "\(step) (towards \(target)) ended with \(EndpointProtocol.name(kind)) "
                                   + "(status \(status)) instead of \(EndpointProtocol.name(expected))")
        }
        return data
    }

    /// The socket address of `endpoint` and how to name it in messages; an endpoint file is read
    /// now (the node writes it when its transport starts listening).
    static func target(of endpoint: PeerEndpoint, node: NodeID) throws(TransportError) -> (sockaddr_in, String) {
        let text: String
        let named: String
        switch endpoint {
        case .address(let address):
            text = address
            named = address
        case .file(let path):
            guard let line = readFirstLine(path), !line.isEmpty else {
                throw .peerUnreachable(node: node, detail: "no verbs transport is listening for it: its endpoint file \(path) is missing or empty "
                                       + "(the node's process is not running or has not opened its transport)")
            }
            text = line
            named = "\(line) (from \(path))"
        }
        switch EndpointProtocol.socketAddress(text) {
        case .success(let address): return (address, named)
        case .failure(let error):
            throw .backend(call: "verbs endpoint", node: node, detail: "the endpoint \(named) is not usable: \(error.reason)")
        }
    }

    // MARK: Addresses

    /// With the lock held: the peer's virtual address and rkey for `length` bytes at `address`,
    /// after checking the region and the bounds (connecting and looking the region up on first use).
    @inline(__always)
    func resolve(_ address: GlobalAddress, _ length: Int) throws(TransportError) -> (UInt64, UInt32) {
        try ensureConnected()
        guard let slot = LocalRegions.slot(address.region) else {
            throw .unknownRegion(node: node, region: address.region, reason: "region ids are below \(RegionID.limit)")
        }
        let entry = buffers.unsafelyUnwrapped.regions + slot
        if entry.pointee.size == 0 { entry.pointee = try lookUp(address.region, slot: slot) }
        let offset = Int(address.offset)
        guard length >= 0, offset <= entry.pointee.size &- length else {
            throw .outOfBounds(node: node, address: address, length: length, regionSize: entry.pointee.size)
        }
        return (entry.pointee.address &+ UInt64(offset), entry.pointee.rkey)
    }

    /// Reads the peer's region table entry for `region` (one RDMA READ on this connection).
    private func lookUp(_ region: RegionID, slot: Int) throws(TransportError) -> RemoteRegion {
        guard slot < Int(remoteTable.tableEntries) else {
            throw .unknownRegion(node: node, region: region, reason: "node \(node)'s region table has \(remoteTable.tableEntries) entries")
        }
        guard chainCount == 0 else {
            throw .backend(call: "verbs region look-up", node: node,
                           detail: "region \(region) was looked up while a chain was being built (a defect of the transport)")
        }
        let area = buffers.unsafelyUnwrapped.lookUpArea
        _ = appendRead(remote: remoteTable.tableAddress &+ UInt64(slot * LocalRegions.entryBytes), rkey: remoteTable.tableRKey,
                       length: LocalRegions.entryBytes, into: area, address: GlobalAddress(region: region, offset: 0))
        try post()
        try complete { _, _ in }
        guard let entry = LocalRegions.decodeEntry(area) else {
            throw .unknownRegion(node: node, region: region, reason: "node \(node) has not registered region \(region) with its verbs transport")
        }
        return RemoteRegion(address: entry.address, size: entry.size, rkey: entry.rkey)
    }

    // MARK: Building a chain

    @inline(__always)
    private static func align(_ value: Int, _ alignment: Int) -> Int { (value + alignment - 1) & ~(alignment - 1) }

    /// With the lock held: whether one more work request with `bytes` of staging fits the chain.
    @inline(__always)
    func hasRoom(bytes: Int, requests: Int = 1) -> Bool {
        guard let buffers else { return false }
        return chainCount + requests <= buffers.chainCapacity && Self.align(stagingUsed, 64) + bytes <= buffers.stagingBytes
    }

    /// The largest read or write piece one work request carries (the staging buffer).
    var pieceBytes: Int { configuration.stagingBytes }

    /// With the lock held and room checked: appends a work request; returns its staging offset.
    @inline(__always)
    private func append(_ kind: OneSidedOperation.Kind, opcode: ibv_wr_opcode, stagingBytes: Int, length: Int,
                        flags: UInt32, batchIndex: Int, destination: UnsafeMutableRawPointer?,
                        address: GlobalAddress) -> (UnsafeMutablePointer<ibv_send_wr>, Int) {
        let buffers = self.buffers.unsafelyUnwrapped
        let index = chainCount
        let offset = stagingBytes == 0 ? stagingUsed : Self.align(stagingUsed, 64)
        stagingUsed = offset + stagingBytes
        let sge = buffers.scatterGather + index
        sge.pointee.addr = UInt64(UInt(bitPattern: buffers.staging + offset))
        sge.pointee.length = UInt32(length)
        sge.pointee.lkey = buffers.stagingRegion.pointee.lkey
        let wr = buffers.workRequests + index
        // Only the fields an RDMA READ/WRITE/atomic uses are set; the others stay zero from the
        // arrays' initialisation (nothing else ever writes them).
        wr.pointee.next = nil
        wr.pointee.wr_id = chainSequence << 16 | UInt64(index)
        wr.pointee.sg_list = sge
        wr.pointee.num_sge = length == 0 ? 0 : 1
        wr.pointee.opcode = opcode
        wr.pointee.send_flags = flags
        if index > 0 { (wr - 1).pointee.next = wr }
        buffers.pending[index] = PendingRequest(kind: kind, batchIndex: Int32(batchIndex), stagingOffset: Int32(offset),
                                                length: Int32(length), destination: destination, address: address)
        chainCount = index + 1
        return (wr, offset)
    }

    /// Appends an RDMA READ of `length` bytes into the staging buffer (copied to `destination`
    /// when the chain completes).
    /// Returns its staging offset.
    @inline(__always) @discardableResult
    func appendRead(remote: UInt64, rkey: UInt32, length: Int, into destination: UnsafeMutableRawPointer?, address: GlobalAddress) -> Int {
        let (wr, offset) = append(.read, opcode: IBV_WR_RDMA_READ, stagingBytes: length, length: length, flags: 0,
                                  batchIndex: -1, destination: destination, address: address)
        wr.pointee.wr.rdma.remote_addr = remote
        wr.pointee.wr.rdma.rkey = rkey
        return offset
    }

    /// Appends a *checked* read of `length` bytes (whole 64-byte lines at a line-aligned address):
    /// two RDMA READs of the same bytes, one after the other on the queue pair. When the chain
    /// completes, the second copy goes to `destination`, and every line whose bytes differ between
    /// the two copies gets the lock bit (bit 63) of its first word set there, so
    /// ``ObjectLayout/check(snapshot:lines:)`` rejects it.
    ///
    /// Why this makes each accepted line whole: the responder executes a QP's READs in order, so the
    /// second copy starts after the first has ended. A line's first word is a version (object
    /// header or line version) that changes with every write to the line and never returns to an
    /// earlier value while the line's payload changes; a writer changes it before and after the
    /// line's payload. If both copies hold the same first word, it held that value from the first
    /// copy's load of it to the second's, so no payload store fell in between, and the first copy's
    /// payload loads, which a copy makes after the line's first word (rxe's kernel `memcpy` copies
    /// upwards), saw one state. A real NIC's DMA reads a line as a unit and needs none of this.
    @inline(__always)
    func appendCheckedRead(remote: UInt64, rkey: UInt32, length: Int, into destination: UnsafeMutableRawPointer?, address: GlobalAddress) {
        let firstOffset = appendRead(remote: remote, rkey: rkey, length: length, into: nil, address: address)
        appendRead(remote: remote, rkey: rkey, length: length, into: destination, address: address)
        buffers.unsafelyUnwrapped.pending[chainCount - 1].twinOffset = Int32(firstOffset)
        statistics.checkedReads += 1
    }

    /// Appends an RDMA WRITE of `length` bytes from `source`: inline (copied by the post, no staging)
    /// when the QP allows that size, else copied into the staging buffer now.
    @inline(__always)
    func appendWrite(remote: UInt64, rkey: UInt32, length: Int, from source: UnsafeRawPointer?, address: GlobalAddress) {
        let inline = length <= inlineBytes
        let (wr, offset) = append(.write, opcode: IBV_WR_RDMA_WRITE, stagingBytes: inline ? 0 : length, length: length,
                                  flags: inline ? IBV_SEND_INLINE.rawValue : 0, batchIndex: -1, destination: nil, address: address)
        if let source, length > 0 {
            if inline {
                wr.pointee.sg_list.pointee.addr = UInt64(UInt(bitPattern: source))
            } else {
                memcpy(buffers.unsafelyUnwrapped.staging + offset, source, length)
            }
        }
        wr.pointee.wr.rdma.remote_addr = remote
        wr.pointee.wr.rdma.rkey = rkey
    }

    /// Appends a compare-and-swap (`desired` != nil) or fetch-and-add; the word found lands in the
    /// staging buffer and is handed out by ``complete(_:)``.
    @inline(__always)
    func appendAtomic(remote: UInt64, rkey: UInt32, operand: UInt64, desired: UInt64?, batchIndex: Int, address: GlobalAddress) {
        let (wr, _) = append(desired == nil ? .fetchAndAdd : .compareAndSwap,
                             opcode: desired == nil ? IBV_WR_ATOMIC_FETCH_AND_ADD : IBV_WR_ATOMIC_CMP_AND_SWP,
                             stagingBytes: 8, length: 8, flags: 0, batchIndex: batchIndex, destination: nil, address: address)
        wr.pointee.wr.atomic.remote_addr = remote
        wr.pointee.wr.atomic.rkey = rkey
        wr.pointee.wr.atomic.compare_add = operand
        wr.pointee.wr.atomic.swap = desired ?? 0
    }

    // MARK: Posting and completing

    /// With the lock held: posts the chain as one linked list of work requests in one
    /// `ibv_post_send`, only the last one signalled (RC completes a QP's requests in order, so its
    /// completion means all of them are done).
    func post() throws(TransportError) {
        let buffers = self.buffers.unsafelyUnwrapped
        let last = buffers.workRequests + (chainCount - 1)
        last.pointee.next = nil
        last.pointee.send_flags |= IBV_SEND_SIGNALED.rawValue
        var bad: UnsafeMutablePointer<ibv_send_wr>? = nil
        let result = ibv_post_send(queuePair.unsafelyUnwrapped, buffers.workRequests, &bad)
        guard result == 0 else {
            let postedNone = bad == buffers.workRequests
            // Part of a chain may be in flight without a signalled request to wait for: start over.
            disconnect()
            throw .backend(call: "ibv_post_send", node: node,
                           detail: "posting \(chainCount) work requests on \(device.name) failed\(postedNone ? "" : " part-way"): \(errnoText(result))")
        }
        statistics.chainsPosted += 1
        statistics.workRequests += chainCount
        if isShared { statistics.sharedChainsPosted += 1 }
    }

    /// With the lock held, after ``post()``: waits for the chain's last completion (spinning, then
    /// yielding, up to the completion timeout), copies what READs brought into their destinations
    /// and hands each atomic's result to `deliver(batchIndex or -1, word)`. Empties the chain.
    ///
    /// - Throws: ``TransportError/peerUnreachable(node:detail:)`` for IBV_WC_RETRY_EXC_ERR or a
    ///   timeout, ``TransportError/backend(call:node:detail:)`` for any other completion error.
    ///   The connection is dropped on every error (the QP is in the error state); the next
    ///   operation reconnects.
    func complete(_ deliver: (Int, UInt64) -> Void) throws(TransportError) {
        let buffers = self.buffers.unsafelyUnwrapped
        let count = chainCount
        let target = buffers.workRequests[count - 1].wr_id
        let cq = completionQueue.unsafelyUnwrapped
        var failure: (status: ibv_wc_status, index: Int)? = nil
        var done = false
        var polls = 0
        var start: UInt64 = 0
        statistics.completionWaits += 1
        lastChainFlaggedLines = 0
        while !done {
            let found = ibv_poll_cq(cq, Int32(PeerBuffers.completionBatch), buffers.completions)
            if found < 0 {
                disconnect()
                throw .backend(call: "ibv_poll_cq", node: node, detail: "on \(device.name) returned \(found)")
            }
            for k in 0..<Int(found) {
                let completion = buffers.completions[k]
                if completion.status != IBV_WC_SUCCESS,
                   failure == nil || (failure!.status == IBV_WC_WR_FLUSH_ERR && completion.status != IBV_WC_WR_FLUSH_ERR) {
                    failure = (completion.status, Int(completion.wr_id & 0xFFFF))
                }
                if completion.wr_id == target { done = true }
            }
            if done { break }
            polls &+= 1
            if polls & 1023 == 0 {
                // The clock is read only every 1024 polls (tens of microseconds natively): in a TCG
                // guest whose clocksource is the HPET one read costs over a microsecond, which a
                // round trip should not pay. A hot spin for the first 200 us; then yield the CPU
                // between polls.
                let now = monotonicNanoseconds()
                if start == 0 { start = now }
                let waited = now - start
                if waited > configuration.completionTimeoutNanoseconds {
                    let pendingText = describe(buffers.pending[count - 1], count: count)
                    disconnect()
                    throw .peerUnreachable(node: node, detail: "no work completion within \(waited / 1_000_000) ms for \(pendingText) on \(device.name)")
                }
                if waited > 200_000 {
                    // A peer whose process exited (or closed its transport) destroyed its end of
                    // the RDMA CM connection, and its kernel said so (a DREQ): fail now, not after
                    // the QP's retransmissions (about 1.6 s). A host that died says nothing; its
                    // QP's retry limit still ends the wait.
                    if let event = peerClosedConnection() {
                        let pendingText = describe(buffers.pending[count - 1], count: count)
                        disconnect()
                        throw .peerUnreachable(node: node, detail: "the peer closed the RDMA CM connection (\(EndpointProtocol.name(event))) while \(pendingText) was outstanding: its process exited or closed its transport")
                    }
                    sched_yield()
                }
            }
        }
        if let failure {
            let error = completionError(failure.status, buffers.pending[failure.index], count: count)
            disconnect()
            throw error
        }
        for index in 0..<count {
            let request = buffers.pending[index]
            switch request.kind {
            case .read:
                if let destination = request.destination {
                    let copy = buffers.staging + Int(request.stagingOffset)
                    memcpy(destination, copy, Int(request.length))
                    if request.twinOffset >= 0 {
                        let flagged = Self.flagChangedLines(earlier: buffers.staging + Int(request.twinOffset), later: copy,
                                                            into: destination, length: Int(request.length))
                        lastChainFlaggedLines += flagged
                        statistics.flaggedLines += flagged
                    }
                }
            case .compareAndSwap, .fetchAndAdd:
                deliver(Int(request.batchIndex), buffers.staging.load(fromByteOffset: Int(request.stagingOffset), as: UInt64.self))
            case .write:
                break
            }
        }
        chainCount = 0
        stagingUsed = 0
        chainSequence &+= 1
    }

    /// With the lock held: the RDMA CM event that ended this connection from the peer's side
    /// (`RDMA_CM_EVENT_DISCONNECTED`: the peer's identifier was destroyed, as when its process
    /// exits; `RDMA_CM_EVENT_DEVICE_REMOVAL`), or nil if none is waiting. The connection's own
    /// event channel is non-blocking, and after the connection is made nothing else reads it.
    private func peerClosedConnection() -> rdma_cm_event_type? {
        guard let eventChannel else { return nil }
        while true {
            var event: UnsafeMutablePointer<rdma_cm_event>? = nil
            guard rdma_get_cm_event(eventChannel, &event) == 0, let event else { return nil }
            let kind = event.pointee.event
            rdma_ack_cm_event(event)
            if kind == RDMA_CM_EVENT_DISCONNECTED || kind == RDMA_CM_EVENT_DEVICE_REMOVAL { return kind }
        }
    }

    /// Sets the lock bit of the first word, in `destination`, of every line whose bytes differ
    /// between the two copies of a checked read. Returns how many lines it flagged.
    private static func flagChangedLines(earlier: UnsafeRawPointer, later: UnsafeRawPointer,
                                         into destination: UnsafeMutableRawPointer, length: Int) -> Int {
        var flagged = 0
        var offset = 0
        while offset < length {
            if memcmp(earlier + offset, later + offset, ObjectLayout.lineSize) != 0 {
                let first = (destination + offset).loadUnaligned(as: UInt64.self)
                (destination + offset).storeBytes(of: first | ObjectHeader.lockBit, as: UInt64.self)
                flagged += 1
            }
            offset += ObjectLayout.lineSize
        }
        return flagged
    }

    /// With the lock held: post, then complete.
    @inline(__always)
    func flush(_ deliver: (Int, UInt64) -> Void) throws(TransportError) {
        guard chainCount > 0 else { return }
        try post()
        try complete(deliver)
    }

    /// With the lock held: forgets a chain that was built but not posted.
    func discardChain() {
        chainCount = 0
        stagingUsed = 0
    }

    private func describe(_ request: PendingRequest, count: Int) -> String {
        let operation: String
        switch request.kind {
        case .read: operation = "RDMA READ of \(request.length) bytes"
        case .write: operation = "RDMA WRITE of \(request.length) bytes"
        case .compareAndSwap: operation = "ATOMIC_CMP_AND_SWP"
        case .fetchAndAdd: operation = "ATOMIC_FETCH_AND_ADD"
        }
        return "\(operation) at \(request.address)" + (count > 1 ? " (in a chain of \(count) work requests)" : "")
    }

    private func completionError(_ status: ibv_wc_status, _ request: PendingRequest, count: Int) -> TransportError {
        let text = String(cString: ibv_wc_status_str(status))
        let what = describe(request, count: count)
        if status == IBV_WC_RETRY_EXC_ERR {
            return .peerUnreachable(node: node, detail: "\(what) completed with status '\(text)' (IBV_WC_RETRY_EXC_ERR): "
                                        + "the peer's queue pair is gone (its process exited or closed its transport) or the network is down")
        }
        return .backend(call: "work completion", node: node,
                        detail: "\(what) on \(device.name) completed with status '\(text)' (ibv_wc_status \(status.rawValue))")
    }
}
