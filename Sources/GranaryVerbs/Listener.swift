import CIBVerbs
import GranaryMemory
import GranaryTransport
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The passive side of a node's verbs transport: a thread serving the node's endpoint socket.
///
/// For each peer that connects it creates the responder end of a reliable connection (a QP this
/// node never posts to: RDMA READ, WRITE and atomics complete without the responder's CPU) and
/// answers region look-ups from ``LocalRegions``. A peer has one connection per thread slot of its
/// transport, so responder QPs are kept per (peer, connection); a connection that reconnects has
/// its previous responder QP destroyed.
///
/// `@unchecked Sendable`: `passive` is touched only by the listener thread while it runs and by
/// `stop()` after it has joined that thread; `thread` only by the owner (start, stop); everything
/// else is immutable, and the stop request is an atomic read with acquire ordering.
final class Listener: @unchecked Sendable {
    let path: String
    let device: VerbsDevice
    let regions: LocalRegions
    let node: NodeID
    let cluster: ClusterID
    private let socketFD: Int32
    private let wakeRead: Int32
    private let wakeWrite: Int32
    private let passiveCompletionQueue: UnsafeMutablePointer<ibv_cq>
    /// Keyed by the requester's node and connection index.
    private var passive: [PassiveKey: UnsafeMutablePointer<ibv_qp>] = [:]
    private struct PassiveKey: Hashable {
        let node: NodeID
        let connection: UInt16
    }
    private var thread: pthread_t? = nil
    private let stopping = Atomic<Bool>(false)
    private let timeoutMilliseconds: Int

