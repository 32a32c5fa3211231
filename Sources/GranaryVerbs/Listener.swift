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

/// The passive side of a node's verbs transport: an RDMA CM identifier listening on `ip:port`,
/// and a thread serving its events (see ``EndpointProtocol``).
///
/// For each connect request it checks who asks (the cluster, the node it is meant for), creates
/// the responder end of the reliable connection (a QP this node never posts to: RDMA READ, WRITE
/// and atomics complete without the responder's CPU), moves it to RTS and accepts, telling the
/// requester where the region table is. A request that is not for this node is rejected with the
/// reason as private data. A peer has one connection per thread slot of its transport, so
/// responder QPs are kept per (peer, connection); a connection that reconnects has its previous
/// responder QP destroyed, and one the peer disconnects (or that fails) is destroyed when the
/// RDMA CM says so.
///
/// `@unchecked Sendable`: `passive` is touched only by the listener thread while it runs and by
/// `stop()` after it has joined that thread; `thread` only by the owner (start, stop); everything
/// else is immutable, and the stop request is an atomic read with acquire ordering.
final class Listener: @unchecked Sendable {
    /// The address it listens on (`ip:port`, the port the RDMA CM chose where 0 was asked for).
    let address: String
    let device: VerbsDevice
    let regions: LocalRegions
    let node: NodeID
    let cluster: ClusterID
    private let channel: UnsafeMutablePointer<rdma_event_channel>
    private let listening: UnsafeMutablePointer<rdma_cm_id>
    private let wakeRead: Int32
    private let wakeWrite: Int32
    private let passiveCompletionQueue: UnsafeMutablePointer<ibv_cq>
    /// Keyed by the requester's node and connection index.
    private var passive: [PassiveKey: Responder] = [:]
    private struct PassiveKey: Hashable {
        let node: NodeID
        let connection: UInt16
    }
    private struct Responder {
        let id: UnsafeMutablePointer<rdma_cm_id>
        let queuePair: UnsafeMutablePointer<ibv_qp>
    }
    private var thread: pthread_t? = nil
    private let stopping = Atomic<Bool>(false)
    /// This transport's incarnation, sent with every acceptance.
    let incarnation: UInt64
    /// Told the incarnation of every node that connects (see ``EndpointProtocol``).
    private let noteIncarnation: @Sendable (NodeID, UInt64) -> Void

