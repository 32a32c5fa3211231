import CIBVerbs
import GranaryMemory
import GranaryTransport
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The out-of-band exchange between verbs transports: a Unix-domain stream socket, `verbs.sock`,
/// in each node's region directory (the same directory the shared-memory transport uses as a
/// node's endpoint). A peer connects to it, sends one fixed-size request and reads one fixed-size
/// reply; the socket carries no data-path traffic.
///
/// Request (64 bytes, little-endian):
/// ```
///  0  u32  magic "GRVB"          4  u16  version       6  u16  kind (1 connect, 2 region)
///  8  u64  cluster id           16  u16  from node    18  u16  to node     20  u32  region id
/// 24  u32  QP number            28  u32  PSN          32  16B  GID         48  u16  LID
/// 52  u32  path MTU (enum ibv_mtu)  56  u16  connection (the requester's thread slot)
/// ```
/// Reply (256 bytes):
/// ```
///  0  u32  magic                 4  u16  version       6  u16  status (0 ok, 1 unknown region, 2 refused)
///  8  u32  QP number            12  u32  PSN          16  16B  GID         32  u16  LID
/// 36  u32  path MTU             40  u64  region address                   48  u64  region size
/// 56  u32  rkey                 60  u32  message length                   64  192B message (UTF-8)
/// ```
/// `connect` asks the peer to create the responder end of a reliable connection for the sender's
/// QP (and returns its address), keeping one responder QP per (requester node, connection): a
/// requester has one connection per thread slot, each made by its own exchange; `region` asks for the address, rkey and size of a registered
/// region.
enum EndpointProtocol {
    static let fileName = "verbs.sock"
    static let magic: UInt32 = 0x4256_5247  // "GRVB" little-endian
    static let version: UInt16 = 2  // 2: the connection field
    static let requestBytes = 64
    static let replyBytes = 256

    enum Kind: UInt16 { case connect = 1, region = 2 }
    enum Status: UInt16 { case ok = 0, unknownRegion = 1, refused = 2 }

    struct Request {
        var kind: Kind
        var cluster: ClusterID
        var from: NodeID
        var to: NodeID
        var region = RegionID(rawValue: 0)
        var queuePair = QueuePairAddress(queuePairNumber: 0, packetSequenceNumber: 0, gid: (0, 0), lid: 0, mtu: 0)
        /// Which of the requester's connections to the peer this is (its thread slot).
        var connection: UInt16 = 0

        func encode(into raw: UnsafeMutableRawBufferPointer) {
            memset(raw.baseAddress!, 0, requestBytes)
            raw.storeBytes(of: magic.littleEndian, toByteOffset: 0, as: UInt32.self)
            raw.storeBytes(of: version.littleEndian, toByteOffset: 4, as: UInt16.self)
            raw.storeBytes(of: kind.rawValue.littleEndian, toByteOffset: 6, as: UInt16.self)
            raw.storeBytes(of: cluster.rawValue.littleEndian, toByteOffset: 8, as: UInt64.self)
            raw.storeBytes(of: from.rawValue.littleEndian, toByteOffset: 16, as: UInt16.self)
            raw.storeBytes(of: to.rawValue.littleEndian, toByteOffset: 18, as: UInt16.self)
            raw.storeBytes(of: region.rawValue.littleEndian, toByteOffset: 20, as: UInt32.self)
            encodeAddress(queuePair, into: raw, at: 24)
            raw.storeBytes(of: connection.littleEndian, toByteOffset: 56, as: UInt16.self)
        }

