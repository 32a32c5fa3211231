import CoreMetrics
import Foundation
import Prometheus
#if canImport(Glibc)
import Glibc
#endif

/// `granary node --metrics-port`: the process's swift-metrics go to a Prometheus registry, served
/// as Prometheus text at `http://ADDRESS:PORT/metrics`: the engine's committed and aborted
/// transactions (by cause), rejected records, the protocol phases as histograms in seconds with
/// buckets from 250 ns to 1 s, and membership events and the configuration id.
///
/// The server is one thread answering one request at a time: a scrape every few seconds is all it
/// serves. It is not a general HTTP server (GET only, no keep-alive).
final class MetricsEndpoint: Sendable {
    let registry: PrometheusCollectorRegistry
    let port: UInt16
    private let socket: Int32

    /// The engine's phase timer, and what it is called in Prometheus (it records nanoseconds;
    /// Prometheus histograms of durations are in seconds).
    static let phaseTimer = "granary_phase_nanoseconds"
    static let phaseHistogram = "granary_phase_seconds"

    /// Bootstraps swift-metrics with a Prometheus factory (once per process) and starts serving
    /// on `address:port` (port 0: any free port; ``port`` says which).
    ///
    /// - Throws: ``CommandFailure`` naming the address when the socket cannot be bound.
    init(address: String, port: UInt16) throws {
        let registry = PrometheusCollectorRegistry()
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.nameAndLabelSanitizer = { name, labels in
            (name == Self.phaseTimer ? Self.phaseHistogram : name, labels)
        }
        factory.durationHistogramBuckets[Self.phaseHistogram] = [
            .nanoseconds(250), .nanoseconds(500), .microseconds(1), .microseconds(2), .microseconds(5),
            .microseconds(10), .microseconds(20), .microseconds(50), .microseconds(100), .microseconds(250),
            .milliseconds(1), .milliseconds(10), .milliseconds(100), .seconds(1),
        ]
        MetricsSystem.bootstrap(factory)
        self.registry = registry

        let fd = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw CommandFailure("metrics: cannot open a socket: \(String(cString: strerror(errno)))") }
        var yes: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, socklen_t(MemoryLayout<Int32>.size))
        var socketAddress = sockaddr_in()
        socketAddress.sin_family = sa_family_t(AF_INET)
        socketAddress.sin_port = port.bigEndian
        guard inet_pton(AF_INET, address, &socketAddress.sin_addr) == 1 else {
            close(fd)
            throw CommandFailure("metrics: '\(address)' is not an IPv4 address (--metrics-address)")
        }
        let bound = withUnsafePointer(to: &socketAddress) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(fd, 16) == 0 else {
            let message = String(cString: strerror(errno))
            close(fd)
            throw CommandFailure("metrics: cannot listen on \(address):\(port): \(message)")
        }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        withUnsafeMutablePointer(to: &socketAddress) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { _ = getsockname(fd, $0, &length) }
        }
        self.port = UInt16(bigEndian: socketAddress.sin_port)
        self.socket = fd
        let thread = Thread { [self] in self.serve() }
        thread.name = "granary-metrics"
        thread.start()
    }

    private func serve() {
        while true {
            let client = accept(socket, nil, nil)
            guard client >= 0 else {
                if errno == EINTR { continue }
                return
            }
            respond(to: client)
            close(client)
        }
    }

    private func respond(to client: Int32) {
        var timeout = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var request: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while request.count < 16 << 10 {
            let count = buffer.withUnsafeMutableBytes { recv(client, $0.baseAddress, $0.count, 0) }
            guard count > 0 else { break }
            request += buffer[0..<count]
            if request.count >= 4, request.suffix(4) == [13, 10, 13, 10] { break }
        }
        let line = String(decoding: request.prefix { $0 != 13 && $0 != 10 }, as: UTF8.self).split(separator: " ")
        let status: String, body: [UInt8], type: String
        if line.count >= 2, line[0] == "GET", line[1] == "/metrics" || line[1].hasPrefix("/metrics?") {
            (status, body, type) = ("200 OK", registry.emitToBuffer(), "text/plain; version=0.0.4; charset=utf-8")
        } else {
            (status, body, type) = ("404 Not Found", Array("Granary serves its metrics at /metrics\n".utf8), "text/plain; charset=utf-8")
        }
        let response = Array("HTTP/1.1 \(status)\r\nContent-Type: \(type)\r\nContent-Length: \(body.count)\r\nConnection: close\r\n\r\n".utf8) + body
        var sent = 0
        while sent < response.count {
            let count = response[sent...].withUnsafeBytes { send(client, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            guard count > 0 else { return }
            sent += count
        }
    }
}
