import CIBVerbs
import CRDMACM
import GranaryMemory
import GranaryTransport
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Where a peer's verbs transport listens for RDMA CM connection requests.
enum PeerEndpoint: Equatable, CustomStringConvertible {
    /// The endpoint file in a node's region directory, where its transport writes the `ip:port`
    /// it listens on (nodes of one host: the address is learnt at each connection, so a node
    /// restarted on another port is found).
    case file(String)
    /// An `ip:port` (or `host:port`) named directly (nodes on other hosts: `verbs://ip:port`).
    case address(String)

    var description: String {
        switch self {
        case .file(let path): return "the endpoint file \(path)"
        case .address(let address): return address
        }
    }
}

/// The connection set-up between verbs transports, over the RDMA connection manager (librdmacm,
/// `rdma_cm`): a node's ``Listener`` listens on `ip:port`; a requester resolves that address and
/// route through the RDMA CM, creates its queue pair and sends a connect request whose private
/// data says who it is; the listener creates the responder queue pair and accepts with private
/// data that says where the node's region table is (``LocalRegions``), which the requester then
/// reads one-sidedly to look regions up. Nothing but the RDMA CM crosses the network, so nodes on
/// different hosts connect as nodes of one host do.
///
/// Both ends create and move their queue pairs themselves (the RDMA CM's "manual" mode: the
/// attributes of RTR and RTS come from `rdma_init_qp_attr`, the retransmission timeout and retry
/// count from ``QueuePairSetup``), so one protection domain serves every connection of a node.
///
/// Private data (little-endian). Connect request (32 bytes; the RDMA CM carries at most 56):
/// ```
///  0  u32  magic "GRVB"    4  u16  version    6  u16  kind (1: connect)
///  8  u64  cluster id     16  u16  from node 18  u16  to node   20  u16  connection (the requester's thread slot)
/// 24  u64  incarnation (the requester's transport's: random, chosen when it opened)
/// ```
/// Acceptance (32 bytes; at most 196):
/// ```
///  0  u32  magic    4  u16  version    6  u16  status (0)
///  8  u64  region table address       16  u32  its rkey    20  u32  its entries
/// 24  u64  incarnation (the accepting transport's)
/// ```
/// An incarnation that differs from the one last seen of a node means the node's process was
/// restarted: every connection made to its former process is then dropped before its next use
/// (its QP is gone; waiting for a retry-exceeded completion on it would take seconds), so that
/// a sender that checks a channel to the node reads the new process's mailbox at once.
/// Refusal, in a reject (at most 148 bytes):
/// ```
///  0  u32  magic    4  u16  version    6  u16  status (2: refused)   8  u16  length   10  message (UTF-8)
/// ```
/// A reject without this magic comes from the RDMA CM itself (no one listens on the port).
enum EndpointProtocol {
    /// The endpoint file's name in a node's region directory.
    static let fileName = "verbs.endpoint"
    static let magic: UInt32 = 0x4256_5247  // "GRVB" little-endian
    static let version: UInt16 = 3  // 3: over the RDMA CM
    static let requestBytes = 32
    static let acceptanceBytes = 32
    static let refusalBytes = 140
    static let refused: UInt16 = 2

    struct Request: Equatable {
        var cluster: ClusterID
        var from: NodeID
        var to: NodeID
        /// Which of the requester's connections to the peer this is (its thread slot).
        var connection: UInt16
        /// The requester's transport's incarnation.
        var incarnation: UInt64

        func encode(into raw: UnsafeMutableRawBufferPointer) {
            memset(raw.baseAddress!, 0, requestBytes)
            raw.storeBytes(of: incarnation.littleEndian, toByteOffset: 24, as: UInt64.self)
            raw.storeBytes(of: magic.littleEndian, toByteOffset: 0, as: UInt32.self)
            raw.storeBytes(of: version.littleEndian, toByteOffset: 4, as: UInt16.self)
            raw.storeBytes(of: UInt16(1).littleEndian, toByteOffset: 6, as: UInt16.self)
            raw.storeBytes(of: cluster.rawValue.littleEndian, toByteOffset: 8, as: UInt64.self)
            raw.storeBytes(of: from.rawValue.littleEndian, toByteOffset: 16, as: UInt16.self)
            raw.storeBytes(of: to.rawValue.littleEndian, toByteOffset: 18, as: UInt16.self)
            raw.storeBytes(of: connection.littleEndian, toByteOffset: 20, as: UInt16.self)
        }

