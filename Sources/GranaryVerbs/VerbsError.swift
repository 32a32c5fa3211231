import GranaryTransport
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Why a ``VerbsTransport`` could not be set up: no RDMA device, a verbs call that failed while
/// opening the device, or an endpoint that cannot be published.
///
/// Failures of one-sided operations and of connecting to a peer are `TransportError`s (the
/// protocol's error type); they name the peer, the address and the work completion status.
public enum VerbsError: Error, Sendable, Equatable, CustomStringConvertible {
    /// No RDMA device (or none with the requested name).
    case noDevice(requested: String?, available: [String])
    /// A verbs or system call failed while opening the device or publishing the endpoint.
    case call(String, device: String, detail: String)
    /// The endpoint socket of the node cannot be created at `path`.
    case endpoint(path: String, detail: String)
    /// An option of ``VerbsTransport/Options`` is outside what the transport can use.
    case invalidOption(name: String, value: Int, allowed: String)

    /// The failure in a sentence; for a missing device, what devices exist and how to create one.
    public var description: String {
        switch self {
        case .noDevice(let requested, let available):
            let how = "create a soft-RoCE device with Scripts/softroce-up (a host kernel with rdma_rxe), "
                + "or run the program inside Scripts/softroce-vm (a qemu guest with rxe0; see docs/VERBS.md, Soft-RoCE)"
            if let requested, !available.isEmpty {
                return "no RDMA device named '\(requested)' (GRANARY_RDMA_DEVICE or the device argument); "
                    + "devices present: \(available.joined(separator: ", "))"
            }
            let which = requested.map { " (asked for '\($0)')" } ?? ""
            return "no RDMA device found\(which): ibv_get_device_list returned none; " + how
        case .call(let call, let device, let detail):
            return "\(call) failed on RDMA device \(device): \(detail)"
        case .endpoint(let path, let detail):
            return "cannot publish the verbs endpoint \(path): \(detail)"
        case .invalidOption(let name, let value, let allowed):
            return "verbs transport option \(name) = \(value) is not allowed: \(allowed)"
        }
    }
}

/// The text of an errno value, with its symbolic name where it matters for the advice given.
func errnoText(_ code: Int32) -> String {
    "\(String(cString: strerror(code))) (errno \(code))"
}

/// The current RLIMIT_MEMLOCK soft limit, for error messages about pinned memory.
func memlockLimitText() -> String {
    var limit = rlimit()
    guard getrlimit(__rlimit_resource_t(__RLIMIT_MEMLOCK.rawValue), &limit) == 0 else { return "unknown" }
    if limit.rlim_cur == rlim_t.max { return "unlimited" }  // RLIM_INFINITY
    return "\(limit.rlim_cur) bytes"
}
