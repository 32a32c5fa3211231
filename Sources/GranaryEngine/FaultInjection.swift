import GranaryConfiguration
import GranaryMemory
import GranaryTransport
import Synchronization

/// The points of the commit protocol where a test can make a send or a read fail, one per phase
/// (FaRM's names). A failed point behaves as the transport failing there: the record is not
/// delivered, the read returns an error, the LOCK replies never come.
package enum FaultPoint: String, Sendable, CaseIterable, CustomStringConvertible {
    /// The LOCK record to one primary.
    case lockSend
    /// The wait for LOCK replies (as a timeout).
    case lockReply
    /// VALIDATE's one-sided header reads.
    case validateRead
    /// The COMMIT-BACKUP record to one backup.
    case commitBackupSend
    /// The COMMIT-PRIMARY record to one primary.
    case commitPrimarySend
    /// An ABORT record to one primary or backup.
    case abortSend
    /// A TRUNCATE record to one primary or backup.
    case truncateSend
    /// DATA RECOVERY's one-sided reads of a region's primary, by a new backup copying it.
    case copyRead

    package var description: String { rawValue }

    /// The points of the commit protocol (every one but data recovery's).
    package static var commitProtocol: [FaultPoint] { allCases.filter { $0 != .copyRead } }
}

/// A test's rule for failing fault points: called with the point and the node the send or read
/// goes to; true makes it fail.
package typealias FaultRule = @Sendable (FaultPoint, NodeID) -> Bool

/// The engine's fault-injection switch: one relaxed load per send while no rule is installed.
/// Stored inline in the engine (no reference to retain on the hot path).
struct FaultInjector: ~Copyable, Sendable {
    private let armed = Atomic<Bool>(false)
    private let rule = Mutex<FaultRule?>(nil)

    func install(_ newRule: FaultRule?) {
        rule.withLock { $0 = newRule }
        armed.store(newRule != nil, ordering: .releasing)
    }

    /// Whether the send or read at `point` to `node` must fail.
    @inline(__always) func fails(_ point: FaultPoint, _ node: NodeID) -> Bool {
        guard armed.load(ordering: .relaxed) else { return false }
        // Called outside the lock: a rule may stall one send while other points are checked.
        let current = rule.withLock { $0 }
        return current?(point, node) ?? false
    }

    /// Throws the error a failure at `point` towards `node` reports, if it must fail.
    @inline(__always) func check(_ point: FaultPoint, _ node: NodeID) throws(TransactionError) {
        if fails(point, node) {
            throw .transport(.peerUnreachable(node: node, detail: "injected fault at \(point)"))
        }
    }
}

extension Engine {
    /// Installs a rule that makes chosen sends and reads of the commit protocol fail (nil removes
    /// it). For tests of the exact outcomes after each failure.
    package func injectFaults(_ rule: FaultRule?) { faults.install(rule) }
}