        /// The request in `raw`, or nil for private data that is not one (another program's).
        static func decode(_ raw: UnsafeRawBufferPointer) -> Request? {
            guard raw.count >= requestBytes,
                  UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt32.self)) == magic,
                  UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 4, as: UInt16.self)) == version,
                  UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 6, as: UInt16.self)) == 1
            else { return nil }
            return Request(
                cluster: ClusterID(rawValue: UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self))),
                from: NodeID(rawValue: UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 16, as: UInt16.self))),
                to: NodeID(rawValue: UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 18, as: UInt16.self))),
                connection: UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 20, as: UInt16.self)),
                incarnation: UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 24, as: UInt64.self)))
        }
    }

    /// What an accepting node tells the requester: where its region table is.
    struct Acceptance: Equatable {
        var tableAddress: UInt64
        var tableRKey: UInt32
        var tableEntries: UInt32
        /// The accepting transport's incarnation.
        var incarnation: UInt64

        func encode(into raw: UnsafeMutableRawBufferPointer) {
            memset(raw.baseAddress!, 0, acceptanceBytes)
            raw.storeBytes(of: incarnation.littleEndian, toByteOffset: 24, as: UInt64.self)
            raw.storeBytes(of: magic.littleEndian, toByteOffset: 0, as: UInt32.self)
            raw.storeBytes(of: version.littleEndian, toByteOffset: 4, as: UInt16.self)
            raw.storeBytes(of: tableAddress.littleEndian, toByteOffset: 8, as: UInt64.self)
            raw.storeBytes(of: tableRKey.littleEndian, toByteOffset: 16, as: UInt32.self)
            raw.storeBytes(of: tableEntries.littleEndian, toByteOffset: 20, as: UInt32.self)
        }

        static func decode(_ raw: UnsafeRawBufferPointer) -> Acceptance? {
            guard raw.count >= acceptanceBytes,
                  UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt32.self)) == magic,
                  UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 4, as: UInt16.self)) == version,
                  UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 6, as: UInt16.self)) == 0
            else { return nil }
            return Acceptance(tableAddress: UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self)),
                              tableRKey: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 16, as: UInt32.self)),
                              tableEntries: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 20, as: UInt32.self)),
                              incarnation: UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 24, as: UInt64.self)))
        }
    }

    /// A refusal's private data: the reason in words, cut to what a reject carries.
    static func encodeRefusal(_ message: String, into raw: UnsafeMutableRawBufferPointer) {
        memset(raw.baseAddress!, 0, refusalBytes)
        raw.storeBytes(of: magic.littleEndian, toByteOffset: 0, as: UInt32.self)
        raw.storeBytes(of: version.littleEndian, toByteOffset: 4, as: UInt16.self)
        raw.storeBytes(of: refused.littleEndian, toByteOffset: 6, as: UInt16.self)
        let text = Array(message.utf8.prefix(refusalBytes - 10))
        raw.storeBytes(of: UInt16(text.count).littleEndian, toByteOffset: 8, as: UInt16.self)
        for (index, byte) in text.enumerated() { raw[10 + index] = byte }
    }

    /// The reason in a refusal, or nil if the reject did not come from a Granary listener.
    static func decodeRefusal(_ raw: UnsafeRawBufferPointer) -> String? {
        guard raw.count >= 10,
              UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt32.self)) == magic,
              UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 6, as: UInt16.self)) == refused
        else { return nil }
        let length = min(Int(UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt16.self))), raw.count - 10)
        return String(decoding: raw[10..<(10 + length)], as: UTF8.self)
    }

    // MARK: Addresses

    /// `text` (`ip:port` or `host:port`, IPv4) as a socket address, or why it is not one.
    static func socketAddress(_ text: String) -> Result<sockaddr_in, AddressError> {
        guard let colon = text.lastIndex(of: ":"), colon != text.startIndex,
              let port = Int(text[text.index(after: colon)...]), (0...65535).contains(port) else {
            return .failure(AddressError(text: text, reason: "it is not ip:port with a port from 0 to 65535"))
        }
        let host = String(text[..<colon])
        var hints = addrinfo()
        hints.ai_family = AF_INET
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var found: UnsafeMutablePointer<addrinfo>? = nil
        let status = getaddrinfo(host, nil, &hints, &found)
        guard status == 0, let found, let address = found.pointee.ai_addr else {
            if let found { freeaddrinfo(found) }
            return .failure(AddressError(text: text, reason: "\(host) has no IPv4 address (\(String(cString: gai_strerror(status))))"))
        }
        defer { freeaddrinfo(found) }
        var result = address.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee }
        result.sin_port = in_port_t(UInt16(port).bigEndian)
        return .success(result)
    }

    struct AddressError: Error {
        let text: String
        let reason: String
    }

    /// `a.b.c.d:port`.
    static func text(_ address: sockaddr_in) -> String {
        var copy = address.sin_addr
        var buffer = [CChar](repeating: 0, count: Int(INET_ADDRSTRLEN))
        inet_ntop(AF_INET, &copy, &buffer, socklen_t(buffer.count))
        let ip = buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        return "\(ip):\(UInt16(bigEndian: address.sin_port))"
    }

    // MARK: Events

    /// Waits up to `milliseconds` for the next event on `channel`. Returns the event (the caller
    /// acknowledges it with `rdma_ack_cm_event`), or nil after the time with `errno` ETIMEDOUT, or
    /// nil with the failing call's errno.
    static func nextEvent(_ channel: UnsafeMutablePointer<rdma_event_channel>, milliseconds: Int) -> UnsafeMutablePointer<rdma_cm_event>? {
        let deadline = monotonicNanoseconds() + UInt64(max(0, milliseconds)) * 1_000_000
        while true {
            var descriptor = pollfd(fd: channel.pointee.fd, events: Int16(POLLIN), revents: 0)
            let now = monotonicNanoseconds()
            guard now < deadline else { errno = ETIMEDOUT; return nil }
            let ready = poll(&descriptor, 1, Int32(min(UInt64(Int32.max), (deadline - now) / 1_000_000 + 1)))
            if ready < 0 { if errno == EINTR { continue }; return nil }
            if ready == 0 { continue }
            var event: UnsafeMutablePointer<rdma_cm_event>? = nil
            if rdma_get_cm_event(channel, &event) == 0, let event { return event }
            if errno == EAGAIN || errno == EINTR { continue }
            return nil
        }
    }

    /// An event's name (`RDMA_CM_EVENT_REJECTED`, ...) for messages.
    static func name(_ event: rdma_cm_event_type) -> String {
        String(cString: rdma_event_str(event))
    }

    /// The event's private data (a copy: it lives only until the event is acknowledged).
    static func privateData(_ event: UnsafeMutablePointer<rdma_cm_event>) -> [UInt8] {
        let connection = event.pointee.param.conn
        guard let data = connection.private_data, connection.private_data_len > 0 else { return [] }
        return Array(UnsafeRawBufferPointer(start: data, count: Int(connection.private_data_len)))
    }
}

/// The channel fd set non-blocking, so that `rdma_get_cm_event` after `poll` never blocks on an
/// event another thread took.
func makeNonBlocking(_ channel: UnsafeMutablePointer<rdma_event_channel>) {
    let flags = fcntl(channel.pointee.fd, F_GETFL)
    _ = fcntl(channel.pointee.fd, F_SETFL, flags | O_NONBLOCK)
    _ = fcntl(channel.pointee.fd, F_SETFD, FD_CLOEXEC)
}