        static func decode(_ raw: UnsafeRawBufferPointer) -> Request? {
            guard UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt32.self)) == magic,
                  UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 4, as: UInt16.self)) == version,
                  let kind = Kind(rawValue: UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 6, as: UInt16.self)))
            else { return nil }
            var request = Request(
                kind: kind,
                cluster: ClusterID(rawValue: UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self))),
                from: NodeID(rawValue: UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 16, as: UInt16.self))),
                to: NodeID(rawValue: UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 18, as: UInt16.self))))
            request.region = RegionID(rawValue: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 20, as: UInt32.self)))
            request.queuePair = decodeAddress(raw, at: 24)
            request.connection = UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 56, as: UInt16.self))
            return request
        }
    }

    struct Reply {
        var status: Status
        var queuePair = QueuePairAddress(queuePairNumber: 0, packetSequenceNumber: 0, gid: (0, 0), lid: 0, mtu: 0)
        var regionAddress: UInt64 = 0
        var regionSize: UInt64 = 0
        var rkey: UInt32 = 0
        var message = ""

        func encode(into raw: UnsafeMutableRawBufferPointer) {
            memset(raw.baseAddress!, 0, replyBytes)
            raw.storeBytes(of: magic.littleEndian, toByteOffset: 0, as: UInt32.self)
            raw.storeBytes(of: version.littleEndian, toByteOffset: 4, as: UInt16.self)
            raw.storeBytes(of: status.rawValue.littleEndian, toByteOffset: 6, as: UInt16.self)
            encodeAddress(queuePair, into: raw, at: 8)
            raw.storeBytes(of: regionAddress.littleEndian, toByteOffset: 40, as: UInt64.self)
            raw.storeBytes(of: regionSize.littleEndian, toByteOffset: 48, as: UInt64.self)
            raw.storeBytes(of: rkey.littleEndian, toByteOffset: 56, as: UInt32.self)
            let text = Array(message.utf8.prefix(replyBytes - 64))
            raw.storeBytes(of: UInt32(text.count).littleEndian, toByteOffset: 60, as: UInt32.self)
            for (index, byte) in text.enumerated() { raw[64 + index] = byte }
        }

        static func decode(_ raw: UnsafeRawBufferPointer) -> Reply? {
            guard UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt32.self)) == magic,
                  UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 4, as: UInt16.self)) == version,
                  let status = Status(rawValue: UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 6, as: UInt16.self)))
            else { return nil }
            var reply = Reply(status: status)
            reply.queuePair = decodeAddress(raw, at: 8)
            reply.regionAddress = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 40, as: UInt64.self))
            reply.regionSize = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 48, as: UInt64.self))
            reply.rkey = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 56, as: UInt32.self))
            let length = min(Int(UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 60, as: UInt32.self))), replyBytes - 64)
            reply.message = String(decoding: raw[64..<(64 + length)], as: UTF8.self)
            return reply
        }
    }

    static func encodeAddress(_ address: QueuePairAddress, into raw: UnsafeMutableRawBufferPointer, at offset: Int) {
        raw.storeBytes(of: address.queuePairNumber.littleEndian, toByteOffset: offset, as: UInt32.self)
        raw.storeBytes(of: address.packetSequenceNumber.littleEndian, toByteOffset: offset + 4, as: UInt32.self)
        // The GID travels as raw bytes (network order already), not as numbers.
        raw.storeBytes(of: address.gid.0, toByteOffset: offset + 8, as: UInt64.self)
        raw.storeBytes(of: address.gid.1, toByteOffset: offset + 16, as: UInt64.self)
        raw.storeBytes(of: address.lid.littleEndian, toByteOffset: offset + 24, as: UInt16.self)
        raw.storeBytes(of: address.mtu.littleEndian, toByteOffset: offset + 28, as: UInt32.self)
    }

    static func decodeAddress(_ raw: UnsafeRawBufferPointer, at offset: Int) -> QueuePairAddress {
        QueuePairAddress(
            queuePairNumber: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: offset, as: UInt32.self)),
            packetSequenceNumber: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: offset + 4, as: UInt32.self)),
            gid: (raw.loadUnaligned(fromByteOffset: offset + 8, as: UInt64.self),
                  raw.loadUnaligned(fromByteOffset: offset + 16, as: UInt64.self)),
            lid: UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: offset + 24, as: UInt16.self)),
            mtu: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: offset + 28, as: UInt32.self)))
    }

    // MARK: Sockets

    /// A `sockaddr_un` for `path`, or nil if the path does not fit (108 bytes on Linux).
    static func socketAddress(_ path: String) -> sockaddr_un? {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard bytes.count < capacity else { return nil }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (index, byte) in bytes.enumerated() { raw[index] = byte }
        }
        return address
    }

    /// Sends `request` to the endpoint at `path` and returns the reply. Bounded by `timeoutMilliseconds`
    /// for every send and receive.
    ///
    /// Errors are ``TransportError/peerUnreachable(node:detail:)`` (no listener, no answer) or
    /// ``TransportError/backend(call:node:detail:)`` (a malformed reply).
    static func exchange(_ request: Request, path: String, timeoutMilliseconds: Int) throws(TransportError) -> Reply {
        let node = request.to
        guard var address = socketAddress(path) else {
            throw .backend(call: "verbs endpoint", node: node, detail: "the endpoint path \(path) is longer than a Unix socket path may be")
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .backend(call: "socket(AF_UNIX)", node: node, detail: errnoText(errno)) }
        defer { close(fd) }
        setTimeouts(fd, milliseconds: timeoutMilliseconds)
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else {
            let code = errno
            let why = code == ENOENT || code == ECONNREFUSED
                ? "no verbs transport is listening at \(path) (\(errnoText(code))): the node's process is not running or has not opened its transport"
                : "connecting to its verbs endpoint \(path) failed: \(errnoText(code))"
            throw .peerUnreachable(node: node, detail: why)
        }
        var outgoing = [UInt8](repeating: 0, count: Self.requestBytes)
        let sent = outgoing.withUnsafeMutableBytes { raw in
            request.encode(into: raw)
            return transfer(fd, raw, sending: true)
        }
        guard sent else {
            throw .peerUnreachable(node: node, detail: "sending to its verbs endpoint \(path) failed: \(errnoText(errno))")
        }
        var incoming = [UInt8](repeating: 0, count: Self.replyBytes)
        let received = incoming.withUnsafeMutableBytes { transfer(fd, $0, sending: false) }
        guard received else {
            let code = errno
            let why = code == EAGAIN || code == EWOULDBLOCK
                ? "its verbs endpoint \(path) did not answer within \(timeoutMilliseconds) ms"
                : "its verbs endpoint \(path) closed the exchange: \(code == 0 ? "end of stream" : errnoText(code))"
            throw .peerUnreachable(node: node, detail: why)
        }
        guard let reply = incoming.withUnsafeBytes({ Reply.decode($0) }) else {
            throw .backend(call: "verbs endpoint", node: node, detail: "\(path) answered with something that is not a Granary verbs reply")
        }
        return reply
    }

    /// Sends or receives exactly `buffer.count` bytes. False on error or end of stream (errno 0).
    static func transfer(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, sending: Bool) -> Bool {
        var done = 0
        while done < buffer.count {
            let count = sending
                ? send(fd, buffer.baseAddress! + done, buffer.count - done, Int32(MSG_NOSIGNAL))
                : recv(fd, buffer.baseAddress! + done, buffer.count - done, 0)
            if count > 0 { done += count; continue }
            if count < 0, errno == EINTR { continue }
            if count == 0 { errno = 0 }
            return false
        }
        return true
    }

    static func setTimeouts(_ fd: Int32, milliseconds: Int) {
        var value = timeval(tv_sec: milliseconds / 1000, tv_usec: (milliseconds % 1000) * 1000)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &value, socklen_t(MemoryLayout<timeval>.size))
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &value, socklen_t(MemoryLayout<timeval>.size))
    }
}