    /// Binds an RDMA CM identifier to `address` and listens. A port in use is an error naming it.
    init(address requested: sockaddr_in, device: VerbsDevice, regions: LocalRegions, node: NodeID,
         cluster: ClusterID, incarnation: UInt64, noteIncarnation: @escaping @Sendable (NodeID, UInt64) -> Void) throws(VerbsError) {
        let requestedText = EndpointProtocol.text(requested)
        guard let channel = rdma_create_event_channel() else {
            throw .call("rdma_create_event_channel", device: device.name, detail: "\(errnoText(errno)) (is rdma_ucm loaded?)")
        }
        makeNonBlocking(channel)
        var created: UnsafeMutablePointer<rdma_cm_id>? = nil
        guard rdma_create_id(channel, &created, nil, RDMA_PS_TCP) == 0, let listening = created else {
            let code = errno
            rdma_destroy_event_channel(channel)
            throw .call("rdma_create_id", device: device.name, detail: errnoText(code))
        }
        func fail(_ detail: String) -> VerbsError {
            rdma_destroy_id(listening)
            rdma_destroy_event_channel(channel)
            return .endpoint(path: requestedText, detail: detail)
        }
        var bindAddress = requested
        let bound = withUnsafeMutablePointer(to: &bindAddress) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { rdma_bind_addr(listening, $0) }
        }
        guard bound == 0 else {
            let code = errno
            throw fail(code == EADDRINUSE
                ? "rdma_bind_addr: the address is in use (another verbs transport, or another RDMA CM program, listens there)"
                : code == EADDRNOTAVAIL || code == ENODEV
                    ? "rdma_bind_addr: no RDMA device has that IP address (\(errnoText(code)))"
                    : "rdma_bind_addr: \(errnoText(code))")
        }
        if let verbs = listening.pointee.verbs {
            let name = String(cString: ibv_get_device_name(verbs.pointee.device))
            guard name == device.name else {
                throw fail("the address belongs to RDMA device \(name), and this transport uses \(device.name)")
            }
        }
        guard rdma_listen(listening, 64) == 0 else { throw fail("rdma_listen: \(errnoText(errno))") }
        var pipeFDs: (Int32, Int32) = (0, 0)
        let piped = withUnsafeMutableBytes(of: &pipeFDs) { pipe($0.baseAddress!.assumingMemoryBound(to: Int32.self)) }
        guard piped == 0 else { throw fail("pipe: \(errnoText(errno))") }
        _ = fcntl(pipeFDs.0, F_SETFD, FD_CLOEXEC)
        _ = fcntl(pipeFDs.1, F_SETFD, FD_CLOEXEC)
        // No completion ever arrives here (responders of one-sided operations produce none); the
        // QPs need a CQ all the same.
        guard let cq = ibv_create_cq(device.context, 16, nil, nil, 0) else {
            let code = errno
            close(pipeFDs.0); close(pipeFDs.1)
            rdma_destroy_id(listening)
            rdma_destroy_event_channel(channel)
            throw .call("ibv_create_cq", device: device.name, detail: errnoText(code))
        }
        var actual = requested
        actual.sin_port = rdma_get_src_port(listening)
        self.address = EndpointProtocol.text(actual)
        self.device = device
        self.regions = regions
        self.node = node
        self.cluster = cluster
        self.channel = channel
        self.listening = listening
        self.wakeRead = pipeFDs.0
        self.wakeWrite = pipeFDs.1
        self.passiveCompletionQueue = cq
        self.incarnation = incarnation
        self.noteIncarnation = noteIncarnation
    }

    deinit {
        stop()
        close(wakeRead)
        close(wakeWrite)
        rdma_destroy_id(listening)
        rdma_destroy_event_channel(channel)
        ibv_destroy_cq(passiveCompletionQueue)
    }

    /// Starts the serving thread (which holds a reference to the listener until it exits).
    func start() throws(VerbsError) {
        let box = Unmanaged.passRetained(self).toOpaque()
        var handle = pthread_t()
        let result = pthread_create(&handle, nil, { raw in
            let listener = Unmanaged<Listener>.fromOpaque(raw!).takeRetainedValue()
            listener.serve()
            return nil
        }, box)
        guard result == 0 else {
            Unmanaged<Listener>.fromOpaque(box).release()
            throw .call("pthread_create", device: device.name, detail: errnoText(result))
        }
        thread = handle
    }

    /// Stops serving: wakes and joins the thread and destroys the responder QPs (peers' operations
    /// on them then fail with a retry-exceeded completion) and their identifiers.
    func stop() {
        guard let handle = thread else { return }
        thread = nil
        stopping.store(true, ordering: .releasing)
        var byte: UInt8 = 1
        _ = write(wakeWrite, &byte, 1)
        pthread_join(handle, nil)
        for responder in passive.values { destroy(responder) }
        passive.removeAll()
    }

    private func destroy(_ responder: Responder) {
        ibv_destroy_qp(responder.queuePair)
        rdma_destroy_id(responder.id)
    }

    private func serve() {
        var fds = [pollfd(fd: channel.pointee.fd, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: wakeRead, events: Int16(POLLIN), revents: 0)]
        while !stopping.load(ordering: .acquiring) {
            fds[0].revents = 0
            fds[1].revents = 0
            let ready = poll(&fds, 2, -1)
            if ready < 0 { if errno == EINTR { continue } else { break } }
            if fds[1].revents != 0 { break }
            guard fds[0].revents & Int16(POLLIN) != 0 else { continue }
            var received: UnsafeMutablePointer<rdma_cm_event>? = nil
            guard rdma_get_cm_event(channel, &received) == 0, let event = received else { continue }
            let kind = event.pointee.event
            let id = event.pointee.id!
            switch kind {
            case RDMA_CM_EVENT_CONNECT_REQUEST:
                let data = EndpointProtocol.privateData(event)
                let request = data.withUnsafeBytes { EndpointProtocol.Request.decode($0) }
                // The request's identifier is new: answer on it, then acknowledge.
                let kept = answer(request, on: id)
                rdma_ack_cm_event(event)
                if !kept { rdma_destroy_id(id) }
            case RDMA_CM_EVENT_DISCONNECTED, RDMA_CM_EVENT_CONNECT_ERROR, RDMA_CM_EVENT_UNREACHABLE,
                 RDMA_CM_EVENT_REJECTED, RDMA_CM_EVENT_TIMEWAIT_EXIT:
                rdma_ack_cm_event(event)
                if let key = passive.first(where: { $0.value.id == id })?.key, let responder = passive.removeValue(forKey: key) {
                    destroy(responder)
                }
            default:
                rdma_ack_cm_event(event)
            }
        }
    }

    /// Accepts `request` on `id` (true: the identifier is kept, with its responder QP) or rejects
    /// it with the reason (false: the caller destroys the identifier).
    private func answer(_ request: EndpointProtocol.Request?, on id: UnsafeMutablePointer<rdma_cm_id>) -> Bool {
        func reject(_ message: String) -> Bool {
            var data = [UInt8](repeating: 0, count: EndpointProtocol.refusalBytes)
            data.withUnsafeMutableBytes { raw in
                EndpointProtocol.encodeRefusal(message, into: raw)
                _ = rdma_reject(id, raw.baseAddress, UInt8(EndpointProtocol.refusalBytes))
            }
            return false
        }
        guard let request else {
            return reject("node \(node)'s verbs transport was sent a connect request that is not Granary's (version \(EndpointProtocol.version))")
        }
        guard request.cluster == cluster else {
            return reject("node \(node) belongs to \(cluster), not to \(request.cluster)")
        }
        guard request.to == node else {
            return reject("this endpoint is node \(node)'s, not node \(request.to)'s")
        }
        if let verbs = id.pointee.verbs {
            let name = String(cString: ibv_get_device_name(verbs.pointee.device))
            guard name == device.name else {
                return reject("node \(node)'s request arrived on device \(name); its transport uses \(device.name)")
            }
        }
        // A node whose process restarted: this node's connections to its former process go.
        noteIncarnation(request.from, request.incarnation)
        let qp: UnsafeMutablePointer<ibv_qp>
        do throws(VerbsCallFailure) {
            (qp, _) = try QueuePairSetup.create(device, cq: passiveCompletionQueue, sendDepth: 1, inlineBytes: 0)
        } catch {
            return reject("\(error.call) failed on node \(node)'s device \(device.name): \(error.detail)")
        }
        do throws(VerbsCallFailure) {
            try QueuePairSetup.initialize(qp, device)
            try QueuePairSetup.connect(qp, id: id)
        } catch {
            ibv_destroy_qp(qp)
            return reject("\(error.call) failed on node \(node)'s device \(device.name): \(error.detail)")
        }
        var data = [UInt8](repeating: 0, count: EndpointProtocol.acceptanceBytes)
        let accepted = data.withUnsafeMutableBytes { raw -> Int32 in
            regions.acceptance(incarnation: incarnation).encode(into: raw)
            var parameters = rdma_conn_param()
            parameters.private_data = UnsafeRawPointer(raw.baseAddress)
            parameters.private_data_len = UInt8(EndpointProtocol.acceptanceBytes)
            parameters.responder_resources = UInt8(clamping: min(16, max(1, device.maxResponderReadAtomic)))
            parameters.initiator_depth = UInt8(clamping: min(16, max(1, device.maxInitiatorReadAtomic)))
            parameters.rnr_retry_count = 7
            parameters.qp_num = qp.pointee.qp_num
            return rdma_accept(id, &parameters)
        }
        guard accepted == 0 else {
            ibv_destroy_qp(qp)
            return false
        }
        let key = PassiveKey(node: request.from, connection: request.connection)
        if let previous = passive.updateValue(Responder(id: id, queuePair: qp), forKey: key) { destroy(previous) }
        return true
    }
}