    /// Binds the endpoint socket at `path`. A socket file left by a process that is gone is
    /// replaced; one with a live listener is an error (two transports claiming one node).
    init(path: String, device: VerbsDevice, regions: LocalRegions, node: NodeID, cluster: ClusterID,
         timeoutMilliseconds: Int) throws(VerbsError) {
        guard var address = EndpointProtocol.socketAddress(path) else {
            throw .endpoint(path: path, detail: "the path is longer than a Unix socket path may be (\(MemoryLayout<sockaddr_un>.size - 3) bytes); use a shorter region directory")
        }
        let length = socklen_t(MemoryLayout<sockaddr_un>.size)
        let probe = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        if probe >= 0 {
            let live = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(probe, $0, length) }
            } == 0
            close(probe)
            if live {
                throw .endpoint(path: path, detail: "another verbs transport is listening there (is node \(node) already running?)")
            }
        }
        unlink(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .endpoint(path: path, detail: "socket: \(errnoText(errno))") }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) }
        }
        guard bound == 0, listen(fd, 64) == 0 else {
            let code = errno
            close(fd)
            throw .endpoint(path: path, detail: "bind/listen: \(errnoText(code))")
        }
        var pipeFDs: (Int32, Int32) = (0, 0)
        let piped = withUnsafeMutableBytes(of: &pipeFDs) { pipe($0.baseAddress!.assumingMemoryBound(to: Int32.self)) }
        guard piped == 0 else {
            let code = errno
            close(fd)
            unlink(path)
            throw .endpoint(path: path, detail: "pipe: \(errnoText(code))")
        }
        _ = fcntl(pipeFDs.0, F_SETFD, FD_CLOEXEC)
        _ = fcntl(pipeFDs.1, F_SETFD, FD_CLOEXEC)
        // No completion ever arrives here (responders of one-sided operations produce none); the
        // QPs need a CQ all the same.
        guard let cq = ibv_create_cq(device.context, 16, nil, nil, 0) else {
            let code = errno
            close(fd); close(pipeFDs.0); close(pipeFDs.1)
            unlink(path)
            throw .call("ibv_create_cq", device: device.name, detail: errnoText(code))
        }
        self.path = path
        self.device = device
        self.regions = regions
        self.node = node
        self.cluster = cluster
        self.socketFD = fd
        self.wakeRead = pipeFDs.0
        self.wakeWrite = pipeFDs.1
        self.passiveCompletionQueue = cq
        self.timeoutMilliseconds = timeoutMilliseconds
    }

    deinit {
        // A listener that never started still owns the socket file it bound.
        if thread == nil, !stopping.load(ordering: .acquiring) { unlink(path) }
        stop()
        close(socketFD)
        close(wakeRead)
        close(wakeWrite)
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

    /// Stops serving: wakes and joins the thread, destroys the responder QPs (peers' operations on
    /// them then fail with a retry-exceeded completion) and removes the socket file.
    func stop() {
        guard let handle = thread else { return }
        thread = nil
        stopping.store(true, ordering: .releasing)
        var byte: UInt8 = 1
        _ = write(wakeWrite, &byte, 1)
        pthread_join(handle, nil)
        for qp in passive.values { ibv_destroy_qp(qp) }
        passive.removeAll()
        unlink(path)
    }

    private func serve() {
        var fds = [pollfd(fd: socketFD, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: wakeRead, events: Int16(POLLIN), revents: 0)]
        var request = [UInt8](repeating: 0, count: EndpointProtocol.requestBytes)
        var reply = [UInt8](repeating: 0, count: EndpointProtocol.replyBytes)
        while !stopping.load(ordering: .acquiring) {
            fds[0].revents = 0
            fds[1].revents = 0
            let ready = poll(&fds, 2, -1)
            if ready < 0 { if errno == EINTR { continue } else { break } }
            if fds[1].revents != 0 { break }
            guard fds[0].revents & Int16(POLLIN) != 0 else { continue }
            let client = accept(socketFD, nil, nil)
            guard client >= 0 else { continue }
            _ = fcntl(client, F_SETFD, FD_CLOEXEC)
            EndpointProtocol.setTimeouts(client, milliseconds: timeoutMilliseconds)
            let received = request.withUnsafeMutableBytes { EndpointProtocol.transfer(client, $0, sending: false) }
            if received, let decoded = request.withUnsafeBytes({ EndpointProtocol.Request.decode($0) }) {
                let answer = handle(decoded)
                _ = reply.withUnsafeMutableBytes { raw in
                    answer.encode(into: raw)
                    return EndpointProtocol.transfer(client, raw, sending: true)
                }
            }
            close(client)
        }
    }

    private func handle(_ request: EndpointProtocol.Request) -> EndpointProtocol.Reply {
        guard request.cluster == cluster else {
            return .init(status: .refused, message: "node \(node) belongs to \(cluster), not to \(request.cluster)")
        }
        guard request.to == node else {
            return .init(status: .refused, message: "this endpoint is node \(node)'s, not node \(request.to)'s")
        }
        switch request.kind {
        case .region:
            guard let record = regions.record(request.region) else {
                return .init(status: .unknownRegion,
                             message: "node \(node) has not registered region \(request.region) with its verbs transport")
            }
            var reply = EndpointProtocol.Reply(status: .ok)
            reply.regionAddress = UInt64(UInt(bitPattern: record.pointee.base))
            reply.regionSize = UInt64(record.pointee.size)
            reply.rkey = record.pointee.rkey
            return reply
        case .connect:
            do throws(VerbsCallFailure) {
                let (qp, _) = try QueuePairSetup.create(device, cq: passiveCompletionQueue, sendDepth: 1, inlineBytes: 0)
                let local = QueuePairSetup.address(of: qp, device)
                do throws(VerbsCallFailure) {
                    try QueuePairSetup.connect(qp, device, localPSN: local.packetSequenceNumber, remote: request.queuePair)
                } catch {
                    ibv_destroy_qp(qp)
                    throw error
                }
                if let previous = passive.updateValue(qp, forKey: PassiveKey(node: request.from, connection: request.connection)) { ibv_destroy_qp(previous) }
                var reply = EndpointProtocol.Reply(status: .ok)
                reply.queuePair = local
                return reply
            } catch {
                return .init(status: .refused, message: "\(error.call) failed on node \(node)'s device \(device.name): \(error.detail)")
            }
        }
    }
}
